// LoRA: low-rank weight deltas merged into the transformer's weights at run time, without a new
// package (kiln's packages take their weights at run time; pipeline/README.md "LoRA").
//
//   LoraLibrary   finds NAME.safetensors in its directories (the node's --lora_dir, then the
//                 shared store's loras/) and checks it against its recorded digest
//                 NAME.safetensors.sha256 (sha256sum's format: the hex SHA-256 first);
//   LoraWeights   one file parsed against the transformer's checkpoint: for each checkpoint weight
//                 it changes, the factors B [out, r] and A [r, in] and alpha / r, on the device;
//   LoraDeltas    a job's set (LoRAs with scales): per checkpoint weight, the sum of
//                 scale · (alpha / r) · B·A in float32, computed when asked for (one weight at a
//                 time: a flux-dev set would not fit as float32 all at once).
// ComponentWeights::GatherMerged (weights.h) adds the deltas to the weights a package takes, by
// the same derivation rules as the base weights (fused QKV, fp8 re-quantized from the merged
// weight), and PackageLoader::SetLoras swaps them in.
//
// File layouts (the key names diffusers' and kohya's loaders read):
//   diffusers / PEFT  "<prefix><module>.lora_A.weight" [r, in], "<module>.lora_B.weight" [out, r],
//                     optional "<module>.alpha" (scalar; absent: alpha = r). <prefix> is
//                     "transformer.", "base_model.model." or none; <module> a module of the
//                     checkpoint (diffusers names: "transformer_blocks.0.attn.to_q").
//   kohya             "lora_unet_<module>.lora_down.weight" [r, in], ".lora_up.weight" [out, r],
//                     ".alpha": <module> either the checkpoint's module path with '_' for '.'
//                     ("lora_unet_transformer_blocks_0_attn_to_q") or Black Forest Labs' Flux
//                     names as kohya's sd-scripts write them ("lora_unet_double_blocks_0_img_attn_qkv",
//                     fused projections whose up factor is split by rows over the diffusers
//                     modules: qkv over to_q/to_k/to_v, a single block's linear1 over
//                     to_q/to_k/to_v/proj_mlp).
// Used on the pipeline's Generate() thread; not thread-safe.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "pipeline/safetensors.h"

namespace kiln::pipeline {

struct LocatedLora {
  std::string name;
  std::string path;    // .../NAME.safetensors
  std::string sha256;  // the recorded digest, checked against the file
};

class LoraLibrary {
 public:
  explicit LoraLibrary(std::vector<std::string> dirs) : dirs_(std::move(dirs)) {}

  // NAME.safetensors in the first directory that has it, with its digest file read (the file is
  // not hashed here: Verify does that). NotFound naming every path looked at;
  // FailedPrecondition when the digest file is missing or not a SHA-256.
  absl::StatusOr<LocatedLora> Find(const std::string& name) const;
  // SHA-256 of the file equals its recorded digest; DataLoss naming the file and both digests.
  static absl::Status Verify(const LocatedLora& lora);
  // Names of the LoRAs (with a digest file) in every directory, sorted, unique.
  std::vector<std::string> Names() const;
  const std::vector<std::string>& dirs() const { return dirs_; }

 private:
  std::vector<std::string> dirs_;
};

// The factors of one checkpoint weight: delta = (alpha / rank) · up · down.
struct LoraFactor {
  std::string target;     // checkpoint tensor name, e.g. "transformer_blocks.0.attn.to_q.weight"
  at::Tensor up;          // B [out, rank], on the device, as stored
  at::Tensor down;        // A [rank, in]
  double alpha_over_rank = 1.0;
  std::string tensors;    // the file's tensor names it came from (for errors)
};

class LoraWeights {
 public:
  // Reads `path` (a LoRA in either layout above) against the checkpoint `checkpoint` (the names
  // and shapes of the weights it may change) onto `device`. InvalidArgument naming the file and
  // the tensor for: a tensor of neither layout, a module the checkpoint does not have, an A
  // without its B (or the reverse), factors that are not matrices or whose shapes do not fit the
  // target weight or each other, an alpha that is not one finite number; no LoRA tensor at all.
  static absl::StatusOr<std::unique_ptr<LoraWeights>> Load(const std::string& path,
                                                           const WeightSet& checkpoint,
                                                           const c10::Device& device);
  const std::vector<LoraFactor>& factors() const { return factors_; }
  const std::string& layout() const { return layout_; }  // "peft" or "kohya"
  const std::string& path() const { return path_; }
  uint64_t bytes() const { return bytes_; }  // file bytes of the factors read

 private:
  LoraWeights() = default;
  std::vector<LoraFactor> factors_;
  std::string layout_;
  std::string path_;
  uint64_t bytes_ = 0;
};

// A job's LoRA set: the LoRAs (shared, not copied) with their scales, in job order.
class LoraDeltas {
 public:
  void Add(std::shared_ptr<const LoraWeights> lora, double scale);
  bool empty() const { return by_target_.empty(); }
  bool Touches(const std::string& target) const { return by_target_.count(target) > 0; }
  // Σ over the set, in job order, of scale · (alpha / rank) · (B·A) as float32 [out, in] on the
  // device; an undefined tensor for a weight no LoRA of the set changes.
  at::Tensor DeltaFor(const std::string& target) const;
  // Checkpoint weights the set changes.
  std::vector<std::string> Targets() const;

 private:
  struct Term {
    const LoraFactor* factor;
    double scale;
  };
  std::vector<std::shared_ptr<const LoraWeights>> loras_;  // keeps the factors alive
  std::map<std::string, std::vector<Term>> by_target_;
};

}  // namespace kiln::pipeline
