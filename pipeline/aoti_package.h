// One loaded AOTInductor package (a weightless `.pt2`) with its weights supplied as user-managed
// constants. Guards every hazard the AOTI runtime leaves to the caller:
//  - the package's metadata (device, torch version, key digest) is checked before any of its code
//    is loaded;
//  - constants: exactly the FQNs the package asks for, each with the shape and dtype recorded in
//    the manifest, on the right device, contiguous; an error names every missing one;
//  - Run() refuses to run before constants are loaded (the runtime would segfault) and checks the
//    shape, dtype, device and contiguity of every input (the runtime would run mismatched inputs
//    silently).
// Runtime exceptions (c10::Error, std::exception) are caught here and returned as Status.
// Not thread-safe: one caller thread at a time.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/package.h"
#include "pipeline/toolchain.h"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace kiln::pipeline {

// torch dtype name as written in manifests ("float32", "bfloat16", ...) → ScalarType.
absl::StatusOr<at::ScalarType> DtypeFromName(const std::string& name);
std::string DtypeName(at::ScalarType t);


// Reads the package's metadata without loading its code and checks that it was compiled for
// `device`'s type, by the torch version this binary links, for the manifest's key.
// FailedPrecondition naming the mismatch; DataLoss if the archive cannot be read.
absl::Status CheckPackageMetadata(const std::string& package_path,
                                  const cache::PackageManifest& manifest,
                                  const c10::Device& device);

class AotiPackage {
 public:
  static absl::StatusOr<std::unique_ptr<AotiPackage>> Load(const cache::LocatedPackage& package,
                                                           const c10::Device& device);
  ~AotiPackage();

  // FQNs the package needs, as get_constant_fqns() reports them.
  const std::vector<std::string>& constant_fqns() const { return fqns_; }
  const cache::PackageManifest& manifest() const { return manifest_; }

  // Hands the package its weights. `constants` may hold more names than needed; exactly
  // constant_fqns() are passed. The tensors are kept alive by this object (user-managed).
  absl::Status LoadConstants(const std::unordered_map<std::string, at::Tensor>& constants);
  // Drops the tensors LoadConstants keeps alive (the canary's synthetic constants, before the
  // real weights are gathered: otherwise both sets sit on the device at once, 24 GB extra for
  // flux-dev's bf16 transformer). Run refuses (FailedPrecondition) until LoadConstants again.
  void ReleaseConstants();
  // The constants LoadConstants() was given (the base weights), whatever is swapped in since.
  const std::unordered_map<std::string, at::Tensor>& base_constants() const {
    return base_constants_;
  }
  // Replaces every weight without recompiling: the new constants (checked as LoadConstants
  // checks them) go into the runtime's inactive constant buffer
  // (load_constants(use_inactive=true)), which then becomes the active one
  // (swap_constant_buffer()). The tensors of the buffer swapped out are kept until that buffer is
  // loaded again, since the runtime's inactive buffer still points at them. Before
  // LoadConstants(): FailedPrecondition. A CUDA graph captured around Run() holds the old
  // addresses: capture it again after a swap.
  absl::Status SwapConstants(const std::unordered_map<std::string, at::Tensor>& constants);
  // SwapConstants in two steps, so that the load can run while another thread runs the package:
  // PrepareConstants checks `constants` and loads them into the inactive buffer only (the active
  // one, which Run() uses, is untouched; the tensors the inactive buffer pointed at are released
  // and the new ones kept alive); CommitConstants() makes the prepared buffer the active one.
  // Anything else that writes the inactive buffer (SwapConstants, LoadConstants,
  // ReleaseConstants) drops what was prepared. Prepare before LoadConstants(): FailedPrecondition;
  // Commit with nothing prepared: FailedPrecondition. Prepare may run on one thread while Run()
  // runs on another (the runtime's load_constants(use_inactive=true) writes only the inactive
  // map); nothing else may.
  absl::Status PrepareConstants(const std::unordered_map<std::string, at::Tensor>& constants);
  absl::Status CommitConstants();
  bool prepared() const { return prepared_; }

  absl::StatusOr<std::vector<at::Tensor>> Run(const std::vector<at::Tensor>& inputs);
  // Run()'s first output (every kiln component has one); Internal if the package returned none.
  absl::StatusOr<at::Tensor> RunFirst(const std::vector<at::Tensor>& inputs);
  // Run() on the CUDA stream `cuda_stream` (a cudaStream_t; null: the current stream). CUDA
  // packages are loaded in the runtime's single-threaded mode, which neither waits on nor records
  // events of earlier runs, so a run can be captured into a CUDA graph (pipeline/cuda_graph.h).
  absl::StatusOr<std::vector<at::Tensor>> RunOn(const std::vector<at::Tensor>& inputs,
                                                void* cuda_stream);
  const c10::Device& device() const { return device_; }

 private:
  AotiPackage() = default;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
  cache::PackageManifest manifest_;
  c10::Device device_ = c10::kCPU;
  std::vector<std::string> fqns_;
  // Picks exactly fqns_ from `constants`, each checked against the manifest.
  absl::StatusOr<std::unordered_map<std::string, at::Tensor>> Choose(
      const std::unordered_map<std::string, at::Tensor>& constants) const;
  std::unordered_map<std::string, at::Tensor> constants_;
  std::unordered_map<std::string, at::Tensor> base_constants_;
  std::unordered_map<std::string, at::Tensor> inactive_constants_;  // the inactive buffer's
  std::vector<at::Tensor> failed_load_;  // a failed inactive load's tensors (may be pointed at)
  bool constants_loaded_ = false;
  bool prepared_ = false;  // the inactive buffer holds PrepareConstants' set, not yet committed
};

// Checks `t` against `spec` (shape, dtype) and `device`, and that it is contiguous.
// InvalidArgument naming `what` and the mismatch.
absl::Status CheckTensor(const std::string& what, const at::Tensor& t,
                         const std::vector<int64_t>& shape, const std::string& dtype,
                         const c10::Device& device);

}  // namespace kiln::pipeline
