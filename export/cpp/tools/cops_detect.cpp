// cops-detect: score images with a bundle from C++ and write the results as JSON.
//
//   cops-detect BUNDLE IMAGES... --json OUT [--backend auto|tensorrt|onnxruntime|openvino]
//               [--threads N] [--batch-size N] [--maps DIR] [--no-verify] [--warmup]
//
// IMAGES are files or folders (searched recursively for image suffixes, hidden entries skipped,
// sorted), as `cops predict`. OUT gets the fields `cops predict` writes to scores.json (bundle,
// backend, provider, precision, threshold, results[{source, score, visual, height, width}],
// failures[{source, error}]); visual is null (no picture is drawn), and each result also has
// "anomalous" (the decision, null without a threshold), "regions" (with a calibration record:
// the defect regions at the original size, {x, y, width, height, area, peak, mean} each, as
// Python's Prediction.regions; null without one) and, with --maps, "map": the file name of its
// anomaly map in DIR (.npy, float32, S x S). Top level: "pixel_threshold" and "min_area" of the
// calibration record (null without one). "timing" gives seconds to open the bundle
// and to predict (decoding included; with --warmup, after one untimed batch). Exit status: 0,
// 1 when an image could not be read (the others are still scored), 2 on a usage error or a
// refused bundle.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "cops/detector.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The suffixes a folder is searched for (any case): cops_deploy.imaging.IMAGE_EXTENSIONS.
const std::set<std::string> kImageExtensions = {".png",  ".jpg", ".jpeg", ".bmp",
                                                ".tif",  ".tiff", ".webp"};

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// A path as Python's str(Path(p)) writes it ("./a//b/" -> "a/b"), so sources match `cops predict`.
std::string as_python(const fs::path& path) {
  for (const auto& part : path) {
    if (part == "..") return path.string();  // Python keeps '..'; lexically_normal would not
  }
  std::string text = path.lexically_normal().string();
  while (text.size() > 1 && text.back() == '/') text.pop_back();
  return text.empty() ? "." : text;
}

bool hidden_below(const fs::path& rel) {
  for (const auto& part : rel) {
    const std::string name = part.string();
    if (!name.empty() && name[0] == '.') return true;
  }
  return false;
}

// Files named explicitly are kept whatever their suffix (and reported if unreadable);
// folders give their image files. A file reached twice is listed once.
std::vector<fs::path> expand_inputs(const std::vector<std::string>& inputs) {
  std::vector<fs::path> out;
  std::set<fs::path> seen;
  auto add = [&](const fs::path& p) {
    std::error_code ec;
    const fs::path key = fs::weakly_canonical(p, ec);
    if (seen.insert(ec ? p : key).second) out.push_back(p);
  };
  for (const auto& raw : inputs) {
    const fs::path p(raw);
    std::error_code ec;
    if (fs::is_directory(p, ec)) {
      std::vector<fs::path> found;
      for (auto it = fs::recursive_directory_iterator(p); it != fs::recursive_directory_iterator();
           ++it) {
        const fs::path rel = fs::relative(it->path(), p);
        if (hidden_below(rel)) {
          if (it->is_directory()) it.disable_recursion_pending();
          continue;
        }
        if (it->is_regular_file() && kImageExtensions.count(lower(it->path().extension().string()))) {
          found.push_back(it->path());
        }
      }
      std::sort(found.begin(), found.end());
      for (const auto& f : found) add(f);
    } else if (fs::exists(p, ec)) {
      add(p);
    } else {
      throw cops::ImageError("input path '" + raw +
                             "' does not exist; valid: an existing image file or a folder of "
                             "images. Fix: check the path (relative paths start from the working "
                             "directory, '" + fs::current_path().string() + "').");
    }
  }
  return out;
}

// A float32 (S, S) array as .npy (format 1.0): a fixed 10-byte preamble, a padded header dict,
// the raw little-endian data. Fifteen lines; no C++ .npy library is packaged for Debian.
void write_npy(const fs::path& path, const std::vector<float>& data, int size) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" +
                       std::to_string(size) + ", " + std::to_string(size) + "), }";
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  const unsigned char preamble[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
  out.write(reinterpret_cast<const char*>(preamble), 8);
  const auto n = static_cast<std::uint16_t>(header.size());
  const char len[2] = {static_cast<char>(n & 0xFF), static_cast<char>(n >> 8)};
  out.write(len, 2);
  out << header;
  out.write(reinterpret_cast<const char*>(data.data()),
            static_cast<std::streamsize>(data.size() * sizeof(float)));
  if (!out) throw cops::Error("cannot write " + path.string() + ". Fix: check --maps is writable.");
}

std::string unique_name(const fs::path& source, size_t index, std::set<std::string>* used,
                        const std::string& suffix) {
  std::string name = source.stem().string() + suffix;
  if (used->count(name)) {
    char buf[16];
    std::snprintf(buf, sizeof(buf), "_%05zu", index);
    name = source.stem().string() + buf + suffix;
  }
  used->insert(name);
  return name;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int run(const std::string& bundle_dir, const std::vector<std::string>& inputs,
        const std::string& json_out, const std::string& maps_dir, cops::DetectorOptions options,
        int batch_size, bool warmup) {
  const std::vector<fs::path> files = expand_inputs(inputs);  // a missing input fails first
  if (!maps_dir.empty()) fs::create_directories(maps_dir);
  const auto t_open = std::chrono::steady_clock::now();
  const cops::Detector detector = cops::Detector::open(bundle_dir, options);
  const double open_s = seconds_since(t_open);
  std::cerr << "cops-detect: " << detector.describe() << "\n";
  const int batch = batch_size > 0 ? batch_size : detector.max_batch();
  if (warmup) {  // first inferences pay for memory allocation and kernel selection
    cops::RgbImage grey;
    grey.width = grey.height = detector.input_size();
    grey.data.assign(static_cast<size_t>(grey.width) * grey.height * 3, 128);
    detector.predict(std::vector<cops::RgbImage>(static_cast<size_t>(batch), grey), batch);
  }

  json results = json::array(), failures = json::array();
  std::set<std::string> used;
  std::vector<std::pair<fs::path, cops::RgbImage>> pending;
  double predict_s = 0.0;
  auto flush = [&]() {
    if (pending.empty()) return;
    std::vector<cops::RgbImage> images;
    for (auto& item : pending) images.push_back(std::move(item.second));
    const auto t = std::chrono::steady_clock::now();
    const auto preds = detector.predict(images, batch);
    predict_s += seconds_since(t);
    for (size_t i = 0; i < preds.size(); ++i) {
      const auto& p = preds[i];
      json record = {{"source", as_python(pending[i].first)},
                     {"score", static_cast<double>(p.score)},
                     {"visual", nullptr},
                     {"height", p.original_height},
                     {"width", p.original_width},
                     {"anomalous", p.is_anomalous ? json(*p.is_anomalous) : json(nullptr)},
                     {"regions", nullptr}};
      if (p.regions) {
        json regions = json::array();
        for (const auto& r : *p.regions) {
          regions.push_back({{"x", r.x}, {"y", r.y}, {"width", r.width}, {"height", r.height},
                             {"area", r.area}, {"peak", r.peak}, {"mean", r.mean}});
        }
        record["regions"] = regions;
      }
      if (!maps_dir.empty()) {
        const std::string name = unique_name(pending[i].first, results.size(), &used, ".npy");
        write_npy(fs::path(maps_dir) / name, p.anomaly_map, p.map_size);
        record["map"] = name;
      }
      results.push_back(record);
    }
    pending.clear();
  };
  const auto t_all = std::chrono::steady_clock::now();
  for (const auto& path : files) {
    try {
      const auto t = std::chrono::steady_clock::now();
      pending.emplace_back(path, cops::load_image(path));
      predict_s += seconds_since(t);  // decoding counts as prediction time, as in Python
    } catch (const cops::ImageError& exc) {
      failures.push_back({{"source", as_python(path)}, {"error", exc.what()}});
      std::cerr << "skipped " << path.string() << ": " << exc.what() << "\n";
      continue;
    }
    if (static_cast<int>(pending.size()) >= batch) flush();
  }
  flush();
  const double total_s = seconds_since(t_all);
  const auto scored = results.size();
  json payload = {
      {"bundle", as_python(bundle_dir)},
      {"backend", detector.backend_name()},
      {"provider", detector.provider()},
      {"precision", "fp32"},
      {"threshold", detector.threshold() ? json(*detector.threshold()) : json(nullptr)},
      {"pixel_threshold",
       detector.calibration() ? json(detector.calibration()->pixel_threshold) : json(nullptr)},
      {"min_area", detector.calibration() ? json(detector.calibration()->min_area) : json(nullptr)},
      {"results", results},
      {"failures", failures},
      {"timing",
       {{"open_s", open_s},
        {"predict_s", predict_s},
        {"total_s", total_s},
        {"images", scored},
        {"per_image_s", scored ? predict_s / static_cast<double>(scored) : 0.0}}}};
  const fs::path out(json_out);
  if (out.has_parent_path()) fs::create_directories(out.parent_path());
  const fs::path tmp = out.string() + ".tmp";
  {
    std::ofstream file(tmp);
    file << payload.dump(2) << "\n";
    if (!file) throw cops::Error("cannot write " + tmp.string() + ". Fix: check --json is writable.");
  }
  fs::rename(tmp, out);
  std::cout << "wrote " << scored << " result(s) to " << json_out;
  if (detector.threshold()) {
    size_t anomalous = 0;
    for (const auto& r : results) anomalous += r["anomalous"] == true ? 1 : 0;
    std::cout << "; " << anomalous << " anomalous at threshold " << *detector.threshold();
  }
  if (!failures.empty()) std::cout << "; " << failures.size() << " file(s) failed";
  std::cout << "\n";
  return failures.empty() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Score images with a cops bundle (C++); writes the fields of `cops predict`."};
  std::string bundle, json_out, maps_dir;
  std::vector<std::string> inputs;
  cops::DetectorOptions options;
  int batch_size = 0;
  bool no_verify = false;
  bool warmup = false;
  app.add_option("bundle", bundle, "bundle folder written by cops-export")->required();
  app.add_option("images", inputs, "image files or folders")->required();
  app.add_option("--json", json_out, "where to write the results (JSON)")->required();
  app.add_option("--backend", options.backend, "auto, tensorrt, onnxruntime or openvino")
      ->check(CLI::IsMember({"auto", "tensorrt", "onnxruntime", "openvino"}));
  app.add_option("--threads", options.threads, "inference threads; 0: one per core")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--batch-size", batch_size, "images per graph call; 0: the backend's maximum")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--maps", maps_dir, "also write each anomaly map as DIR/<name>.npy");
  app.add_flag("--no-verify", no_verify, "skip the sha256 check of the bundle files");
  app.add_flag("--warmup", warmup, "run one untimed batch before timing");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& exc) {
    const int status = app.exit(exc);
    return status == 0 ? 0 : 2;
  }
  options.verify = !no_verify;
  try {
    return run(bundle, inputs, json_out, maps_dir, options, batch_size, warmup);
  } catch (const cops::Error& exc) {
    std::cerr << "cops-detect: error: " << exc.what() << "\n";
    return 2;
  } catch (const std::exception& exc) {
    std::cerr << "cops-detect: error: " << exc.what() << "\n";
    return 2;
  }
}
