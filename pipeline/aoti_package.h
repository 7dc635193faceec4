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
  // checks them) are loaded into the runtime's active constant buffer (load_constants(
  // use_inactive=false), user-managed: pointers only, no copy). The set replaced is dropped (the
  // runtime's own references hold it until FreeUnusedConstants). Before LoadConstants():
  // FailedPrecondition. A CUDA graph captured around Run() holds the old addresses: capture it
  // again after a swap.
  //
  // Why not the runtime's second buffer (load_constants(use_inactive=true) +
  // swap_constant_buffer()): torch 2.11's single-threaded runner (kiln's CUDA mode) checks the
  // primary buffer's fold state while it runs the secondary one, so once a swap makes the
  // secondary active, every run but the first fails with "Unknown constant state:
  // ConstantState::INITIALIZED" unless the primary was run (folded) before the swap: a LoRA set
  // switched in before the first job (kiln-run --lora), or loaded ahead of its swap, failed every
  // job on the H100 host (2026-12-06). Loading ahead is no gain anyway while a swap needs the
  // previous run finished; the active buffer is the one the runtime's state tracks correctly.
  absl::Status SwapConstants(const std::unordered_map<std::string, at::Tensor>& constants);
  // SwapConstants in two steps, so that the merge can run while another thread runs the package:
  // PrepareConstants checks `constants` and keeps them (nothing in the runtime changes: Run()
  // goes on with the active set); CommitConstants() loads them into the active buffer. A failed
  // commit loads the previous set again (the package runs on as before) and returns the error;
  // if even that fails, Run refuses until LoadConstants. LoadConstants and ReleaseConstants drop
  // what was prepared. Prepare before LoadConstants(): FailedPrecondition; Commit with nothing
  // prepared: FailedPrecondition. Prepare may run on one thread while Run() runs on another;
  // Commit may not.
  absl::Status PrepareConstants(const std::unordered_map<std::string, at::Tensor>& constants);
  absl::Status CommitConstants();
  // The set Run() uses now (LoadConstants' or the last commit's).
  const std::unordered_map<std::string, at::Tensor>& constants() const { return constants_; }
  bool prepared() const { return prepared_; }

  // The runtime's user-managed loads keep a reference of their own to every constant ever loaded
  // and never drop it (torch 2.11 and 2.13), so a set no package uses any more (the canary's
  // synthetic constants, a LoRA set switched away from) would stay in memory for the life of the
  // process. This frees the memory of every loaded tensor that nothing but those references holds
  // (and whose storage no other tensor shares); returns the bytes freed. Process-wide. On CUDA,
  // call it with no kernel in flight that could still read such a tensor (the loader synchronizes
  // the device first).
  static uint64_t FreeUnusedConstants();

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
  std::vector<at::Tensor> failed_load_;  // a failed load's tensors (the runtime may point at them)
  bool constants_loaded_ = false;
  bool prepared_ = false;  // PrepareConstants' set is waiting for CommitConstants
  std::unordered_map<std::string, at::Tensor> pending_constants_;  // prepared, not yet loaded
  // Loads `constants` into the runtime's active buffer (user-managed); Internal on failure.
  // (the runtime takes a non-const map; it does not change it)
  absl::Status LoadActive(std::unordered_map<std::string, at::Tensor>& constants);
};

// Checks `t` against `spec` (shape, dtype) and `device`, and that it is contiguous.
// InvalidArgument naming `what` and the mismatch.
absl::Status CheckTensor(const std::string& what, const at::Tensor& t,
                         const std::vector<int64_t>& shape, const std::string& dtype,
                         const c10::Device& device);

}  // namespace kiln::pipeline
