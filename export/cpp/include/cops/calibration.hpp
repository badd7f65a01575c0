// cops/calibration.hpp: the bundle's calibration record (written by `cops calibrate`), and the
// defect mask and regions of an anomaly map, with the Python runtime's rules
// (cops_deploy/runtime/calibration.py and cops_deploy/runtime/regions.py):
// - the record is the one file of role "calibration" the manifest lists (sha256 checked on
//   every read); its image threshold equals the manifest's "threshold";
// - a pixel is defective when map >= pixel_threshold;
// - regions are 8-connected, numbered in raster order of their first pixel; regions with fewer
//   than min_area pixels are dropped and leave the mask;
// - regions are found on the map resized to the original image (Pillow's bilinear 'F' resize).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cops/manifest.hpp"

namespace cops {

inline constexpr const char* kCalibrationRole = "calibration";

// The thresholds of a calibration record (the rest of the record is provenance).
struct Calibration {
  std::string file;              // bundle-relative path of the record
  double image_threshold = 0.0;  // score >= image_threshold: anomalous
  double pixel_threshold = 0.0;  // map >= pixel_threshold: defective pixel
  int min_area = 1;              // smallest region kept, pixels at the original size
  std::string image_method;      // "fpr" or "f1"
  std::string pixel_method;      // "fpr" or "f1"
};

// The bundle's calibration record, or none when it lists no file of role "calibration".
// Throws BundleError: several records, missing or changed record (sha256), invalid values, or
// an image threshold that differs from the manifest's "threshold".
std::optional<Calibration> load_calibration(const Bundle& bundle);

// One defect region in the pixels of the map it was found on.
struct Region {
  int x = 0, y = 0;           // top-left pixel of the bounding box
  int width = 0, height = 0;  // the box covers columns x..x+width-1, rows y..y+height-1
  std::int64_t area = 0;      // pixels in the region
  double peak = 0.0;          // largest map value in the region
  double mean = 0.0;          // mean map value over the region
};

// Mask (height * width, 1: defective) and regions of a row-major (height, width) map.
// Throws ConfigError on a non-finite threshold, min_area < 1 or a bad size.
std::vector<Region> defect_regions(const float* map, int height, int width,
                                   double pixel_threshold, int min_area,
                                   std::vector<std::uint8_t>* mask = nullptr);

}  // namespace cops
