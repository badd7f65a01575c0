// The calibration record (cops::load_calibration) on stand-in bundles, and the defect regions
// (cops::defect_regions) on constructed maps: the threshold boundary, two blobs, min_area,
// 8-connectivity, refusals. tests/edge/test_cpp.py compares both with the Python runtime.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "bundle_fixture.hpp"
#include "cops/calibration.hpp"

namespace {

using cops_test::BundleFixture;
using cops_test::json;

json record(double image, double pixel, int min_area) {
  const json part = {{"threshold", image}, {"method", "fpr"}, {"target_fpr", 0.1},
                     {"achieved", json::object()}};
  json r = {{"calibration_version", 1}, {"image", part}, {"pixel", part}, {"min_area", min_area}};
  r["pixel"]["threshold"] = pixel;
  return r;
}

class Calibration : public BundleFixture {
 protected:
  std::string load_error() {
    try {
      cops::load_calibration(open(false));
    } catch (const cops::BundleError& exc) {
      return exc.what();
    }
    ADD_FAILURE() << "the record was accepted";
    return "";
  }
};

TEST_F(Calibration, NoRecordNoCalibration) {
  EXPECT_FALSE(cops::load_calibration(open()).has_value());
}

TEST_F(Calibration, TheListedRecordIsRead) {
  add_file("calibration-0123.json", record(0.625, 0.5, 7).dump(), "calibration");
  manifest_["threshold"] = 0.625;
  const auto cal = cops::load_calibration(open());
  ASSERT_TRUE(cal.has_value());
  EXPECT_EQ(cal->image_threshold, 0.625);
  EXPECT_EQ(cal->pixel_threshold, 0.5);
  EXPECT_EQ(cal->min_area, 7);
  EXPECT_EQ(cal->file, "calibration-0123.json");
  EXPECT_EQ(cal->image_method, "fpr");
}

TEST_F(Calibration, ATamperedRecordIsRefused) {
  add_file("calibration-0123.json", record(0.625, 0.5, 7).dump(), "calibration");
  manifest_["threshold"] = 0.625;
  write();
  std::string text = record(0.625, 0.4, 7).dump();  // same size, another pixel threshold
  cops_test::write_file(root_ / "calibration-0123.json", text);
  EXPECT_NE(load_error().find("changed after calibration"), std::string::npos);
}

TEST_F(Calibration, AThresholdThatDisagreesWithTheManifestIsRefused) {
  add_file("calibration-0123.json", record(0.625, 0.5, 7).dump(), "calibration");
  manifest_["threshold"] = 0.5;
  EXPECT_NE(load_error().find("valid: equal"), std::string::npos);
}

TEST_F(Calibration, InvalidValuesAreRefused) {
  add_file("calibration-0123.json", record(0.625, 0.5, 0).dump(), "calibration");
  manifest_["threshold"] = 0.625;
  EXPECT_NE(load_error().find("'min_area' is 0"), std::string::npos);
}

TEST(DefectRegions, APixelExactlyAtTheThresholdIsDefective) {
  std::vector<float> map(25, 0.0f);
  map[2 * 5 + 3] = 0.5f;
  map[0] = std::nextafter(0.5f, 0.0f);
  std::vector<std::uint8_t> mask;
  const auto regions = cops::defect_regions(map.data(), 5, 5, 0.5, 1, &mask);
  ASSERT_EQ(regions.size(), 1u);
  EXPECT_EQ(regions[0].x, 3);
  EXPECT_EQ(regions[0].y, 2);
  EXPECT_EQ(regions[0].area, 1);
  EXPECT_EQ(mask[2 * 5 + 3], 1);
  EXPECT_EQ(mask[0], 0);
}

TEST(DefectRegions, TwoBlobsMinAreaAndDiagonals) {
  const int h = 40, w = 60;
  std::vector<float> map(static_cast<size_t>(h) * w, 0.1f);
  for (int y = 2; y < 6; ++y) for (int x = 3; x < 8; ++x) map[y * w + x] = 0.7f;
  for (int y = 20; y < 30; ++y) for (int x = 40; x < 50; ++x) map[y * w + x] = 0.6f;
  map[25 * w + 45] = 0.95f;
  map[30 * w + 50] = 0.6f;  // diagonal neighbour of (29, 49): same region
  auto regions = cops::defect_regions(map.data(), h, w, 0.5, 1);
  ASSERT_EQ(regions.size(), 2u);
  EXPECT_EQ(regions[0].width, 5);
  EXPECT_EQ(regions[0].height, 4);
  EXPECT_EQ(regions[0].area, 20);
  EXPECT_EQ(regions[1].area, 101);
  EXPECT_EQ(regions[1].width, 11);
  EXPECT_FLOAT_EQ(static_cast<float>(regions[1].peak), 0.95f);
  std::vector<std::uint8_t> mask;
  regions = cops::defect_regions(map.data(), h, w, 0.5, 21, &mask);
  ASSERT_EQ(regions.size(), 1u);
  EXPECT_EQ(mask[3 * w + 4], 0);  // the small blob left the mask too
}

TEST(DefectRegions, InvalidArgumentsAreRefused) {
  std::vector<float> map(4, 0.0f);
  EXPECT_THROW(cops::defect_regions(map.data(), 2, 2, NAN, 1), cops::ConfigError);
  EXPECT_THROW(cops::defect_regions(map.data(), 2, 2, 0.5, 0), cops::ConfigError);
}

}  // namespace
