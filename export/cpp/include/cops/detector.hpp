// cops/detector.hpp: cops::Detector, CoPS zero-shot anomaly detection from a bundle in C++.
//
//   cops::Detector detector = cops::Detector::open("bundle/");      // verifies every file
//   cops::Prediction p = detector.predict("part.jpg");
//   p.score; p.anomaly_map;  // (S, S) row-major, S = detector.input_size()
//   if (p.is_anomalous && *p.is_anomalous) ...                      // only with a threshold
//
// The same contract as the Python Detector (cops_deploy.runtime.Detector): the bundle's two
// graphs run one after the other (vision: image -> embeddings; head: embeddings -> score and
// map); images are read and preprocessed as the Python runtime does (cops/image.hpp), so the
// same file gives the same input tensor; sizes, normalisation, graph files and tensor names
// come from the manifest.
//
// Backends: "openvino" (CPU, float32 inference precision set explicitly), "onnxruntime" (CPU) and
// "tensorrt" (the bundle's engines, engine key checked against this machine), each present only
// when this library was built with it (cops::available_backends()). "auto" tries TensorRT, then
// ONNX Runtime, then OpenVINO, and says why it passed over the others (Detector::skipped()).
//
// Thread safety: one Detector may serve concurrent predict() calls from several threads.
// Decoding and preprocessing are per call; OpenVINO keeps a pool of inference requests (one per
// concurrent call) over one compiled model; ONNX Runtime sessions are shared (Session::Run is
// thread-safe); TensorRT calls are serialised by a mutex (one execution context). A Detector is
// movable, not copyable; destroying or moving it while a predict() runs is undefined.
//
// Errors are exceptions (cops/errors.hpp): BundleError (bundle refused), ImageError (an image
// cannot be read), ConfigError (bad option or buffer), BackendError (backend missing or failed).
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cops/calibration.hpp"
#include "cops/errors.hpp"
#include "cops/image.hpp"
#include "cops/manifest.hpp"

namespace cops {

// Batch size when neither the caller nor the backend sets one (as the Python runtime).
inline constexpr int kDefaultMaxBatch = 8;

// The result for one image.
struct Prediction {
  float score = 0.0f;                 // raw image anomaly score
  int map_size = 0;                   // S: the map is S x S, the model's input size
  std::vector<float> anomaly_map;     // (S, S) row-major, as Python's Prediction.anomaly_map
  int original_height = 0;            // of the image after EXIF orientation
  int original_width = 0;
  std::optional<double> threshold;    // the bundle's decision threshold, if it has one
  std::optional<bool> is_anomalous;   // score >= threshold; empty without a threshold
  std::string source;                 // the file path, empty for a buffer
  // With a calibration record (cops/calibration.hpp), at the original size (H, W) row-major:
  std::optional<double> pixel_threshold;     // the record's pixel threshold
  std::vector<float> anomaly_map_original;   // the map resized as Python's resize_map
  std::vector<std::uint8_t> mask;            // 1: defective pixel (in a kept region)
  std::optional<std::vector<Region>> regions;  // in raster order; empty optional: no record
};

struct DetectorOptions {
  std::string backend = "auto";  // "auto", "tensorrt", "onnxruntime" or "openvino"
  bool verify = true;            // check every bundle file's sha256 (size always checked)
  int threads = 0;               // inference threads (OpenVINO, ONNX Runtime); 0: one per core
  int device = 0;                // CUDA device index (TensorRT)
};

// Backends compiled into this build, in auto order.
std::vector<std::string> available_backends();

class Detector {
 public:
  // Open `bundle` (see open_bundle) and load its two graphs on options.backend.
  // Throws BundleError, ConfigError or BackendError (auto: each backend's reason in the message).
  static Detector open(const std::filesystem::path& bundle, const DetectorOptions& options = {});

  Detector(Detector&&) noexcept;
  Detector& operator=(Detector&&) noexcept;
  Detector(const Detector&) = delete;
  Detector& operator=(const Detector&) = delete;
  ~Detector();

  // One image file (JPEG or PNG). Throws ImageError naming the file.
  Prediction predict(const std::filesystem::path& image) const;
  // One decoded image or camera frame (8-bit grey, RGB or RGBA). Throws ConfigError on a bad
  // buffer layout.
  Prediction predict(const ImageView& frame) const;
  Prediction predict(const RgbImage& image) const;
  // Many images, run in batches of `batch_size` (0: max_batch()); results in input order.
  // Throws ImageError naming the index and file of the first image that cannot be read.
  std::vector<Prediction> predict(const std::vector<std::filesystem::path>& images,
                                  int batch_size = 0) const;
  std::vector<Prediction> predict(const std::vector<RgbImage>& images, int batch_size = 0) const;

  const Bundle& bundle() const;
  const Manifest& manifest() const { return bundle().manifest; }
  int input_size() const { return manifest().preprocess.size; }
  std::optional<double> threshold() const { return manifest().threshold; }
  // The bundle's calibration record (read and checked at open), if it has one.
  const std::optional<Calibration>& calibration() const;
  // 'tensorrt', 'onnxruntime' or 'openvino'.
  std::string backend_name() const;
  // What runs the graphs, e.g. "openvino CPU f32" or the GPU name.
  std::string provider() const;
  // Backend name -> why auto selection passed over it (empty for an explicit backend).
  const std::map<std::string, std::string>& skipped() const;
  // Images per graph call by default: the backend's limit, else kDefaultMaxBatch.
  int max_batch() const;
  // One line: backend, provider, bundle, and the skipped backends with their reasons.
  std::string describe() const;

 private:
  struct Impl;
  explicit Detector(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cops
