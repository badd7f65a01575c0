// TensorRT backend (TensorRT >= 10: setInputShape, setTensorAddress, enqueueV3), compiled only
// where CMake finds NvInfer.h, nvinfer and the CUDA runtime. Written against the documented API.
//
// Before an engine is loaded its key in manifest.engines is checked against this machine as the
// Python runtime does (cops_deploy/runtime/backends.py expected_engine_key): the ONNX graph it
// was built from, the TensorRT version, the GPU name and the compute capability; a mismatch is a
// BundleError naming the field. Thread safety: one execution context and one stream per graph;
// run() holds a mutex.
#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"
#include "cops/errors.hpp"

#ifdef COPS_WITH_TENSORRT
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <mutex>
#endif

namespace cops {

#ifdef COPS_WITH_TENSORRT
namespace {

const char* const kTrtFix =
    "Fix: rebuild the engines on this machine with `cops-export --engine trt --bundle BUNDLE "
    "--force`, or use backend onnxruntime or openvino.";

void cuda_check(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) {
    throw BackendError("CUDA call " + what + " failed: " + cudaGetErrorString(status) +
                       ". Fix: check the GPU and driver (nvidia-smi), or use backend openvino.");
  }
}

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* message) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "TensorRT: " << message << "\n";
  }
};

// The machine half of an engine key, formatted as the Python side records it.
EngineKey machine_key(int device) {
  if (getInferLibVersion() != NV_TENSORRT_VERSION) {
    throw BackendError("the TensorRT library (" + std::to_string(getInferLibVersion()) +
                       ") differs from the headers this library was built with (" +
                       std::to_string(NV_TENSORRT_VERSION) +
                       "). Fix: rebuild export/cpp against the installed TensorRT.");
  }
  cudaDeviceProp props{};
  cuda_check(cudaGetDeviceProperties(&props, device),
             "cudaGetDeviceProperties(" + std::to_string(device) + ")");
  std::string name = props.name;
  name.erase(name.find_last_not_of(" \t\n") + 1);
  name.erase(0, name.find_first_not_of(" \t\n"));
  EngineKey key;
  key.tensorrt_version = std::to_string(NV_TENSORRT_MAJOR) + "." +
                         std::to_string(NV_TENSORRT_MINOR) + "." +
                         std::to_string(NV_TENSORRT_PATCH) + "." + std::to_string(NV_TENSORRT_BUILD);
  key.gpu_name = name;
  key.compute_capability = std::to_string(props.major) + "." + std::to_string(props.minor);
  return key;
}

// The engine file of `graph` if its key fits this machine; else BundleError naming the field.
std::string check_engine(const Bundle& bundle, const std::string& graph, int device) {
  const std::string name = engine_name(graph);
  const auto it = bundle.manifest.engines.find(name);
  if (it == bundle.manifest.engines.end()) {
    throw BundleError("bundle " + bundle.root.string() + " has no TensorRT engine for graph '" +
                      graph + "' (expected '" + name + "' in manifest.engines). " + kTrtFix);
  }
  const EngineKey& stored = it->second;
  EngineKey here = machine_key(device);
  // The engine may come from any ONNX graph of this bundle for `graph` (the portable graph or a
  // variant such as "<graph>_onnx_fp16"), never from another export.
  here.onnx_sha256 = bundle.manifest.file(bundle.manifest.graph(graph).file).sha256;
  const std::string prefix = graph + "_onnx";
  for (const auto& f : bundle.manifest.files) {
    const bool graph_file = f.role.compare(0, prefix.size(), prefix) == 0 &&
                            (f.role.size() < 5 || f.role.substr(f.role.size() - 5) != "_data");
    if (graph_file && f.sha256 == stored.onnx_sha256) here.onnx_sha256 = stored.onnx_sha256;
  }
  here.precision = stored.precision;
  here.profile = stored.profile;
  const std::vector<std::pair<std::string, std::pair<std::string, std::string>>> fields = {
      {"onnx_sha256", {stored.onnx_sha256, here.onnx_sha256}},
      {"tensorrt_version", {stored.tensorrt_version, here.tensorrt_version}},
      {"gpu_name", {stored.gpu_name, here.gpu_name}},
      {"compute_capability", {stored.compute_capability, here.compute_capability}},
  };
  for (const auto& [field, values] : fields) {
    if (values.first != values.second) {
      throw BundleError("engine '" + name + "' in bundle " + bundle.root.string() +
                        " does not fit this machine: it was built for " + field + "='" +
                        values.first + "', here " + field + "='" + values.second +
                        "' (engines are tied to the ONNX graph, TensorRT version, GPU, precision "
                        "and profile). " + kTrtFix);
    }
  }
  return (bundle.root / name).string();
}

class TensorRtRunner : public GraphRunner {
 public:
  TensorRtRunner(const Bundle& bundle, const std::string& graph, int device)
      : io_(bundle.manifest.graph(graph)), device_(device) {
    path_ = check_engine(bundle, graph, device);
    gpu_ = machine_key(device).gpu_name;
    cuda_check(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
    std::ifstream in(path_, std::ios::binary);
    const std::vector<char> blob((std::istreambuf_iterator<char>(in)),
                                 std::istreambuf_iterator<char>());
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (runtime_) engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_) {
      throw BundleError("TensorRT cannot deserialise engine " + path_ +
                        " (corrupt, or built by another TensorRT). " + kTrtFix);
    }
    std::vector<std::string> inputs, outputs;
    for (int i = 0; i < engine_->getNbIOTensors(); ++i) {
      const char* name = engine_->getIOTensorName(i);
      const bool input = engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
      (input ? inputs : outputs).emplace_back(name);
    }
    check_io_names("TensorRT engine", path_, io_, inputs, outputs);
    context_.reset(engine_->createExecutionContext());
    if (!context_) {
      throw BackendError("TensorRT could not create an execution context for " + path_ +
                         " (out of GPU memory?). Fix: free GPU memory, or use backend openvino.");
    }
    const auto max = engine_->getProfileShape(io_.inputs.at(0).name.c_str(), 0,
                                              nvinfer1::OptProfileSelector::kMAX);
    max_batch_ = static_cast<int>(max.d[0]);
    cuda_check(cudaStreamCreate(&stream_), "cudaStreamCreate");
  }

  ~TensorRtRunner() override {
    for (auto& [name, buffer] : buffers_) cudaFree(buffer.first);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  TensorMap run(const TensorMap& inputs) override {
    std::lock_guard<std::mutex> lock(mutex_);
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    for (const auto& [name, tensor] : inputs) {
      nvinfer1::Dims dims{};
      dims.nbDims = static_cast<int>(tensor.shape.size());
      for (int i = 0; i < dims.nbDims; ++i) dims.d[i] = tensor.shape[i];
      const auto lo = engine_->getProfileShape(name.c_str(), 0, nvinfer1::OptProfileSelector::kMIN);
      const auto hi = engine_->getProfileShape(name.c_str(), 0, nvinfer1::OptProfileSelector::kMAX);
      for (int i = 0; i < dims.nbDims; ++i) {
        if (dims.d[i] < lo.d[i] || dims.d[i] > hi.d[i]) {
          throw ConfigError("input '" + name + "' of TensorRT engine " + path_ +
                            " does not fit the engine's profile (batch 1.." +
                            std::to_string(hi.d[0]) + "). Fix: pass batch_size <= " +
                            std::to_string(hi.d[0]) + ", or rebuild with a larger profile.");
        }
      }
      if (!context_->setInputShape(name.c_str(), dims)) {
        throw BackendError("TensorRT refused the shape of input '" + name + "' of " + path_ + ".");
      }
      const size_t bytes = tensor.data.size() * sizeof(float);
      void* ptr = buffer(name, bytes);
      cuda_check(cudaMemcpyAsync(ptr, tensor.data.data(), bytes, cudaMemcpyHostToDevice, stream_),
                 "cudaMemcpyAsync(" + name + " to device)");
      context_->setTensorAddress(name.c_str(), ptr);
    }
    TensorMap out;
    for (const auto& spec : io_.outputs) {
      const auto dims = context_->getTensorShape(spec.name.c_str());
      Tensor t;
      size_t count = 1;
      for (int i = 0; i < dims.nbDims; ++i) {
        t.shape.push_back(dims.d[i]);
        count *= static_cast<size_t>(dims.d[i]);
      }
      if (engine_->getTensorDataType(spec.name.c_str()) != nvinfer1::DataType::kFLOAT) {
        throw BundleError("TensorRT engine " + path_ + " outputs '" + spec.name +
                          "' in another type than float32. " + kTrtFix);
      }
      t.data.resize(count);
      context_->setTensorAddress(spec.name.c_str(), buffer(spec.name, count * sizeof(float)));
      out.emplace(spec.name, std::move(t));
    }
    if (!context_->enqueueV3(stream_)) {
      throw BackendError("TensorRT enqueueV3 failed for " + path_ +
                         "; see the TensorRT log above. " + kTrtFix);
    }
    for (auto& [name, t] : out) {
      cuda_check(cudaMemcpyAsync(t.data.data(), buffers_.at(name).first,
                                 t.data.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_),
                 "cudaMemcpyAsync(" + name + " to host)");
    }
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return out;
  }

  std::string provider() const override { return gpu_; }
  std::optional<int> max_batch() const override { return max_batch_; }

 private:
  // A device buffer of at least `bytes` for `name` (grown, never shrunk).
  void* buffer(const std::string& name, size_t bytes) {
    auto& entry = buffers_[name];
    if (entry.second < bytes) {
      if (entry.first != nullptr) cudaFree(entry.first);
      entry = {nullptr, 0};
      cuda_check(cudaMalloc(&entry.first, bytes), "cudaMalloc(" + std::to_string(bytes) + ")");
      entry.second = bytes;
    }
    return entry.first;
  }

  GraphIO io_;
  int device_;
  std::string path_;
  std::string gpu_;
  int max_batch_ = 1;
  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  cudaStream_t stream_ = nullptr;
  std::map<std::string, std::pair<void*, size_t>> buffers_;
  std::mutex mutex_;
};

}  // namespace

std::unique_ptr<GraphRunner> make_tensorrt(const Bundle& bundle, const std::string& graph,
                                           int device) {
  return std::make_unique<TensorRtRunner>(bundle, graph, device);
}

#else

std::unique_ptr<GraphRunner> make_tensorrt(const Bundle&, const std::string&, int) {
  throw BackendError(
      "this cops library was built without TensorRT. Fix: rebuild export/cpp where TensorRT "
      "(NvInfer.h, libnvinfer) and the CUDA toolkit are installed, e.g. -DTENSORRT_ROOT=<dir>.");
}

#endif

}  // namespace cops
