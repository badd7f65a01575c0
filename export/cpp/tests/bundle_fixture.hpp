// A small but complete schema-2 bundle in a fresh temporary folder, for the unit tests.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cops/errors.hpp"
#include "cops/manifest.hpp"

namespace cops_test {

namespace fs = std::filesystem;
using nlohmann::json;

inline void write_file(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

inline json tensor(const std::string& name, json shape) {
  return {{"name", name}, {"dtype", "float32"}, {"shape", std::move(shape)}};
}

// Graph files are stand-ins: enough for every check made before a backend loads a graph.
class BundleFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    root_ = fs::temp_directory_path() /
            ("cops_manifest_" + std::string(info->name()) + "_" + std::to_string(getpid()));
    fs::remove_all(root_);
    fs::create_directories(root_);
    const json pre = {{"size", 98},
                      {"interpolation", "bicubic"},
                      {"mean", {0.48145466, 0.4578275, 0.40821073}},
                      {"std", {0.26862954, 0.26130258, 0.27577711}}};
    manifest_ = {
        {"schema_version", 2},
        {"package_version", "0.1.0"},
        {"model_config", {{"name", "cops-tiny"}, {"preprocess", pre}}},
        {"preprocess", pre},
        {"graphs",
         {{"vision",
           {{"file", "vision.onnx"},
            {"inputs", {tensor("image", {"batch", 3, 98, 98})}},
            {"outputs", {tensor("image_embedding", {"batch", 96}),
                         tensor("patch_embedding", {"batch", 49, 96})}}}},
          {"head",
           {{"file", "head.onnx"},
            {"inputs", {tensor("image_embedding", {"batch", 96}),
                        tensor("patch_embedding", {"batch", 49, 96})}},
            {"outputs", {tensor("pred_score", {"batch"}),
                         tensor("anomaly_map", {"batch", 98, 98})}}}}}},
        {"files", json::array()},
        {"provenance", {{"random_weights", true}, {"checkpoint_sha256", nullptr},
                        {"clip_sha256", nullptr}}},
        {"engines", json::object()},
        {"parity", json::object()},
        {"threshold", nullptr},
        {"created", "2026-01-01T00:00:00+00:00"},
        {"tool_versions", {{"cops_deploy", "0.1.0"}}}};
    add_file("vision.onnx", "vision graph", "vision_onnx");
    add_file("vision.onnx.data", "vision weights", "vision_onnx_data");
    add_file("head.onnx", "head graph", "head_onnx");
  }

  void TearDown() override { fs::remove_all(root_); }

  void add_file(const std::string& path, const std::string& content, const std::string& role) {
    write_file(root_ / path, content);
    manifest_["files"].push_back({{"path", path},
                                  {"sha256", cops::sha256_file(root_ / path)},
                                  {"size", content.size()},
                                  {"role", role}});
  }

  // Write manifest.json; returns the bundle folder.
  const fs::path& write() {
    write_file(root_ / "manifest.json", manifest_.dump(2));
    return root_;
  }

  cops::Bundle open(bool verify = true) { return cops::open_bundle(write(), verify); }

  // Opening must throw BundleError whose message holds every one of `parts`.
  void expect_refused(const std::vector<std::string>& parts, bool verify = true) {
    try {
      open(verify);
      FAIL() << "the bundle was accepted";
    } catch (const cops::BundleError& exc) {
      const std::string message = exc.what();
      for (const auto& part : parts) {
        EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
      }
      EXPECT_NE(message.find("Fix:"), std::string::npos) << message;
    }
  }

  fs::path root_;
  json manifest_;
};

}  // namespace cops_test
