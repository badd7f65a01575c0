// cops::Detector: bundle checks, backend choice, batching, the vision -> head chain.
#include "cops/detector.hpp"

#include <algorithm>

#include "backend.hpp"

namespace cops {
namespace {

const std::vector<std::string> kBackends = {"tensorrt", "onnxruntime", "openvino"};  // auto order
const char* const kReexport = "Fix: re-export the bundle with cops-export.";

bool compiled(const std::string& kind) {
  const auto have = available_backends();
  return std::find(have.begin(), have.end(), kind) != have.end();
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + items[i];
  return out;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

// What the detector needs from the manifest's graphs, checked once at open.
struct Plan {
  std::string image;      // the vision graph's input
  std::string score;      // the head output of rank 1: (B,)
  std::string map;        // the head output of rank 3: (B, S, S)
  std::vector<std::string> head_inputs;  // fed from the vision outputs of the same name
};

Plan check_bundle(const Bundle& bundle) {
  const Manifest& m = bundle.manifest;
  const std::string where = "bundle " + bundle.root.string() + ": ";
  const int s = m.preprocess.size;
  if (m.preprocess.interpolation != "bicubic") {
    throw BundleError(where + "preprocess.interpolation is '" + m.preprocess.interpolation +
                      "'; this library resizes with 'bicubic' only (CLIP's preprocessing). " +
                      kReexport);
  }
  const GraphIO& vision = m.graph("vision");
  const GraphIO& head = m.graph("head");
  for (const auto* graph : {&vision, &head}) {
    for (const auto* list : {&graph->inputs, &graph->outputs}) {
      for (const auto& t : *list) {
        if (t.dtype != "float32") {
          throw BundleError(where + "graph tensor '" + t.name + "' has dtype " + t.dtype +
                            "; this library feeds and reads float32 tensors only. " + kReexport);
        }
      }
    }
  }
  Plan plan;
  const bool image_ok = vision.inputs.size() == 1 && vision.inputs[0].dims.size() == 4 &&
                        vision.inputs[0].dims[1] == 3 && vision.inputs[0].dims[2] == s &&
                        vision.inputs[0].dims[3] == s;
  if (!image_ok) {
    throw BundleError(where + "graph 'vision' must take one input of shape (batch, 3, " +
                      std::to_string(s) + ", " + std::to_string(s) +
                      ") (preprocess.size " + std::to_string(s) + "); the manifest lists " +
                      std::to_string(vision.inputs.size()) + " input(s). " + kReexport);
  }
  plan.image = vision.inputs[0].name;
  for (const auto& t : head.outputs) {
    if (t.dims.size() == 1) plan.score = t.name;
    if (t.dims.size() == 3 && t.dims[1] == s && t.dims[2] == s) plan.map = t.name;
  }
  if (plan.score.empty() || plan.map.empty()) {
    throw BundleError(where + "graph 'head' must output a score of shape (batch,) and a map of "
                      "shape (batch, " + std::to_string(s) + ", " + std::to_string(s) +
                      "); the manifest lists none of one of them. " + kReexport);
  }
  for (const auto& t : head.inputs) {
    const bool from_vision =
        std::any_of(vision.outputs.begin(), vision.outputs.end(),
                    [&](const TensorSpec& o) { return o.name == t.name; });
    if (!from_vision) {
      throw BundleError(where + "head input '" + t.name +
                        "' is not an output of graph 'vision'; the two graphs do not chain. " +
                        kReexport);
    }
    plan.head_inputs.push_back(t.name);
  }
  return plan;
}

std::unique_ptr<GraphRunner> make_runner(const std::string& kind, const Bundle& bundle,
                                         const std::string& graph, const DetectorOptions& opt) {
  if (kind == "openvino") return make_openvino(bundle, graph, opt.threads);
  if (kind == "onnxruntime") return make_onnxruntime(bundle, graph, opt.threads);
  return make_tensorrt(bundle, graph, opt.device);
}

// Why `kind` cannot run the bundle here, found without loading anything; empty if worth trying.
std::string precheck(const std::string& kind, const Bundle& bundle) {
  if (!compiled(kind)) return "not built into this library (CMake did not find it)";
  if (kind == "tensorrt") {
    std::vector<std::string> missing;
    for (const char* g : {"vision", "head"}) {
      if (!bundle.manifest.engines.count(engine_name(g))) missing.push_back(engine_name(g));
    }
    if (!missing.empty()) return "the bundle has no TensorRT engine(s) " + join(missing);
  }
  return "";
}

}  // namespace

void check_io_names(const std::string& what, const std::string& path, const GraphIO& graph,
                    const std::vector<std::string>& inputs,
                    const std::vector<std::string>& outputs) {
  std::vector<std::string> want_in, want_out, got_in = inputs, got_out = outputs;
  for (const auto& t : graph.inputs) want_in.push_back(t.name);
  for (const auto& t : graph.outputs) want_out.push_back(t.name);
  for (auto* v : {&want_in, &want_out, &got_in, &got_out}) std::sort(v->begin(), v->end());
  const bool outputs_ok = std::includes(got_out.begin(), got_out.end(), want_out.begin(),
                                        want_out.end());
  if (got_in != want_in || !outputs_ok) {
    throw BundleError(what + " " + path + " has inputs [" + join(got_in) + "] and outputs [" +
                      join(got_out) + "], but the manifest lists inputs [" + join(want_in) +
                      "] and outputs [" + join(want_out) +
                      "] (file and manifest disagree). " + kReexport);
  }
}

std::string engine_name(const std::string& graph) { return graph + ".engine"; }

std::vector<std::string> available_backends() {
  std::vector<std::string> out;
#ifdef COPS_WITH_TENSORRT
  out.push_back("tensorrt");
#endif
#ifdef COPS_WITH_ONNXRUNTIME
  out.push_back("onnxruntime");
#endif
#ifdef COPS_WITH_OPENVINO
  out.push_back("openvino");
#endif
  return out;
}

struct Detector::Impl {
  Bundle bundle;
  Plan plan;
  std::string kind;
  std::unique_ptr<GraphRunner> vision;
  std::unique_ptr<GraphRunner> head;
  std::map<std::string, std::string> skipped;
  std::optional<Calibration> calibration;

  // (B, 3, S, S) images -> one Prediction each (source and sizes filled by the caller).
  std::vector<Prediction> run(Tensor batch) const {
    const auto b = batch.shape[0];
    const int s = bundle.manifest.preprocess.size;
    TensorMap feed;
    feed.emplace(plan.image, std::move(batch));
    TensorMap embeddings = vision->run(feed);
    TensorMap head_feed;
    for (const auto& name : plan.head_inputs) {
      auto it = embeddings.find(name);
      if (it == embeddings.end()) {
        throw BackendError("bundle " + bundle.root.string() + ": graph 'vision' on " + kind +
                           " returned no output '" + name + "'. " + kReexport);
      }
      head_feed.emplace(name, std::move(it->second));
    }
    TensorMap out = head->run(head_feed);
    const Tensor& score = out.at(plan.score);
    const Tensor& map = out.at(plan.map);
    const std::vector<std::int64_t> want_score = {b}, want_map = {b, s, s};
    if (score.shape != want_score || map.shape != want_map) {
      throw BackendError("bundle " + bundle.root.string() + ": the head graph returned " +
                         plan.score + " " + shape_text(score.shape) + " and " + plan.map + " " +
                         shape_text(map.shape) + " for a batch of " + std::to_string(b) +
                         "; valid: " + shape_text(want_score) + " and " + shape_text(want_map) +
                         ". " + kReexport);
    }
    std::vector<Prediction> preds(static_cast<size_t>(b));
    const size_t plane = static_cast<size_t>(s) * s;
    for (std::int64_t i = 0; i < b; ++i) {
      Prediction& p = preds[static_cast<size_t>(i)];
      p.score = score.data[static_cast<size_t>(i)];
      p.map_size = s;
      p.anomaly_map.assign(map.data.begin() + i * plane, map.data.begin() + (i + 1) * plane);
      p.threshold = bundle.manifest.threshold;
      if (p.threshold) p.is_anomalous = p.score >= *p.threshold;
    }
    return preds;
  }

  std::vector<Prediction> predict_images(const std::vector<const RgbImage*>& images) const {
    const auto& pre = bundle.manifest.preprocess;
    const size_t plane = 3ull * pre.size * pre.size;
    Tensor batch;
    batch.shape = {static_cast<std::int64_t>(images.size()), 3, pre.size, pre.size};
    batch.data.resize(plane * images.size());
    for (size_t i = 0; i < images.size(); ++i) {
      preprocess_into(*images[i], pre.size, pre.mean, pre.std, batch.data.data() + i * plane);
    }
    auto preds = run(std::move(batch));
    for (size_t i = 0; i < images.size(); ++i) {
      Prediction& p = preds[i];
      p.original_height = images[i]->height;
      p.original_width = images[i]->width;
      if (calibration) {  // mask and regions on the map at the original size
        p.pixel_threshold = calibration->pixel_threshold;
        p.anomaly_map_original = resize_map_bilinear(p.anomaly_map, p.map_size, p.map_size,
                                                      p.original_width, p.original_height);
        p.regions = defect_regions(p.anomaly_map_original.data(), p.original_height,
                                   p.original_width, calibration->pixel_threshold,
                                   calibration->min_area, &p.mask);
      }
    }
    return preds;
  }

  int max_batch() const {
    std::vector<int> limits;
    for (const auto* r : {vision.get(), head.get()}) {
      if (auto m = r->max_batch()) limits.push_back(*m);
    }
    return limits.empty() ? kDefaultMaxBatch : *std::min_element(limits.begin(), limits.end());
  }

  int check_batch_size(int batch_size) const {
    const int limit = max_batch();
    if (batch_size == 0) return limit;
    if (batch_size < 0 || batch_size > limit) {
      throw ConfigError("batch_size " + std::to_string(batch_size) + " is invalid; valid: 0 (the "
                        "backend's maximum, " + std::to_string(limit) + ") or 1.." +
                        std::to_string(limit) + ". Fix: pass batch_size <= " +
                        std::to_string(limit) + ".");
    }
    return batch_size;
  }
};

Detector::Detector(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Detector::Detector(Detector&&) noexcept = default;
Detector& Detector::operator=(Detector&&) noexcept = default;
Detector::~Detector() = default;

Detector Detector::open(const std::filesystem::path& path, const DetectorOptions& options) {
  const bool known = options.backend == "auto" ||
                     std::find(kBackends.begin(), kBackends.end(), options.backend) !=
                         kBackends.end();
  if (!known) {
    throw ConfigError("unknown backend '" + options.backend + "'; valid: auto, " +
                      join(kBackends) + ". Fix: pass one of those.");
  }
  if (options.threads < 0) {
    throw ConfigError("threads " + std::to_string(options.threads) +
                      " is invalid; valid: 0 (one per core) or a positive count.");
  }
  auto impl = std::make_unique<Impl>();
  impl->bundle = open_bundle(path, options.verify);
  impl->plan = check_bundle(impl->bundle);
  impl->calibration = load_calibration(impl->bundle);
  const std::vector<std::string> order =
      options.backend == "auto" ? kBackends : std::vector<std::string>{options.backend};
  for (const auto& kind : order) {
    std::string reason = precheck(kind, impl->bundle);
    if (reason.empty()) {
      try {
        impl->vision = make_runner(kind, impl->bundle, "vision", options);
        impl->head = make_runner(kind, impl->bundle, "head", options);
        impl->kind = kind;
        break;
      } catch (const Error& exc) {
        if (options.backend != "auto") throw;
        impl->vision.reset();
        reason = exc.what();
      }
    } else if (options.backend != "auto") {
      throw BackendError("backend '" + kind + "' cannot run bundle " + path.string() + ": " +
                         reason + ". Fix: build export/cpp where " + kind +
                         " is installed, or pass another backend (built here: " +
                         join(available_backends()) + ").");
    }
    impl->skipped[kind] = reason;
  }
  if (impl->kind.empty()) {
    std::string reasons;
    for (const auto& [k, v] : impl->skipped) reasons += (reasons.empty() ? "" : "; ") + k + ": " + v;
    throw BackendError("no backend can run bundle " + path.string() + ": " + reasons +
                       ". Fix: build export/cpp with OpenVINO (OpenVINO_DIR) or ONNX Runtime.");
  }
  return Detector(std::move(impl));
}

const Bundle& Detector::bundle() const { return impl_->bundle; }
std::string Detector::backend_name() const { return impl_->kind; }
std::string Detector::provider() const { return impl_->vision->provider(); }
const std::map<std::string, std::string>& Detector::skipped() const { return impl_->skipped; }
const std::optional<Calibration>& Detector::calibration() const { return impl_->calibration; }
int Detector::max_batch() const { return impl_->max_batch(); }

std::string Detector::describe() const {
  std::string text = "backend " + backend_name() + " (" + provider() + ") for bundle " +
                     impl_->bundle.root.string();
  std::string skipped;
  for (const auto& [k, v] : impl_->skipped) skipped += (skipped.empty() ? "" : "; ") + k + ": " + v;
  return skipped.empty() ? text : text + "; skipped: " + skipped;
}

Prediction Detector::predict(const RgbImage& image) const {
  return impl_->predict_images({&image}).front();
}

Prediction Detector::predict(const ImageView& frame) const { return predict(to_rgb(frame)); }

Prediction Detector::predict(const std::filesystem::path& image) const {
  return predict(std::vector<std::filesystem::path>{image}).front();
}

std::vector<Prediction> Detector::predict(const std::vector<RgbImage>& images,
                                          int batch_size) const {
  const size_t size = static_cast<size_t>(impl_->check_batch_size(batch_size));
  std::vector<Prediction> out;
  for (size_t start = 0; start < images.size(); start += size) {
    std::vector<const RgbImage*> chunk;
    for (size_t i = start; i < std::min(images.size(), start + size); ++i) chunk.push_back(&images[i]);
    auto preds = impl_->predict_images(chunk);
    out.insert(out.end(), std::make_move_iterator(preds.begin()),
               std::make_move_iterator(preds.end()));
  }
  return out;
}

std::vector<Prediction> Detector::predict(const std::vector<std::filesystem::path>& images,
                                          int batch_size) const {
  const size_t size = static_cast<size_t>(impl_->check_batch_size(batch_size));
  std::vector<Prediction> out;
  for (size_t start = 0; start < images.size(); start += size) {
    std::vector<RgbImage> chunk;
    for (size_t i = start; i < std::min(images.size(), start + size); ++i) {
      try {
        chunk.push_back(load_image(images[i]));
      } catch (const ImageError& exc) {
        throw ImageError("image " + std::to_string(i) + " of " + std::to_string(images.size()) +
                         ": " + exc.what());
      }
    }
    std::vector<const RgbImage*> ptrs;
    for (const auto& img : chunk) ptrs.push_back(&img);
    auto preds = impl_->predict_images(ptrs);
    for (size_t i = 0; i < preds.size(); ++i) {
      preds[i].source = images[start + i].string();
      out.push_back(std::move(preds[i]));
    }
  }
  return out;
}

}  // namespace cops
