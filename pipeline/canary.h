// The numerical canary: after a package is loaded and before it serves, run it once on the small
// fixed input recorded at compile time (manifest "canary", file canary.safetensors; the Python
// twin pipeline/python/kiln/canary.py explains the synthetic constants and the tolerances) and
// compare its outputs with the recorded ones. Catches miscompiles, toolchain drift and silent
// corruption that a signature cannot (the signer may have built a bad package in good faith).
//
// Called by PackageLoader on its thread; the package must not be in use elsewhere (the canary
// loads synthetic constants, which the caller replaces with the real weights afterwards).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/package.h"
#include "pipeline/aoti_package.h"

namespace kiln::pipeline {

// The constants both sides make for a canary: for the constant at `index` (its FQN's position in
// sorted order), sin(i * a + index * b) * scale over the element index i, reshaped and cast.
at::Tensor SyntheticConstant(int64_t index, const std::vector<int64_t>& shape,
                             at::ScalarType dtype, const c10::Device& device);

// SyntheticConstant for every constant of `manifest`, by sorted FQN, on `device`.
absl::StatusOr<std::unordered_map<std::string, at::Tensor>> SyntheticConstants(
    const cache::PackageManifest& manifest, const c10::Device& device);

// What RunCanary found.
struct CanaryResult {
  bool ran = false;          // false: the manifest records no canary (a package built before it)
  double worst_error = 0;    // largest relative L2 error over the outputs
  double tolerance = 0;
  double seconds = 0;
};

// Runs `package`'s canary. OK (ran=false) if the manifest has none. DataLoss naming the output,
// its error and the tolerance if an output disagrees, or if the canary record is malformed or
// missing (the package is then not what was signed-for-serving). Errors of the run itself as
// AotiPackage reports them. Leaves synthetic constants loaded: load the real ones next.
absl::StatusOr<CanaryResult> RunCanary(AotiPackage& package, const cache::LocatedPackage& found);

// The compile-time side (kiln-canary, called by kiln-compile): loads `package` (manifest
// `manifest_path`: the manifest kiln-compile is about to write, its canary not yet filled in) on
// `device` exactly as a node does (AotiPackage), runs it on the synthetic constants and the
// inputs input.<i> of `inputs_path`, and writes input.<i> and output.<i> to `out_path`
// (safetensors). Returns the number of outputs. Loading a CUDA package from Python crashes with
// torch 2.11 on the GPU host (bench/README.md), so the record is made by the loader that serves.
absl::StatusOr<int> RecordCanary(const std::string& manifest_path, const std::string& package_path,
                                 const std::string& inputs_path, const c10::Device& device,
                                 const std::string& out_path);

}  // namespace kiln::pipeline
