// ComponentWeights: a component's checkpoint (diffusers/transformers safetensors folder, single
// file or sharded) turned into device tensors for an AOTI package's user-managed constants.
// Each tensor is read from the mmap'd file once per (FQN, dtype) and shared by every package of
// the component (all shape buckets use the same weights).
//
// Derived constants. A manifest constant with a derivation (cache::ConstantDerivation, manifest
// `"derive": {"op": ..., "from": [checkpoint names]}`) is computed from its sources on the device
// (a GPU node quantizes on the GPU), once per (derivation, dtype), then shared like the others.
// Every op first concatenates its sources along dim 0:
//   concat0            sources cast to the constant's dtype (fused QKV weights and biases);
//   fp8_rowwise        in float32, per output row r: scale[r] = max(amax(|w[r, :]|), 1e-12) / 448,
//                      q = (w / scale).clamp(-448, 448) as float8_e4m3fn [out, in];
//   fp8_rowwise_scale  that scale, float32 [1, out] (torch._scaled_mm's scale_b).
// All steps are exactly rounded, so the bytes equal kiln.models.quant's (Python) on any device.
// Not thread-safe: one caller at a time.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/package.h"
#include "pipeline/aoti_package.h"
#include "pipeline/safetensors.h"

namespace kiln::pipeline {

class LoraDeltas;

// Host tensor viewing `view`'s bytes (no copy; valid while the file stays open).
absl::StatusOr<at::Tensor> TensorFromView(const TensorView& view);

// Writes `tensors` (any device; copied to the host, made contiguous) to `path` as a .safetensors
// file, atomically (common/files.h), in the given order. Unimplemented for a dtype safetensors
// has no name for here; the file errors of WriteFileAtomically.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, at::Tensor>>& tensors);

class ComponentWeights {
 public:
  // Opens the checkpoint `stem` ("diffusion_pytorch_model" or "model") of the component folder
  // `dir`, single file or sharded (WeightSet::OpenDir).
  static absl::StatusOr<std::unique_ptr<ComponentWeights>> Open(const std::string& dir,
                                                                const std::string& stem,
                                                                const c10::Device& device);
  // A component's checkpoint held in memory instead of a folder: `tensors` by checkpoint name,
  // on `device` (e.g. the transformer weights rank 0 of a multi-GPU node broadcast,
  // parallel/weight_broadcast.h), so this process never opens the component's files. Gather
  // hands out these tensors themselves where the manifest's dtype is theirs (no copy), and
  // converted copies otherwise; `origin` names them in error messages ("the transformer weights
  // broadcast by rank 0"). bytes_read() stays 0; checkpoint() describes the tensors (names,
  // dtypes, shapes: what LoRA files are checked against; WeightSet::Describe), and Merge reads
  // its sources from them. Unimplemented for a dtype safetensors has no name for.
  static absl::StatusOr<std::unique_ptr<ComponentWeights>> FromTensors(
      std::vector<std::pair<std::string, at::Tensor>> tensors, const c10::Device& device,
      std::string origin);
  // The folder and checkpoint stem of a component in a diffusers-layout repository.
  static std::string FolderFor(const std::string& component);
  static std::string StemFor(const std::string& component);

  // Gather(package.constant_fqns(), package.manifest(), extra_constants_path).
  absl::StatusOr<std::unordered_map<std::string, at::Tensor>> Gather(
      const AotiPackage& package, const std::string& extra_constants_path);

  // FQN → device tensor for each of `fqns`, as `manifest.constants` describes it (shape, dtype).
  // Checkpoint constants come from this folder (T5's tied embedding is found under either of its
  // names), derived ones are computed from their checkpoint sources (see above), package
  // constants come from `extra_constants_path`. NotFound lists every missing name (a derived
  // constant's missing sources with the constant that needs them); InvalidArgument names a
  // misshaped tensor and where it came from, or a derivation whose sources or dtype do not fit
  // its op; Unimplemented for an op this build does not know; DataLoss for an FQN the manifest
  // does not describe.
  absl::StatusOr<std::unordered_map<std::string, at::Tensor>> Gather(
      const std::vector<std::string>& fqns, const cache::PackageManifest& manifest,
      const std::string& extra_constants_path);

  // `base` (a package's constants as Gather() returned them) with a LoRA set merged in: each
  // constant whose checkpoint sources the set changes is computed afresh from the merged sources
  // by the same rules as the base (plain and concat0: (base as float32 + delta) in the
  // constant's dtype; fp8_rowwise and its scale: the sources read from the checkpoint, merged in
  // float32 and quantized again, so the scale follows the merged weight); every other constant is
  // `base`'s tensor itself (shared). `memo` (may be null) keeps merged constants by FQN across
  // calls for one set, so the packages of several buckets share them. NotFound for a source
  // missing from the checkpoint, InvalidArgument for a delta that does not fit its weight.
  absl::StatusOr<std::unordered_map<std::string, at::Tensor>> Merge(
      const std::unordered_map<std::string, at::Tensor>& base,
      const cache::PackageManifest& manifest, const LoraDeltas& deltas,
      std::unordered_map<std::string, at::Tensor>* memo);

  // The checkpoint itself (names and shapes, for LoRA files to be checked against); for
  // FromTensors, a description of its tensors (no file).
  const WeightSet& checkpoint() const { return *set_; }

  uint64_t bytes_read() const { return bytes_read_; }

 private:
  ComponentWeights() = default;
  std::string dir_;
  c10::Device device_ = c10::kCPU;
  std::unique_ptr<WeightSet> set_;
  std::map<std::string, at::Tensor> memory_;  // FromTensors' tensors by name (else empty)
  bool in_memory_ = false;                    // made by FromTensors
  // The checkpoint tensor called exactly `name`, or an undefined tensor when there is none: a
  // host view of the file's mapping (read-only: copy before writing) or the in-memory tensor.
  absl::StatusOr<at::Tensor> Source(const std::string& name) const;
  std::map<std::pair<std::string, std::string>, at::Tensor> cache_;  // (fqn, dtype) → tensor
  // The derived constant `fqn` (spec.derive set) in `dtype`, from the cache or computed; an
  // undefined tensor when sources are missing (their names appended to `missing`).
  absl::StatusOr<at::Tensor> Derive(const std::string& component, const std::string& fqn,
                                    const cache::ConstantSpec& spec, at::ScalarType dtype,
                                    std::vector<std::string>* missing);

  uint64_t bytes_read_ = 0;
  std::map<std::string, at::Tensor> derived_;  // "op(sources) -> dtype" → tensor
};

}  // namespace kiln::pipeline
