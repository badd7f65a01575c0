// cops/manifest.hpp: the bundle's manifest.json (schema_version 2) and opening a bundle.
//
// A bundle is a folder holding manifest.json and the files it lists. Opening one checks, as the
// Python runtime does (cops_deploy/runtime/bundle.py and manifest.schema.json): the schema
// version, every key and value of the manifest, that every listed path is relative, canonical
// and stays inside the folder (symlinks included), that no path is listed twice, that each
// listed file exists with the listed size and (with verify) sha256, and that the graph and
// engine files are listed. Every refusal is a cops::BundleError naming the file or key and the
// fix. Nothing about the model is fixed here: sizes, normalisation, graph files and tensor
// names all come from the manifest.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace cops {

// The manifest schema this library reads.
inline constexpr int kSchemaVersion = 2;
inline constexpr const char* kManifestName = "manifest.json";

// One listed file: bundle-relative POSIX path, sha256 (64 lowercase hex), size, role.
struct FileEntry {
  std::string path;
  std::string sha256;
  std::uint64_t size = 0;
  std::string role;
};

// A graph input or output. A dimension is a size (>= 0) or a name (dynamic, e.g. "batch"):
// dims[i] is -1 exactly when dim_names[i] is non-empty.
struct TensorSpec {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> dims;
  std::vector<std::string> dim_names;
};

// One ONNX graph: its listed file and its inputs and outputs in manifest order.
struct GraphIO {
  std::string file;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
};

// Image preprocessing that travels with the weights.
struct PreprocessCfg {
  int size = 0;                      // side of the square model input
  std::array<double, 3> mean{};      // per RGB channel, on [0, 1] pixels
  std::array<double, 3> std{};       // per RGB channel, > 0
  std::string interpolation;         // "bicubic", "bilinear" or "nearest"
};

// What a TensorRT engine is tied to; it runs only where every field matches.
struct EngineKey {
  std::string onnx_sha256;
  std::string tensorrt_version;
  std::string gpu_name;
  std::string compute_capability;
  std::string precision;
  std::string profile;
};

struct Manifest {
  int schema_version = 0;
  std::string package_version;
  PreprocessCfg preprocess;
  std::map<std::string, GraphIO> graphs;
  std::vector<FileEntry> files;
  std::map<std::string, EngineKey> engines;
  std::optional<double> threshold;  // decision threshold; none: no decision
  std::string created;
  std::map<std::string, std::string> tool_versions;
  bool random_weights = false;

  // Entries whose role is `role`, in manifest order.
  std::vector<FileEntry> with_role(const std::string& role) const;
  // The entry listed under `path`; BundleError naming the listed paths when absent.
  const FileEntry& file(const std::string& path) const;
  // The graph named `name` ("vision", "head"); BundleError naming those present when absent.
  const GraphIO& graph(const std::string& name) const;
};

// Parse and validate manifest text. `where` names the source in messages.
Manifest parse_manifest(const std::string& text, const std::string& where = kManifestName);

// An opened bundle: its folder, its manifest, and whether every sha256 was checked.
struct Bundle {
  std::filesystem::path root;
  Manifest manifest;
  bool verified = false;

  std::filesystem::path path_of(const FileEntry& entry) const { return root / entry.path; }
};

// Open and check the bundle folder `root` (see the file comment); `verify` also checks every
// file's sha256 (size and presence are always checked).
Bundle open_bundle(const std::filesystem::path& root, bool verify = true);

// Hex sha256 of a file, streamed in 1 MiB chunks (OpenSSL EVP). Throws BundleError on I/O error.
std::string sha256_file(const std::filesystem::path& path);

// Check a bundle-relative path as the Python runtime does: non-empty, relative, canonical POSIX,
// no '..', not the manifest's own name. Throws BundleError naming `what`.
void check_relative_path(const std::string& path, const std::string& what);

}  // namespace cops
