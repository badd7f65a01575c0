// ONNX Runtime backend (CPU execution provider), compiled only where CMake finds
// onnxruntime_cxx_api.h and the onnxruntime library (a release archive or a distribution
// package). Written against the documented C++ API (Ort::Env, Ort::Session, Ort::Value).
//
// The graph file is the bundle's ONNX Runtime variant of the graph when it lists one (role
// "<graph>_onnx_ort": fused attention, same weights), else the portable graph, as the Python
// runtime's default. Thread safety: Ort::Session::Run is thread-safe; one session per graph.
#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"
#include "cops/errors.hpp"

#ifdef COPS_WITH_ONNXRUNTIME
#include <onnxruntime_cxx_api.h>
#endif

namespace cops {

#ifdef COPS_WITH_ONNXRUNTIME
namespace {

Ort::Env& ort_env() {
  static Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "cops");  // one per process
  return env;
}

class OnnxRuntimeRunner : public GraphRunner {
 public:
  OnnxRuntimeRunner(const Bundle& bundle, const std::string& graph, int threads)
      : io_(bundle.manifest.graph(graph)) {
    const auto variants = bundle.manifest.with_role(graph + "_onnx_ort");
    if (variants.size() > 1) {
      throw BundleError("bundle " + bundle.root.string() + " lists " +
                        std::to_string(variants.size()) + " ONNX Runtime variants of graph '" +
                        graph + "'; valid: at most one. Fix: re-export the bundle.");
    }
    path_ = (bundle.root / (variants.empty() ? io_.file : variants[0].path)).string();
    try {
      Ort::SessionOptions options;
      options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
      if (threads > 0) options.SetIntraOpNumThreads(threads);
      session_ = std::make_unique<Ort::Session>(ort_env(), path_.c_str(), options);
    } catch (const Ort::Exception& exc) {
      throw BackendError("ONNX Runtime cannot load graph '" + graph + "' from " + path_ + " (" +
                         exc.what() + "). Fix: re-export the bundle; check this ONNX Runtime "
                         "supports the graph's opset.");
    }
    Ort::AllocatorWithDefaultOptions allocator;
    std::vector<std::string> inputs, outputs;
    for (size_t i = 0; i < session_->GetInputCount(); ++i) {
      inputs.emplace_back(session_->GetInputNameAllocated(i, allocator).get());
    }
    for (size_t i = 0; i < session_->GetOutputCount(); ++i) {
      outputs.emplace_back(session_->GetOutputNameAllocated(i, allocator).get());
    }
    check_io_names("ONNX graph", path_, io_, inputs, outputs);
  }

  TensorMap run(const TensorMap& inputs) override {
    const Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<const char*> in_names, out_names;
    std::vector<Ort::Value> in_values;
    for (const auto& [name, tensor] : inputs) {
      in_names.push_back(name.c_str());
      // Wraps the caller's memory: no copy. ONNX Runtime only reads inputs.
      in_values.push_back(Ort::Value::CreateTensor<float>(
          memory, const_cast<float*>(tensor.data.data()), tensor.data.size(),
          tensor.shape.data(), tensor.shape.size()));
    }
    for (const auto& spec : io_.outputs) out_names.push_back(spec.name.c_str());
    TensorMap out;
    try {
      std::vector<Ort::Value> results =
          session_->Run(Ort::RunOptions{nullptr}, in_names.data(), in_values.data(),
                        in_values.size(), out_names.data(), out_names.size());
      for (size_t i = 0; i < results.size(); ++i) {
        const auto info = results[i].GetTensorTypeAndShapeInfo();
        Tensor t;
        t.shape = info.GetShape();
        const float* data = results[i].GetTensorData<float>();
        t.data.assign(data, data + info.GetElementCount());
        out.emplace(io_.outputs[i].name, std::move(t));
      }
    } catch (const Ort::Exception& exc) {
      throw BackendError("ONNX Runtime failed to run graph " + path_ + ": " + exc.what() +
                         ". Fix: check the input shapes, or re-export the bundle.");
    }
    return out;
  }

  std::string provider() const override { return "CPUExecutionProvider"; }

 private:
  GraphIO io_;
  std::string path_;
  std::unique_ptr<Ort::Session> session_;
};

}  // namespace

std::unique_ptr<GraphRunner> make_onnxruntime(const Bundle& bundle, const std::string& graph,
                                              int threads) {
  return std::make_unique<OnnxRuntimeRunner>(bundle, graph, threads);
}

#else

std::unique_ptr<GraphRunner> make_onnxruntime(const Bundle&, const std::string&, int) {
  throw BackendError(
      "this cops library was built without ONNX Runtime. Fix: rebuild export/cpp with "
      "-DONNXRUNTIME_ROOT=<folder of an ONNX Runtime release> (it holds include/"
      "onnxruntime_cxx_api.h and lib/libonnxruntime.so).");
}

#endif

}  // namespace cops
