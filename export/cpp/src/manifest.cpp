// Manifest parsing (nlohmann::json) and bundle verification (sizes, OpenSSL sha256, containment).
// Mirrors cops_deploy/runtime/bundle.py: the same keys, the same refusals, messages that name the
// key or file, the value, what is valid, and the fix.
#include "cops/manifest.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "cops/errors.hpp"

namespace cops {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const char* const kReexport =
    "Fix: re-export the bundle with cops-export (do not edit manifest.json by hand).";
const char* const kCopyAgain = "Fix: copy the whole bundle folder again, or re-export it.";
const std::vector<std::string> kInterpolations = {"bicubic", "bilinear", "nearest"};
const std::vector<std::string> kDtypes = {"float32", "float16", "bfloat16", "float64", "int64",
                                          "int32",   "int8",    "uint8",    "bool"};
const std::vector<std::string> kRequiredRoles = {"vision_onnx", "head_onnx"};
// Top-level keys of a schema-2 manifest (schema 1 had "head" too; schema 2 refuses it).
const std::vector<std::string> kTopKeys = {
    "created",    "engines",  "files",      "graphs",  "model_config", "package_version",
    "parity",     "preprocess", "provenance", "schema_version", "threshold", "tool_versions"};

std::string join(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", '" : "'") + items[i] + "'";
  return out + "]";
}

std::string shortened(const json& value) {
  std::string text = value.dump();
  return text.size() <= 80 ? text : text.substr(0, 77) + "...";
}

std::string dotted(const std::string& where, const std::string& key) {
  return where.empty() ? key : where + "." + key;
}

std::string indexed(const std::string& where, size_t i) {
  return where + "[" + std::to_string(i) + "]";
}

[[noreturn]] void bad(const std::string& key, const json& value, const std::string& valid) {
  throw BundleError("manifest key '" + key + "' is " + shortened(value) + "; valid: " + valid +
                    ". " + kReexport);
}

void require(bool ok, const std::string& key, const json& value, const std::string& valid) {
  if (!ok) bad(key, value, valid);
}

bool is_int(const json& v) { return v.is_number_integer(); }  // false for bool and 1.0
bool is_finite(const json& v) { return v.is_number() && std::isfinite(v.get<double>()); }

// `value` must be an object whose keys are all in `allowed`.
const json& object(const json& value, const std::string& where, std::vector<std::string> allowed) {
  const std::string name = where.empty() ? "<manifest>" : where;
  require(value.is_object(), name, value, "a JSON object");
  std::sort(allowed.begin(), allowed.end());
  std::vector<std::string> unknown;
  for (const auto& item : value.items()) {
    if (!std::binary_search(allowed.begin(), allowed.end(), item.key())) {
      unknown.push_back(item.key());
    }
  }
  if (!unknown.empty()) {
    throw BundleError("manifest object '" + name + "' has unknown key(s) " + join(unknown) +
                      "; valid keys: " + join(allowed) + ". " + kReexport);
  }
  return value;
}

const json& field(const json& data, const std::string& key, const std::string& where) {
  auto it = data.find(key);
  if (it == data.end()) {
    throw BundleError("manifest key '" + dotted(where, key) + "' is missing; a schema-" +
                      std::to_string(kSchemaVersion) + " manifest needs it. " + kReexport);
  }
  return *it;
}

std::string str_field(const json& data, const std::string& key, const std::string& where) {
  const json& v = field(data, key, where);
  require(v.is_string(), dotted(where, key), v, "a string");
  return v.get<std::string>();
}

double float_field(const json& v, const std::string& key) {
  require(is_finite(v), key, v, "a finite number");
  return v.get<double>();
}

bool is_sha256(const std::string& s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

FileEntry parse_file(const json& raw, const std::string& where) {
  const json& data = object(raw, where, {"path", "sha256", "size", "role"});
  FileEntry entry;
  entry.path = str_field(data, "path", where);
  check_relative_path(entry.path, "manifest key '" + dotted(where, "path") + "'");
  entry.sha256 = str_field(data, "sha256", where);
  require(is_sha256(entry.sha256), dotted(where, "sha256"), entry.sha256, "64 lowercase hex digits");
  const json& size = field(data, "size", where);
  require(is_int(size) && size.get<std::int64_t>() >= 0, dotted(where, "size"), size,
          "a byte count >= 0");
  entry.size = size.get<std::uint64_t>();
  entry.role = str_field(data, "role", where);
  require(!entry.role.empty(), dotted(where, "role"), entry.role, "a non-empty role name");
  return entry;
}

TensorSpec parse_tensor(const json& raw, const std::string& where) {
  const json& data = object(raw, where, {"name", "dtype", "shape"});
  TensorSpec spec;
  spec.name = str_field(data, "name", where);
  require(!spec.name.empty(), dotted(where, "name"), spec.name, "a non-empty tensor name");
  spec.dtype = str_field(data, "dtype", where);
  require(std::find(kDtypes.begin(), kDtypes.end(), spec.dtype) != kDtypes.end(),
          dotted(where, "dtype"), spec.dtype, join(kDtypes));
  const json& shape = field(data, "shape", where);
  require(shape.is_array(), dotted(where, "shape"), shape, "a JSON list");
  for (size_t i = 0; i < shape.size(); ++i) {
    const json& dim = shape[i];
    const bool named = dim.is_string() && !dim.get<std::string>().empty();
    const bool sized = is_int(dim) && dim.get<std::int64_t>() >= 0;
    require(named || sized, indexed(dotted(where, "shape"), i), dim, "an int >= 0 or a dim name");
    spec.dims.push_back(sized ? dim.get<std::int64_t>() : -1);
    spec.dim_names.push_back(named ? dim.get<std::string>() : std::string());
  }
  return spec;
}

GraphIO parse_graph(const json& raw, const std::string& where) {
  const json& data = object(raw, where, {"file", "inputs", "outputs"});
  GraphIO graph;
  graph.file = str_field(data, "file", where);
  check_relative_path(graph.file, "manifest key '" + dotted(where, "file") + "'");
  std::vector<std::string> names;
  for (const char* key : {"inputs", "outputs"}) {
    const std::string list_key = dotted(where, key);
    const json& list = field(data, key, where);
    require(list.is_array(), list_key, list, "a JSON list");
    auto& specs = std::string(key) == "inputs" ? graph.inputs : graph.outputs;
    for (size_t i = 0; i < list.size(); ++i) {
      specs.push_back(parse_tensor(list[i], indexed(list_key, i)));
      names.push_back(specs.back().name);
    }
  }
  std::set<std::string> seen, dupes;
  for (const auto& n : names) {
    if (!seen.insert(n).second) dupes.insert(n);
  }
  require(dupes.empty(), where, json(std::vector<std::string>(dupes.begin(), dupes.end())),
          "unique tensor names across inputs and outputs");
  return graph;
}

PreprocessCfg parse_preprocess(const json& raw, const std::string& where) {
  const json& data = object(raw, where, {"size", "mean", "std", "interpolation"});
  PreprocessCfg cfg;
  const json& size = field(data, "size", where);
  require(is_int(size) && size.get<std::int64_t>() > 0 && size.get<std::int64_t>() <= 65535,
          dotted(where, "size"), size, "a positive integer (pixels)");
  cfg.size = size.get<int>();
  for (const char* key : {"mean", "std"}) {
    const std::string k = dotted(where, key);
    const json& list = field(data, key, where);
    require(list.is_array() && list.size() == 3, k, list, "a list of 3 numbers (R, G, B)");
    auto& out = std::string(key) == "mean" ? cfg.mean : cfg.std;
    for (size_t i = 0; i < 3; ++i) out[i] = float_field(list[i], indexed(k, i));
  }
  require(cfg.std[0] > 0 && cfg.std[1] > 0 && cfg.std[2] > 0, dotted(where, "std"),
          data.at("std"), "3 numbers > 0");
  cfg.interpolation = str_field(data, "interpolation", where);
  require(std::find(kInterpolations.begin(), kInterpolations.end(), cfg.interpolation) !=
              kInterpolations.end(),
          dotted(where, "interpolation"), cfg.interpolation, join(kInterpolations));
  return cfg;
}

// model_config.preprocess must say what preprocess says (the schema's single source of truth).
void check_model_preprocess(const json& model_config, const PreprocessCfg& pre) {
  auto it = model_config.find("preprocess");
  if (it == model_config.end()) {
    throw BundleError(std::string("manifest key 'model_config.preprocess' is missing; a schema-") +
                      std::to_string(kSchemaVersion) +
                      " manifest repeats the model's preprocessing there. " + kReexport);
  }
  const json& m = *it;
  bool same = m.is_object() && m.value("size", json()) == json(pre.size) &&
              m.value("interpolation", json()) == json(pre.interpolation);
  for (const char* key : {"mean", "std"}) {
    const json list = m.is_object() ? m.value(key, json()) : json();
    const auto& want = std::string(key) == "mean" ? pre.mean : pre.std;
    same = same && list.is_array() && list.size() == 3;
    for (size_t i = 0; same && i < 3; ++i) same = is_finite(list[i]) && list[i].get<double>() == want[i];
  }
  if (!same) {
    throw BundleError("manifest key 'model_config.preprocess' is " + shortened(m) +
                      ", which differs from 'preprocess' (the manifest contradicts itself). " +
                      kReexport);
  }
}

EngineKey parse_engine(const json& raw, const std::string& where) {
  const json& data = object(raw, where,
                            {"onnx_sha256", "tensorrt_version", "gpu_name", "compute_capability",
                             "precision", "profile"});
  EngineKey key{str_field(data, "onnx_sha256", where),   str_field(data, "tensorrt_version", where),
                str_field(data, "gpu_name", where),      str_field(data, "compute_capability", where),
                str_field(data, "precision", where),     str_field(data, "profile", where)};
  require(is_sha256(key.onnx_sha256), dotted(where, "onnx_sha256"), key.onnx_sha256,
          "64 lowercase hex digits");
  return key;
}

bool parse_provenance(const json& raw) {
  const std::string where = "provenance";
  const json& data = object(raw, where, {"random_weights", "checkpoint_sha256", "clip_sha256"});
  const json& random = field(data, "random_weights", where);
  require(random.is_boolean(), dotted(where, "random_weights"), random, "true or false");
  bool any_hash = false;
  for (const char* key : {"checkpoint_sha256", "clip_sha256"}) {
    const json& sha = field(data, key, where);
    require(sha.is_null() || (sha.is_string() && is_sha256(sha.get<std::string>())),
            dotted(where, key), sha, "64 lowercase hex digits or null");
    any_hash = any_hash || !sha.is_null();
  }
  require(random.get<bool>() || any_hash, where, data,
          "random_weights true, or at least one weight hash set");
  return random.get<bool>();
}

void check_schema_version(const json& data) {
  const json& version = field(data, "schema_version", "");
  require(is_int(version), "schema_version", version, "an integer");
  const auto v = version.get<std::int64_t>();
  const std::string ours = std::to_string(kSchemaVersion);
  if (v > kSchemaVersion) {
    throw BundleError("manifest schema_version " + std::to_string(v) +
                      " is newer than this cops C++ library reads (schema_version " + ours +
                      "). Fix: rebuild export/cpp from the cops-deploy release that exported the "
                      "bundle, or re-export the bundle with a cops-export that writes schema " +
                      ours + ".");
  }
  if (v != kSchemaVersion) {
    throw BundleError("manifest schema_version " + std::to_string(v) +
                      " is unknown to this cops C++ library, which reads schema_version " + ours +
                      ". " + kReexport);
  }
}

void check_references(const Manifest& m) {
  std::vector<std::string> listed;
  for (const auto& f : m.files) listed.push_back(f.path);
  std::sort(listed.begin(), listed.end());
  auto is_listed = [&](const std::string& p) {
    return std::binary_search(listed.begin(), listed.end(), p);
  };
  for (const auto& [name, graph] : m.graphs) {
    require(is_listed(graph.file), "graphs." + name + ".file", graph.file,
            "one of the listed files " + join(listed));
  }
  for (const auto& [name, key] : m.engines) {
    require(is_listed(name), "engines." + name, name, "a listed file " + join(listed));
  }
}

}  // namespace

void check_relative_path(const std::string& path, const std::string& what) {
  const std::string valid =
      "a relative POSIX path inside the bundle, e.g. 'vision.onnx' or 'tables/bias.npy'";
  if (path.empty()) {
    throw BundleError(what + " '' is not a non-empty string; valid: " + valid + ".");
  }
  const bool drive = path.size() >= 2 && std::isalpha(static_cast<unsigned char>(path[0])) &&
                     path[1] == ':';
  if (path[0] == '/' || path[0] == '\\' || drive) {
    throw BundleError(what + " '" + path + "' is absolute; valid: " + valid + ". " + kReexport);
  }
  std::vector<std::string> parts;
  std::stringstream stream(path);
  for (std::string part; std::getline(stream, part, '/');) parts.push_back(part);
  if (path.back() == '/') parts.emplace_back();  // getline drops a trailing empty part
  if (std::find(parts.begin(), parts.end(), "..") != parts.end()) {
    throw BundleError(what + " '" + path + "' escapes the bundle with '..'; valid: " + valid + ".");
  }
  const bool odd_part = std::any_of(parts.begin(), parts.end(),
                                    [](const std::string& p) { return p.empty() || p == "."; });
  if (odd_part || path.find('\\') != std::string::npos || path.find('\0') != std::string::npos) {
    throw BundleError(what + " '" + path + "' is not a canonical POSIX path; valid: " + valid +
                      ".");
  }
  if (path == kManifestName) {
    throw BundleError(what + " '" + path + "' is reserved for the manifest; choose another name.");
  }
}

std::vector<FileEntry> Manifest::with_role(const std::string& role) const {
  std::vector<FileEntry> out;
  for (const auto& f : files) {
    if (f.role == role) out.push_back(f);
  }
  return out;
}

const FileEntry& Manifest::file(const std::string& path) const {
  std::vector<std::string> listed;
  for (const auto& f : files) {
    if (f.path == path) return f;
    listed.push_back(f.path);
  }
  throw BundleError("file '" + path + "' is not listed in the manifest; listed files: " +
                    join(listed) + ".");
}

const GraphIO& Manifest::graph(const std::string& name) const {
  auto it = graphs.find(name);
  if (it == graphs.end()) {
    std::vector<std::string> present;
    for (const auto& g : graphs) present.push_back(g.first);
    throw BundleError("the manifest has no graph '" + name + "' in 'graphs'; graphs present: " +
                      join(present) + ". " + kReexport);
  }
  return it->second;
}

Manifest parse_manifest(const std::string& text, const std::string& where) {
  json data;
  try {
    data = json::parse(text);
  } catch (const json::parse_error& exc) {
    throw BundleError(where + " is not valid JSON (" + exc.what() + "). " + kReexport);
  }
  require(data.is_object(), "<manifest>", data, "a JSON object");
  check_schema_version(data);
  object(data, "", kTopKeys);
  Manifest m;
  m.schema_version = data.at("schema_version").get<int>();
  const json& files = field(data, "files", "");
  require(files.is_array(), "files", files, "a JSON list");
  std::set<std::string> seen;
  for (size_t i = 0; i < files.size(); ++i) {
    m.files.push_back(parse_file(files[i], indexed("files", i)));
    require(seen.insert(m.files.back().path).second, indexed("files", i) + ".path",
            m.files.back().path, "a path listed once");
  }
  const json& graphs = field(data, "graphs", "");
  require(graphs.is_object(), "graphs", graphs, "a JSON object");
  for (const auto& item : graphs.items()) {
    m.graphs[item.key()] = parse_graph(item.value(), "graphs." + item.key());
  }
  const json& engines = field(data, "engines", "");
  require(engines.is_object(), "engines", engines, "a JSON object");
  for (const auto& item : engines.items()) {
    m.engines[item.key()] = parse_engine(item.value(), "engines." + item.key());
  }
  const json& tools = field(data, "tool_versions", "");
  require(tools.is_object(), "tool_versions", tools, "a JSON object");
  for (const auto& item : tools.items()) {
    require(item.value().is_string(), "tool_versions." + item.key(), item.value(), "a string");
    m.tool_versions[item.key()] = item.value().get<std::string>();
  }
  m.package_version = str_field(data, "package_version", "");
  const json& model_config = field(data, "model_config", "");
  require(model_config.is_object(), "model_config", model_config, "a JSON object");
  m.preprocess = parse_preprocess(field(data, "preprocess", ""), "preprocess");
  check_model_preprocess(model_config, m.preprocess);
  m.random_weights = parse_provenance(field(data, "provenance", ""));
  const json& parity = field(data, "parity", "");
  require(parity.is_object(), "parity", parity, "a JSON object");
  const json& threshold = field(data, "threshold", "");
  require(threshold.is_null() || is_finite(threshold), "threshold", threshold,
          "a finite number or null");
  if (!threshold.is_null()) m.threshold = threshold.get<double>();
  m.created = str_field(data, "created", "");
  check_references(m);
  return m;
}

std::string sha256_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw BundleError("cannot read " + path.string() + " to hash it. " + kCopyAgain);
  }
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    throw BundleError("OpenSSL could not start a sha256 digest for " + path.string() + ".");
  }
  std::vector<char> chunk(1 << 20);
  while (in) {
    in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), chunk.data(), static_cast<size_t>(in.gcount()));
  }
  if (in.bad()) {
    throw BundleError("I/O error while hashing " + path.string() + ". " + kCopyAgain);
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &length);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < length; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

namespace {

void check_file(const fs::path& root, const fs::path& real_root, const FileEntry& entry,
                bool verify) {
  const std::string where = "bundle " + root.string() + ": ";
  std::error_code ec;
  const fs::path real = fs::weakly_canonical(root / entry.path, ec);
  const fs::path rel = ec ? fs::path("..") : real.lexically_relative(real_root);
  if (rel.empty() || *rel.begin() == "..") {
    throw BundleError(where + "file '" + entry.path + "' resolves to " + real.string() +
                      ", outside the bundle folder (a symlink leaving the bundle?). Fix: copy "
                      "the file into the bundle and re-export; a bundle never points outside "
                      "itself.");
  }
  if (!fs::is_regular_file(real, ec)) {
    throw BundleError(where + "listed file '" + entry.path + "' (role '" + entry.role +
                      "') is missing. " + kCopyAgain);
  }
  const std::uint64_t size = fs::file_size(real, ec);
  if (ec || size != entry.size) {
    throw BundleError(where + "file '" + entry.path + "' has " + std::to_string(size) +
                      " bytes, the manifest expects " + std::to_string(entry.size) +
                      " (truncated or replaced). " + kCopyAgain);
  }
  if (verify) {
    const std::string actual = sha256_file(real);
    if (actual != entry.sha256) {
      throw BundleError(where + "file '" + entry.path + "' has sha256 " + actual +
                        ", the manifest expects " + entry.sha256 +
                        " (corrupted or tampered with). " + kCopyAgain);
    }
  }
}

}  // namespace

Bundle open_bundle(const fs::path& root, bool verify) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) {
    throw BundleError("bundle folder " + root.string() +
                      " does not exist or is not a folder. Fix: pass the folder written by "
                      "cops-export (it holds manifest.json).");
  }
  const fs::path manifest_path = root / kManifestName;
  if (!fs::is_regular_file(manifest_path, ec)) {
    throw BundleError("bundle " + root.string() +
                      " has no manifest.json; it is not a bundle or the export was interrupted. " +
                      kReexport);
  }
  std::ifstream in(manifest_path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) {
    throw BundleError("cannot read " + manifest_path.string() + ". " + kCopyAgain);
  }
  Bundle bundle;
  bundle.root = root;
  bundle.verified = verify;
  try {
    bundle.manifest = parse_manifest(text.str());
  } catch (const BundleError& exc) {
    throw BundleError("bundle " + root.string() + ": " + exc.what());
  }
  std::set<std::string> present;
  for (const auto& f : bundle.manifest.files) present.insert(f.role);
  std::vector<std::string> missing;
  for (const auto& role : kRequiredRoles) {
    if (!present.count(role)) missing.push_back(role);
  }
  if (!missing.empty()) {
    throw BundleError("bundle " + root.string() + " lists no file with required role(s) " +
                      join(missing) + "; roles present: " +
                      join(std::vector<std::string>(present.begin(), present.end())) + ". " +
                      kReexport);
  }
  const fs::path real_root = fs::canonical(root);
  for (const auto& entry : bundle.manifest.files) check_file(root, real_root, entry, verify);
  return bundle;
}

}  // namespace cops
