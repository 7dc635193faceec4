// ComponentWeights: a component's checkpoint (diffusers/transformers safetensors folder, single
// file or sharded) turned into device tensors for an AOTI package's user-managed constants.
// Each tensor is read from the mmap'd file once per (FQN, dtype) and shared by every package of
// the component (all shape buckets use the same weights).
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <unordered_map>

#include "absl/status/statusor.h"
#include "pipeline/aoti_package.h"
#include "pipeline/safetensors.h"

namespace kiln::pipeline {

// Host tensor viewing `view`'s bytes (no copy; valid while the file stays open).
absl::StatusOr<at::Tensor> TensorFromView(const TensorView& view);

class ComponentWeights {
 public:
  // Opens the checkpoint `stem` ("diffusion_pytorch_model" or "model") of the component folder
  // `dir`, single file or sharded (WeightSet::OpenDir).
  static absl::StatusOr<std::unique_ptr<ComponentWeights>> Open(const std::string& dir,
                                                                const std::string& stem,
                                                                const c10::Device& device);
  // The folder and checkpoint stem of a component in a diffusers-layout repository.
  static std::string FolderFor(const std::string& component);
  static std::string StemFor(const std::string& component);

  // FQN → device tensor for every constant `package` needs, converted to the dtype its manifest
  // records. Checkpoint constants come from this folder (T5's tied embedding is found under
  // either of its names); package constants from `extra_constants_path`. NotFound lists every
  // missing name; InvalidArgument names a misshaped tensor and the file it came from.
  absl::StatusOr<std::unordered_map<std::string, at::Tensor>> Gather(
      const AotiPackage& package, const std::string& extra_constants_path);

  uint64_t bytes_read() const { return bytes_read_; }

 private:
  ComponentWeights() = default;
  std::string dir_;
  c10::Device device_ = c10::kCPU;
  std::unique_ptr<WeightSet> set_;
  std::map<std::pair<std::string, std::string>, at::Tensor> cache_;  // (fqn, dtype) → tensor
  uint64_t bytes_read_ = 0;
};

}  // namespace kiln::pipeline
