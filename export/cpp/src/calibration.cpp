// The calibration record and defect regions: the rules of cops/calibration.hpp.
#include "cops/calibration.hpp"

#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cops/errors.hpp"

namespace cops {
namespace {

using nlohmann::json;

double threshold_of(const json& data, const std::string& part, const std::string& where) {
  if (!data.contains(part) || !data[part].is_object() || !data[part].contains("threshold") ||
      !data[part]["threshold"].is_number() ||
      !std::isfinite(data[part]["threshold"].get<double>())) {
    throw BundleError(where + ": key '" + part + ".threshold' is missing or not a finite number. "
                      "Fix: run `cops calibrate` on the bundle again.");
  }
  return data[part]["threshold"].get<double>();
}

std::string method_of(const json& data, const std::string& part) {
  const json& m = data[part].value("method", json());
  return m.is_string() ? m.get<std::string>() : "";
}

}  // namespace

std::optional<Calibration> load_calibration(const Bundle& bundle) {
  const auto entries = bundle.manifest.with_role(kCalibrationRole);
  const std::string fix =
      "Fix: run `cops calibrate " + bundle.root.string() + " --normal DIR` again.";
  if (entries.empty()) return std::nullopt;
  if (entries.size() > 1) {
    throw BundleError("bundle " + bundle.root.string() + " lists " +
                      std::to_string(entries.size()) +
                      " calibration records; valid: at most one. " + fix);
  }
  const FileEntry& entry = entries.front();
  const std::string where =
      "bundle " + bundle.root.string() + ": calibration record '" + entry.path + "'";
  const std::string actual = sha256_file(bundle.path_of(entry));
  if (actual != entry.sha256) {
    throw BundleError(where + " has sha256 " + actual + ", the manifest expects " + entry.sha256 +
                      " (changed after calibration). " + fix);
  }
  std::ifstream in(bundle.path_of(entry), std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  json data;
  try {
    data = json::parse(text.str());
  } catch (const json::exception& exc) {
    throw BundleError(where + " is not valid JSON (" + exc.what() + "). " + fix);
  }
  if (!data.is_object() || data.value("calibration_version", json()) != json(1)) {
    throw BundleError(where + ": 'calibration_version' is not 1; valid: 1. " + fix);
  }
  Calibration cal;
  cal.file = entry.path;
  cal.image_threshold = threshold_of(data, "image", where);
  cal.pixel_threshold = threshold_of(data, "pixel", where);
  cal.image_method = method_of(data, "image");
  cal.pixel_method = method_of(data, "pixel");
  const json& area = data.value("min_area", json());
  if (!area.is_number_integer() || area.get<std::int64_t>() < 1 ||
      area.get<std::int64_t>() > std::numeric_limits<int>::max()) {
    throw BundleError(where + ": key 'min_area' is " + area.dump() +
                      "; valid: an integer >= 1. " + fix);
  }
  cal.min_area = area.get<int>();
  if (!bundle.manifest.threshold || *bundle.manifest.threshold != cal.image_threshold) {
    throw BundleError("bundle " + bundle.root.string() + ": manifest key 'threshold' differs "
                      "from the image threshold of calibration record '" + entry.path +
                      "'; valid: equal (cops calibrate writes both). " + fix);
  }
  return cal;
}

std::vector<Region> defect_regions(const float* map, int height, int width,
                                   double pixel_threshold, int min_area,
                                   std::vector<std::uint8_t>* mask) {
  if (!std::isfinite(pixel_threshold) || min_area < 1 || height < 1 || width < 1 || !map) {
    throw ConfigError("defect_regions: invalid arguments (threshold " +
                      std::to_string(pixel_threshold) + ", min_area " +
                      std::to_string(min_area) + ", size " + std::to_string(width) + "x" +
                      std::to_string(height) + "); valid: a finite threshold, min_area >= 1, "
                      "a map of at least 1x1.");
  }
  const size_t n = static_cast<size_t>(height) * width;
  // Labels by breadth-first flood fill started at each unlabelled defective pixel in raster
  // order: regions are numbered in raster order of their first pixel, as scipy.ndimage.label.
  std::vector<std::int32_t> labels(n, 0);
  std::vector<Region> found;
  std::vector<size_t> queue;
  for (size_t start = 0; start < n; ++start) {
    if (labels[start] != 0 || !(map[start] >= pixel_threshold)) continue;
    const auto label = static_cast<std::int32_t>(found.size() + 1);
    Region r;
    int x0 = width, y0 = height, x1 = -1, y1 = -1;
    double sum = 0.0, peak = -std::numeric_limits<double>::infinity();
    queue.assign(1, start);
    labels[start] = label;
    for (size_t head = 0; head < queue.size(); ++head) {
      const size_t p = queue[head];
      const int y = static_cast<int>(p / width), x = static_cast<int>(p % width);
      const double v = map[p];
      sum += v;
      peak = std::max(peak, v);
      x0 = std::min(x0, x), y0 = std::min(y0, y), x1 = std::max(x1, x), y1 = std::max(y1, y);
      for (int dy = -1; dy <= 1; ++dy) {
        for (int dx = -1; dx <= 1; ++dx) {
          const int yy = y + dy, xx = x + dx;
          if ((dy == 0 && dx == 0) || yy < 0 || yy >= height || xx < 0 || xx >= width) continue;
          const size_t q = static_cast<size_t>(yy) * width + xx;
          if (labels[q] == 0 && map[q] >= pixel_threshold) {
            labels[q] = label;
            queue.push_back(q);
          }
        }
      }
    }
    r.x = x0, r.y = y0, r.width = x1 - x0 + 1, r.height = y1 - y0 + 1;
    r.area = static_cast<std::int64_t>(queue.size());
    r.peak = peak;
    r.mean = sum / static_cast<double>(r.area);
    found.push_back(r);
  }
  std::vector<bool> keep(found.size() + 1, false);
  std::vector<Region> kept;
  for (size_t i = 0; i < found.size(); ++i) {
    if (found[i].area >= min_area) {
      keep[i + 1] = true;
      kept.push_back(found[i]);
    }
  }
  if (mask) {
    mask->assign(n, 0);
    for (size_t p = 0; p < n; ++p) (*mask)[p] = labels[p] != 0 && keep[labels[p]] ? 1 : 0;
  }
  return kept;
}

}  // namespace cops
