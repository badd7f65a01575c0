// Manifest parsing and bundle verification: a valid schema-2 bundle opens, and each thing the
// Python runtime refuses is refused with a message naming the file or key and the fix.
#include <functional>

#include "bundle_fixture.hpp"

namespace {

using cops_test::BundleFixture;
using cops_test::json;
using cops_test::write_file;
namespace fs = std::filesystem;

TEST_F(BundleFixture, AValidBundleOpensWithEverythingFromTheManifest) {
  const cops::Bundle bundle = open();
  EXPECT_TRUE(bundle.verified);
  const cops::Manifest& m = bundle.manifest;
  EXPECT_EQ(m.schema_version, 2);
  EXPECT_EQ(m.preprocess.size, 98);
  EXPECT_DOUBLE_EQ(m.preprocess.std[2], 0.27577711);
  EXPECT_EQ(m.graph("vision").inputs.at(0).name, "image");
  EXPECT_EQ(m.graph("vision").inputs.at(0).dims, (std::vector<std::int64_t>{-1, 3, 98, 98}));
  EXPECT_EQ(m.graph("head").outputs.at(1).name, "anomaly_map");
  EXPECT_EQ(m.files.size(), 3u);
  EXPECT_FALSE(m.threshold.has_value());
  EXPECT_TRUE(m.random_weights);
}

TEST_F(BundleFixture, ThresholdIsRead) {
  manifest_["threshold"] = 0.625;
  EXPECT_DOUBLE_EQ(*open().manifest.threshold, 0.625);
}

TEST_F(BundleFixture, RefusesATamperedHash) {
  write_file(root_ / "head.onnx", "HEAD GRAPH");  // same size, other bytes
  expect_refused({"'head.onnx'", "sha256", "tampered", "copy the whole bundle folder again"});
}

TEST_F(BundleFixture, WithoutVerifyTheHashIsNotReadButTheSizeIs) {
  write_file(root_ / "head.onnx", "HEAD GRAPH");
  EXPECT_FALSE(open(false).verified);
  write_file(root_ / "head.onnx", "head graph, longer");
  expect_refused({"'head.onnx'", "bytes"}, false);
}

TEST_F(BundleFixture, RefusesAWrongSize) {
  write_file(root_ / "vision.onnx.data", "vision weights and more");
  expect_refused({"'vision.onnx.data'", "23 bytes", "expects 14"});
}

TEST_F(BundleFixture, RefusesAMissingFile) {
  fs::remove(root_ / "vision.onnx.data");
  expect_refused({"'vision.onnx.data'", "missing", "role 'vision_onnx_data'"});
}

TEST_F(BundleFixture, RefusesAnExtraListedFileThatIsNotThere) {
  manifest_["files"].push_back({{"path", "tables/bias.npy"},
                                {"sha256", std::string(64, 'a')},
                                {"size", 10},
                                {"role", "table"}});
  expect_refused({"'tables/bias.npy'", "missing"});
}

TEST_F(BundleFixture, RefusesAPathListedTwice) {
  manifest_["files"].push_back(manifest_["files"][0]);
  expect_refused({"files[3].path", "vision.onnx", "a path listed once"});
}

TEST_F(BundleFixture, RefusesPathsEscapingTheBundle) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"../outside.onnx", "escapes the bundle"},
      {"tables/../../outside.onnx", "escapes the bundle"},
      {"/etc/passwd", "is absolute"},
      {"C:/model.onnx", "is absolute"},
      {"./vision.onnx", "not a canonical POSIX path"},
      {"tables//x.npy", "not a canonical POSIX path"},
      {"tables\\x.npy", "not a canonical POSIX path"},
      {"manifest.json", "reserved for the manifest"},
  };
  for (const auto& [path, why] : cases) {
    SCOPED_TRACE(path);
    json saved = manifest_;
    manifest_["files"][1]["path"] = path;
    try {
      open();
      ADD_FAILURE() << path << " was accepted";
    } catch (const cops::BundleError& exc) {
      EXPECT_NE(std::string(exc.what()).find(why), std::string::npos) << exc.what();
      EXPECT_NE(std::string(exc.what()).find("files[1].path"), std::string::npos) << exc.what();
    }
    manifest_ = saved;
  }
}

TEST_F(BundleFixture, RefusesASymlinkLeavingTheBundle) {
  const fs::path outside = root_.string() + "_outside";
  write_file(outside / "weights", "vision weights");
  fs::remove(root_ / "vision.onnx.data");
  fs::create_symlink(outside / "weights", root_ / "vision.onnx.data");
  expect_refused({"'vision.onnx.data'", "outside the bundle", "copy the file into the bundle"});
  fs::remove_all(outside);
}

TEST_F(BundleFixture, RefusesUnknownSchemaVersionsNamingBoth) {
  manifest_["schema_version"] = 1;
  expect_refused({"schema_version 1", "schema_version 2", "re-export"});
  manifest_["schema_version"] = 3;
  expect_refused({"schema_version 3", "newer", "schema_version 2"});
  manifest_["schema_version"] = "2";
  expect_refused({"'schema_version'", "an integer"});
}

TEST_F(BundleFixture, RefusesUnknownAndMissingKeys) {
  manifest_["head"] = {{"alpha", 0.3}};  // the schema-1 section
  expect_refused({"unknown key(s) ['head']", "<manifest>"});
  manifest_.erase("head");
  manifest_.erase("created");
  expect_refused({"'created' is missing"});
}

TEST_F(BundleFixture, RefusesBadValuesNamingTheKey) {
  const std::vector<std::tuple<std::string, std::function<void(json&)>, std::string>> cases = {
      {"files[0].sha256", [](json& m) { m["files"][0]["sha256"] = "ABC"; }, "64 lowercase hex"},
      {"files[0].size", [](json& m) { m["files"][0]["size"] = -1; }, "a byte count >= 0"},
      {"files[0].size", [](json& m) { m["files"][0]["size"] = 12.0; }, "a byte count >= 0"},
      {"preprocess.size", [](json& m) { m["preprocess"]["size"] = 0; }, "a positive integer"},
      {"preprocess.std", [](json& m) { m["preprocess"]["std"][1] = 0; }, "3 numbers > 0"},
      {"preprocess.mean", [](json& m) { m["preprocess"]["mean"] = {1, 2}; }, "a list of 3"},
      {"preprocess.interpolation", [](json& m) { m["preprocess"]["interpolation"] = "area"; },
       "bicubic"},
      {"graphs.vision.inputs[0].dtype",
       [](json& m) { m["graphs"]["vision"]["inputs"][0]["dtype"] = "float8"; }, "float32"},
      {"graphs.vision.inputs[0].shape[0]",
       [](json& m) { m["graphs"]["vision"]["inputs"][0]["shape"][0] = -1; }, "a dim name"},
      {"graphs.head.file", [](json& m) { m["graphs"]["head"]["file"] = "other.onnx"; },
       "one of the listed files"},
      {"threshold", [](json& m) { m["threshold"] = "0.5"; }, "a finite number or null"},
      {"provenance", [](json& m) { m["provenance"]["random_weights"] = false; },
       "at least one weight hash"},
      {"engines.vision.engine",
       [](json& m) {
         m["engines"]["vision.engine"] = {{"onnx_sha256", std::string(64, 'a')},
                                          {"tensorrt_version", "10"}, {"gpu_name", "x"},
                                          {"compute_capability", "9.0"}, {"precision", "fp16"},
                                          {"profile", "1-8"}};
       },
       "a listed file"},
  };
  for (const auto& [key, edit, valid] : cases) {
    SCOPED_TRACE(key);
    json saved = manifest_;
    edit(manifest_);
    try {
      open();
      ADD_FAILURE() << key << " was accepted";
    } catch (const cops::BundleError& exc) {
      EXPECT_NE(std::string(exc.what()).find("'" + key + "'"), std::string::npos) << exc.what();
      EXPECT_NE(std::string(exc.what()).find(valid), std::string::npos) << exc.what();
    }
    manifest_ = saved;
  }
}

TEST_F(BundleFixture, RefusesAPreprocessThatDiffersFromTheModelConfig) {
  manifest_["model_config"]["preprocess"]["size"] = 336;
  expect_refused({"model_config.preprocess", "differs from 'preprocess'"});
}

TEST_F(BundleFixture, RefusesABundleWithoutARequiredGraphRole) {
  manifest_["files"][2]["role"] = "head_onnx_old";
  expect_refused({"required role(s) ['head_onnx']"});
}

TEST_F(BundleFixture, RefusesInvalidJsonAndAMissingManifest) {
  write_file(root_ / "manifest.json", "{\"schema_version\": 2,");
  EXPECT_THROW(cops::open_bundle(root_), cops::BundleError);
  fs::remove(root_ / "manifest.json");
  try {
    cops::open_bundle(root_);
    FAIL();
  } catch (const cops::BundleError& exc) {
    EXPECT_NE(std::string(exc.what()).find("has no manifest.json"), std::string::npos);
  }
  EXPECT_THROW(cops::open_bundle(root_ / "nope"), cops::BundleError);
}

TEST(Sha256, MatchesAKnownDigest) {
  const fs::path path = fs::temp_directory_path() / ("cops_sha_" + std::to_string(getpid()));
  write_file(path, "abc");
  EXPECT_EQ(cops::sha256_file(path),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  fs::remove(path);
}

}  // namespace
