// cops::Detector: refusals made before any graph loads (stand-in bundles), then, when the
// environment names a real bundle (COPS_TEST_BUNDLE, a schema-2 cops-tiny bundle), prediction:
// buffers and files agree, batches and threads do not change results, the threshold decides.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <thread>

#include "bundle_fixture.hpp"
#include "cops/detector.hpp"

namespace {

using cops_test::BundleFixture;
using cops_test::json;
namespace fs = std::filesystem;

bool built(const std::string& backend) {
  const auto have = cops::available_backends();
  return std::find(have.begin(), have.end(), backend) != have.end();
}

template <typename E>
std::string message_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const E& exc) {
    return exc.what();
  }
  ADD_FAILURE() << "no exception of the expected type";
  return "";
}

class DetectorRefusals : public BundleFixture {
 protected:
  std::string refused(const cops::DetectorOptions& options = {}) {
    const fs::path root = write();
    return message_of<cops::Error>([&] { cops::Detector::open(root, options); });
  }
};

TEST_F(DetectorRefusals, UnknownBackendAndBadThreads) {
  cops::DetectorOptions options;
  options.backend = "cuda";
  const fs::path root = write();
  auto m = message_of<cops::ConfigError>([&] { cops::Detector::open(root, options); });
  EXPECT_NE(m.find("unknown backend 'cuda'"), std::string::npos) << m;
  EXPECT_NE(m.find("openvino"), std::string::npos) << m;
  options.backend = "auto";
  options.threads = -1;
  m = message_of<cops::ConfigError>([&] { cops::Detector::open(root, options); });
  EXPECT_NE(m.find("threads -1"), std::string::npos) << m;
}

TEST_F(DetectorRefusals, InterpolationOtherThanBicubic) {
  manifest_["preprocess"]["interpolation"] = "bilinear";
  manifest_["model_config"]["preprocess"]["interpolation"] = "bilinear";
  const std::string m = refused();
  EXPECT_NE(m.find("'bicubic' only"), std::string::npos) << m;
}

TEST_F(DetectorRefusals, VisionInputOfAnotherSizeThanThePreprocessing) {
  manifest_["graphs"]["vision"]["inputs"][0]["shape"] = {"batch", 3, 97, 97};
  const std::string m = refused();
  EXPECT_NE(m.find("(batch, 3, 98, 98)"), std::string::npos) << m;
}

TEST_F(DetectorRefusals, HeadWithoutAMapOrFedFromElsewhere) {
  json saved = manifest_;
  manifest_["graphs"]["head"]["outputs"].erase(1);
  EXPECT_NE(refused().find("must output a score"), std::string::npos);
  manifest_ = saved;
  manifest_["graphs"]["head"]["inputs"][0]["name"] = "text_embedding";
  EXPECT_NE(refused().find("'text_embedding' is not an output of graph 'vision'"),
            std::string::npos);
}

TEST_F(DetectorRefusals, ABackendNotBuiltHereIsNamedWithTheFix) {
  for (const std::string backend : {"onnxruntime", "tensorrt", "openvino"}) {
    if (built(backend)) continue;
    cops::DetectorOptions options;
    options.backend = backend;
    const std::string m = refused(options);
    EXPECT_NE(m.find("not built into this library"), std::string::npos) << m;
  }
}

TEST_F(DetectorRefusals, AGraphFileNoBackendCanReadGivesEachReason) {
  if (!built("openvino")) GTEST_SKIP() << "built without OpenVINO";
  const std::string m = refused();  // auto; the graph files are stand-ins
  EXPECT_NE(m.find("no backend can run bundle"), std::string::npos) << m;
  EXPECT_NE(m.find("openvino: OpenVINO"), std::string::npos) << m;
  EXPECT_NE(m.find("vision.onnx"), std::string::npos) << m;
}

// ---------------------------------------------------------------------------------------------
// With a real bundle

class RealBundle : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* path = std::getenv("COPS_TEST_BUNDLE");
    if (path == nullptr || !built("openvino")) return;
    cops::DetectorOptions options;
    options.backend = "openvino";
    options.threads = 2;
    detector_ = new cops::Detector(cops::Detector::open(path, options));
  }
  static void TearDownTestSuite() {
    delete detector_;
    detector_ = nullptr;
  }
  void SetUp() override {
    if (detector_ == nullptr) {
      GTEST_SKIP() << "set COPS_TEST_BUNDLE to a schema-2 bundle (and build with OpenVINO)";
    }
  }

  static cops::RgbImage image(int width, int height, int seed) {
    cops::RgbImage img;
    img.width = width;
    img.height = height;
    img.data.resize(static_cast<size_t>(width) * height * 3);
    unsigned state = 12345u + static_cast<unsigned>(seed);
    for (auto& v : img.data) {
      state = state * 1103515245u + 12345u;
      v = static_cast<std::uint8_t>(state >> 16);
    }
    return img;
  }

  static float max_diff(const std::vector<float>& a, const std::vector<float>& b) {
    float worst = 0.0f;
    for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
    return worst;
  }

  static cops::Detector* detector_;
};

cops::Detector* RealBundle::detector_ = nullptr;

TEST_F(RealBundle, PredictionHasTheManifestsSizesAndNoDecisionWithoutThreshold) {
  const cops::Prediction p = detector_->predict(image(40, 30, 1));
  const int s = detector_->manifest().preprocess.size;
  EXPECT_EQ(detector_->input_size(), s);
  EXPECT_EQ(p.map_size, s);
  EXPECT_EQ(p.anomaly_map.size(), static_cast<size_t>(s) * s);
  EXPECT_EQ(p.original_width, 40);
  EXPECT_EQ(p.original_height, 30);
  EXPECT_TRUE(std::isfinite(p.score));
  EXPECT_EQ(detector_->backend_name(), "openvino");
  EXPECT_EQ(detector_->provider(), "openvino CPU f32");
  if (!detector_->threshold()) EXPECT_FALSE(p.is_anomalous.has_value());
}

TEST_F(RealBundle, ABufferGivesTheSameAsTheImage) {
  const cops::RgbImage img = image(33, 21, 2);
  const cops::Prediction a = detector_->predict(img);
  const cops::Prediction b = detector_->predict(cops::ImageView{img.data.data(), 33, 21, 3, 0});
  EXPECT_EQ(a.score, b.score);
  EXPECT_EQ(a.anomaly_map, b.anomaly_map);
}

TEST_F(RealBundle, BatchesDoNotChangeResults) {
  const std::vector<cops::RgbImage> imgs = {image(50, 50, 3), image(20, 70, 4), image(99, 9, 5)};
  const auto batched = detector_->predict(imgs, 3);
  ASSERT_EQ(batched.size(), 3u);
  for (size_t i = 0; i < imgs.size(); ++i) {
    const cops::Prediction one = detector_->predict(imgs[i]);
    EXPECT_NEAR(batched[i].score, one.score, 1e-5);
    EXPECT_LT(max_diff(batched[i].anomaly_map, one.anomaly_map), 1e-4f);
  }
}

TEST_F(RealBundle, ConcurrentPredictCallsGiveTheSerialResults) {
  const cops::RgbImage img = image(64, 48, 6);
  const cops::Prediction want = detector_->predict(img);
  std::vector<cops::Prediction> got(4);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < got.size(); ++t) {
    threads.emplace_back([&, t] { got[t] = detector_->predict(img); });
  }
  for (auto& th : threads) th.join();
  for (const auto& p : got) {
    EXPECT_NEAR(p.score, want.score, 1e-6);
    EXPECT_LT(max_diff(p.anomaly_map, want.anomaly_map), 1e-5f);
  }
}

TEST_F(RealBundle, RefusesABatchSizeOverTheMaximumAndNamesAnUnreadableImage) {
  const std::vector<cops::RgbImage> one = {image(8, 8, 7)};
  EXPECT_THROW(detector_->predict(one, detector_->max_batch() + 1), cops::ConfigError);
  EXPECT_THROW(detector_->predict(one, -1), cops::ConfigError);
  const std::string m = message_of<cops::ImageError>(
      [&] { detector_->predict(std::vector<fs::path>{"/nonexistent/part.png"}); });
  EXPECT_NE(m.find("image 0 of 1"), std::string::npos) << m;
  EXPECT_NE(m.find("/nonexistent/part.png"), std::string::npos) << m;
}

TEST_F(RealBundle, TheThresholdDecides) {
  // A copy of the bundle with a threshold (manifest.json itself is not hashed).
  const fs::path src = std::getenv("COPS_TEST_BUNDLE");
  const fs::path copy = fs::temp_directory_path() / ("cops_threshold_" + std::to_string(getpid()));
  fs::remove_all(copy);
  fs::copy(src, copy, fs::copy_options::recursive);
  const cops::RgbImage img = image(30, 30, 8);
  const float score = detector_->predict(img).score;
  for (const double threshold : {static_cast<double>(score), static_cast<double>(score) + 1.0}) {
    std::ifstream in(copy / "manifest.json");
    json m = json::parse(in);
    m["threshold"] = threshold;
    std::ofstream(copy / "manifest.json") << m.dump(2);
    cops::DetectorOptions options;
    options.backend = "openvino";
    options.verify = false;
    const cops::Detector with = cops::Detector::open(copy, options);
    const cops::Prediction p = with.predict(img);
    ASSERT_TRUE(p.is_anomalous.has_value());
    EXPECT_EQ(*p.is_anomalous, p.score >= threshold);
    EXPECT_EQ(*p.threshold, threshold);
  }
  fs::remove_all(copy);
}

}  // namespace
