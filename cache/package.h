// A compiled package as the cache hands it out: its manifest (written beside the package by
// kiln-compile, pipeline/python/kiln/compile.py: the artifact key, the package's digest and size,
// what the package expects — constants, inputs, outputs — and how it was built) and where it lies
// on the node-local disk. Public: the pipeline loads packages from these types.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/artifact_key.h"
#include "nlohmann/json.hpp"

namespace kiln::cache {

// Shape and dtype of one tensor as the package was compiled for it. dtype is torch's name
// without the "torch." prefix ("float32", "bfloat16", "int64", "float8_e4m3fn", ...).
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;
};

// How a checkpoint constant that is not a checkpoint tensor as it is (a fused QKV weight, an fp8
// weight or its scale) is computed from checkpoint tensors when the weights are loaded
// (manifest `"derive": {"op": ..., "from": [...]}`; the ops are pipeline/weights.h's).
struct ConstantDerivation {
  std::string op;                    // "concat0", "fp8_rowwise", ...; "" = not derived
  std::vector<std::string> sources;  // checkpoint names, concatenated on dim 0 in this order
};

struct ConstantSpec {
  std::vector<int64_t> shape;
  std::string dtype;
  // "checkpoint": supplied from the model repository; "package": shipped beside the package in
  // extra_constants (non-persistent buffers such as RoPE tables).
  std::string source;
  ConstantDerivation derive;  // op empty: the checkpoint tensor named by the FQN itself
};

// One package file of a regional set (manifest `regions.<name>.package`).
struct RegionPackage {
  std::string region;  // "head", "double", "single", "tail"
  std::string file;    // relative to the package directory
  std::string sha256;
  int64_t bytes = 0;
};

struct PackageManifest {
  ArtifactKey key;
  std::string digest;          // key.Digest()
  // "whole": one package, package_file below. "regional" (a transformer compiled with the
  // compile option layout "regional", pipeline/README.md): no package_file; one package per
  // region in region_packages, the rest of the region table (weights, layers) in `raw`.
  std::string layout = "whole";
  std::string package_file;    // relative to the package directory ("" for regional sets)
  std::string package_sha256;  // of package_file
  int64_t package_bytes = 0;
  std::vector<RegionPackage> region_packages;  // regional sets only, by region name
  std::string extra_constants;  // relative file name, "" if none
  std::map<std::string, ConstantSpec> constants;  // by FQN
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  double compile_seconds = 0;
  std::string built_by;
  std::string built_at;
  nlohmann::json raw;  // the whole document, for fields not modelled here

  // InvalidArgument naming the missing or malformed field; also checks digest == key.Digest().
  static absl::StatusOr<PackageManifest> FromJson(const nlohmann::json& j);
  static absl::StatusOr<PackageManifest> FromFile(const std::string& path);
};

// A verified package in a node-local store (what LocalDiskStore::Find and a PackageProvider
// return): ROOT/<digest>/{model.pt2, manifest.json[, constants.safetensors]}.
struct LocatedPackage {
  PackageManifest manifest;
  std::string dir;                    // ROOT/<digest>
  std::string package_path;           // dir/model.pt2 ("" for a regional set: see manifest)
  std::string extra_constants_path;   // dir/constants.safetensors or ""
};

}  // namespace kiln::cache
