// cops/errors.hpp: the exceptions the cops library throws on purpose.
//
// Every message names what failed (the file, the manifest key, the image), the value found,
// what is valid, and the fix, like the Python runtime's errors (cops_deploy/errors.py).
#pragma once

#include <stdexcept>
#include <string>

namespace cops {

// Base class of every error the library throws on purpose.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// A bundle that is missing, tampered with, truncated, inconsistent or of an unknown schema.
class BundleError : public Error {
 public:
  using Error::Error;
};

// An input image that cannot be read or converted (the message names the file).
class ImageError : public Error {
 public:
  using Error::Error;
};

// An invalid option (backend name, thread count, batch size, buffer layout).
class ConfigError : public Error {
 public:
  using Error::Error;
};

// A backend that is not compiled into this build, or that failed to load or run a graph.
class BackendError : public Error {
 public:
  using Error::Error;
};

}  // namespace cops
