// RegionalTransformer: the transformer of a regional package set (compile option
// `"layout": "regional"`, pipeline/README.md "Regional layout"): one AotiPackage per region
// (head, double-stream block, single-stream block, tail), compiled with the block's weights as
// run-time inputs, so one loaded package serves every layer of its type.
//
// The weights of every layer are gathered once from the checkpoint by ComponentWeights (derived
// tensors, fused QKV or fp8 weights and scales, by the manifest's `derive` rules with the layer's
// prefix) and held on the device for the life of this object: their addresses never change, so
// a CUDA graph captured around Run() (CudaGraphDenoiser) stays valid until a LoRA switch.
//
// LoRAs (pipeline/README.md "LoRA"). The weights are the region packages' inputs, so a LoRA set
// needs nothing of the runtime: PrepareLoras computes, for every layer, the weights with the set
// merged (ComponentWeights::Merge of the layer's base weights, by the same derivation rules as
// a whole-graph package's constants: fused QKV, fp8 quantized again from the merged weight) into
// a second list beside the one RunOn passes (which it leaves alone, so it may run while another
// thread runs RunOn); CommitLoras makes that list the one RunOn passes (a move of tensor
// handles). Only the weights a set changes are new tensors; the others are the base tensors
// themselves, and back to none the base tensors are passed again: the base output, bit for bit.
// The weights' addresses change at a commit: a CUDA graph captured before must be dropped.
//
// RunOn() is one transformer evaluation with the whole-graph package's inputs and output:
//   img, txt, temb, cos, sin = head(hidden, enc, pooled, timestep, guidance, *W_head)
//   for each double layer i: img, txt = double(img, txt, temb, cos, sin, *W_double[i])
//   x = cat([txt, img], dim=1)
//   for each single layer i: x = single(x, temb, cos, sin, *W_single[i])
//   sample = tail(x, temb, *W_tail)
// as kiln.regional.run_regional does in Python. Used by PackageLoader (loads it) and the
// denoisers (run it) on Generate()'s thread; not thread-safe.
//
// A sequence-parallel set (compile option `sequence_parallel` P > 1, docs/multi_gpu.md) is one
// rank's of P: its inputs are the rank's token shards, its blocks carry the Ulysses all-to-alls
// (process group "0", which the caller registers: parallel::ProcessGroup), and its head returns
// the RoPE tables of the whole image, of which RunOn gives the blocks the rank's rows (its text
// shard's, then its image shard's, the order of its local sequence [txt_r; img_r]). The caller
// sets the rank first (SetSequenceParallelRank; parallel::SequenceParallelDenoise does).
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/package.h"
#include "pipeline/aoti_package.h"
#include "pipeline/weights.h"

namespace kiln::pipeline {

class RegionalTransformer {
 public:
  // Loads the four region packages of `set` (a verified regional set; manifest layout
  // "regional") on `device`, each checked as AotiPackage::Load checks a package (metadata:
  // device, torch version, the set's key digest). DataLoss for a malformed region table
  // (missing region, weights or layers; a region package that asks for constants),
  // FailedPrecondition / Internal as AotiPackage::Load.
  static absl::StatusOr<std::unique_ptr<RegionalTransformer>> Load(const cache::LocatedPackage& set,
                                                                   const c10::Device& device);
  ~RegionalTransformer();

  // Gathers every layer's weights of every region from `weights` (the transformer's checkpoint;
  // tensors shared with its cache) and keeps them. Errors as ComponentWeights::Gather.
  absl::Status LoadWeights(ComponentWeights& weights);

  // One evaluation: `inputs` are the whole-graph transformer's five inputs (manifest `inputs`),
  // the result its one output. Runs every region package on `cuda_stream` (a cudaStream_t; null:
  // the current stream) and the concatenation on the current stream (the caller makes them the
  // same when capturing). FailedPrecondition before LoadWeights(); InvalidArgument for inputs
  // that do not match the manifest; a region's error as AotiPackage::RunOn returns it, named.
  absl::StatusOr<std::vector<at::Tensor>> RunOn(const std::vector<at::Tensor>& inputs,
                                                void* cuda_stream);

  // The first half of a LoRA switch: every layer's weights with `deltas` (null: none, the base
  // weights) merged in, kept prepared; RunOn's weights are untouched. Merged tensors go into and
  // come from `memo` by FQN (may be null; the sets of several buckets share them). Drops what an
  // earlier call prepared. FailedPrecondition before LoadWeights(); ComponentWeights::Merge's
  // errors, naming the region and layer (nothing is kept prepared then).
  absl::Status PrepareLoras(ComponentWeights& weights, const LoraDeltas* deltas,
                            std::unordered_map<std::string, at::Tensor>* memo);
  // A set is prepared and not committed.
  bool prepared() const { return prepared_; }
  // The second half: the prepared weights become RunOn's (the ones it passed before are dropped).
  // FailedPrecondition when nothing is prepared.
  absl::Status CommitLoras();

  // P of a sequence-parallel set (its compile option `sequence_parallel`), 1 otherwise.
  int sequence_parallel() const { return sequence_parallel_; }
  // The c10d group name a sequence-parallel set's all-to-alls resolve (its manifest's
  // `process_group`; Load refuses such a set without one), "" for other sets.
  const std::string& process_group() const { return process_group_; }
  // This process's rank among the set's P. InvalidArgument unless 0 <= rank < P.
  absl::Status SetSequenceParallelRank(int rank);

  const cache::PackageManifest& manifest() const { return manifest_; }
  const c10::Device& device() const { return device_; }
  // Layers of `region` (1 for head and tail, 0 for an absent region).
  int layers(const std::string& region) const;
  // Device bytes of the weights held (each tensor counted once per layer that uses it).
  uint64_t weight_bytes() const { return weight_bytes_; }

 private:
  struct Region {
    std::string name;
    std::unique_ptr<AotiPackage> package;
    int activations = 0;                 // inputs before the weights
    std::vector<std::string> prefixes;   // one per layer
    cache::PackageManifest weights;      // layer-relative weight names → specs (derive rules)
    std::vector<std::string> weight_names;       // in call order
    std::vector<std::vector<at::Tensor>> base;      // per layer, the weights in call order
    std::vector<std::vector<at::Tensor>> layers;    // RunOn's: base or a LoRA set's
    std::vector<std::vector<at::Tensor>> prepared;  // PrepareLoras', until CommitLoras
  };
  RegionalTransformer() = default;
  // Layer `layer` of `r` as a package manifest of its own: the checkpoint names (prefix +
  // layer-relative name, derive sources likewise) in call order in `fqns`, with their specs.
  static cache::PackageManifest LayerManifest(const Region& r, int layer,
                                              std::vector<std::string>* fqns);
  // Runs layer `layer` of `r` on `activations`; returns its outputs.
  absl::StatusOr<std::vector<at::Tensor>> RunLayer(Region& r, int layer,
                                                   std::vector<at::Tensor> activations,
                                                   void* cuda_stream);

  cache::PackageManifest manifest_;
  c10::Device device_ = c10::kCPU;
  std::map<std::string, Region> regions_;  // by name
  bool weights_loaded_ = false;
  bool prepared_ = false;
  uint64_t weight_bytes_ = 0;
  int sequence_parallel_ = 1;
  std::string process_group_;
  int rank_ = -1;  // SetSequenceParallelRank's; -1: not set (0 is implied when P = 1)
};

}  // namespace kiln::pipeline
