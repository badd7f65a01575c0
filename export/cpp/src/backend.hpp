// Internal: the contract every backend implements for one bundle graph, and their factories.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cops/manifest.hpp"

namespace cops {

// A dense float32 tensor, row-major.
struct Tensor {
  std::vector<std::int64_t> shape;
  std::vector<float> data;
};

using TensorMap = std::map<std::string, Tensor>;

// One graph, loaded and ready. run() is safe to call from several threads at once (each
// implementation says how) and returns at least every output the manifest lists.
class GraphRunner {
 public:
  virtual ~GraphRunner() = default;
  virtual TensorMap run(const TensorMap& inputs) = 0;
  virtual std::string provider() const = 0;
  // Largest batch the graph accepts, when the backend has a limit.
  virtual std::optional<int> max_batch() const { return std::nullopt; }
};

// Throws BackendError when the loaded graph's input and output names differ from the manifest's
// (the file and the manifest disagree).
void check_io_names(const std::string& what, const std::string& path, const GraphIO& graph,
                    const std::vector<std::string>& inputs, const std::vector<std::string>& outputs);

// Factories; each throws BackendError when its backend is not compiled into this build.
// `graph` is "vision" or "head".
std::unique_ptr<GraphRunner> make_openvino(const Bundle& bundle, const std::string& graph,
                                           int threads);
std::unique_ptr<GraphRunner> make_onnxruntime(const Bundle& bundle, const std::string& graph,
                                              int threads);
std::unique_ptr<GraphRunner> make_tensorrt(const Bundle& bundle, const std::string& graph,
                                           int device);

// The engine file name of `graph` in a bundle (the exporter's contract): "<graph>.engine".
std::string engine_name(const std::string& graph);

}  // namespace cops
