// OpenVINO backend: one bundle graph (the portable ONNX file, read as is) compiled for the CPU.
//
// Inference precision is set to f32 explicitly: OpenVINO defaults to bf16 on CPUs that have it,
// which moves the anomaly map by about 5e-3. Thread safety: ov::CompiledModel is thread-safe,
// an ov::InferRequest is not; run() takes a request from a pool (creating one when all are busy)
// and gives it back, so concurrent calls each get their own.
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend.hpp"
#include "cops/errors.hpp"

#ifdef COPS_WITH_OPENVINO
#include <openvino/openvino.hpp>
#endif

namespace cops {

#ifdef COPS_WITH_OPENVINO
namespace {

class OpenVinoRunner : public GraphRunner {
 public:
  OpenVinoRunner(const Bundle& bundle, const std::string& graph, int threads)
      : io_(bundle.manifest.graph(graph)), path_((bundle.root / io_.file).string()) {
    try {
      ov::Core core;
      ov::AnyMap config = {ov::hint::inference_precision(ov::element::f32),
                           ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
      if (threads > 0) config.emplace(ov::inference_num_threads(threads));
      compiled_ = core.compile_model(core.read_model(path_), "CPU", config);
    } catch (const std::exception& exc) {
      throw BackendError("OpenVINO " + std::string(ov::get_openvino_version().buildNumber) +
                         " cannot load graph '" + graph + "' from " + path_ + " (" + exc.what() +
                         "). Fix: re-export the bundle; check this OpenVINO reads the graph's "
                         "opset.");
    }
    std::vector<std::string> inputs, outputs;
    for (const auto& port : compiled_.inputs()) inputs.push_back(port.get_any_name());
    for (const auto& port : compiled_.outputs()) {
      for (const auto& name : port.get_names()) outputs.push_back(name);
    }
    check_io_names("ONNX graph", path_, io_, inputs, outputs);
  }

  TensorMap run(const TensorMap& inputs) override {
    ov::InferRequest request = acquire();
    TensorMap out;
    try {
      for (const auto& [name, tensor] : inputs) {
        // Wraps the caller's memory: no copy. OpenVINO only reads inputs.
        ov::Shape shape(tensor.shape.begin(), tensor.shape.end());
        request.set_tensor(name, ov::Tensor(ov::element::f32, shape,
                                            const_cast<float*>(tensor.data.data())));
      }
      request.infer();
      for (const auto& spec : io_.outputs) {
        const ov::Tensor result = request.get_tensor(spec.name);
        Tensor t;
        for (auto d : result.get_shape()) t.shape.push_back(static_cast<std::int64_t>(d));
        const float* data = result.data<const float>();
        t.data.assign(data, data + result.get_size());
        out.emplace(spec.name, std::move(t));
      }
    } catch (const std::exception& exc) {
      release(std::move(request));
      throw BackendError("OpenVINO failed to run graph " + path_ + ": " + exc.what() +
                         ". Fix: check the input shapes, or re-export the bundle.");
    }
    release(std::move(request));
    return out;
  }

  std::string provider() const override { return "openvino CPU f32"; }

 private:
  ov::InferRequest acquire() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!idle_.empty()) {
        ov::InferRequest request = std::move(idle_.back());
        idle_.pop_back();
        return request;
      }
    }
    return compiled_.create_infer_request();
  }

  void release(ov::InferRequest request) {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.push_back(std::move(request));
  }

  GraphIO io_;
  std::string path_;
  ov::CompiledModel compiled_;
  std::mutex mutex_;
  std::vector<ov::InferRequest> idle_;
};

}  // namespace

std::unique_ptr<GraphRunner> make_openvino(const Bundle& bundle, const std::string& graph,
                                           int threads) {
  return std::make_unique<OpenVinoRunner>(bundle, graph, threads);
}

#else

std::unique_ptr<GraphRunner> make_openvino(const Bundle&, const std::string&, int) {
  throw BackendError(
      "this cops library was built without OpenVINO. Fix: rebuild export/cpp with "
      "-DOpenVINO_DIR=<openvino>/cmake (the openvino wheel ships it: python -c \"import openvino, "
      "os; print(os.path.dirname(openvino.__file__))\" + /cmake).");
}

#endif

}  // namespace cops
