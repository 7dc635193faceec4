// The denoise loop and the transformer step it repeats.
//
// A `Denoiser` answers one question per step: the model's velocity at the current latents and
// timestep, given the request's conditioning. `PlainDenoiser` runs the transformer package;
// `CudaGraphDenoiser` replays a CUDA graph captured from it (pipeline/cuda_graph.h), its static
// inputs refilled per request (Prepare) and per step (Velocity). `RunDenoiseLoop` is the
// flow-matching Euler loop around any Denoiser: state in float32 on the device, no host sync,
// the cancel token checked between steps. Tests drive the loop with a fake Denoiser on the CPU.
//
// Threads: a Denoiser and the loop run on the caller's (Generate()'s) thread.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "pipeline/aoti_package.h"
#include "pipeline/cancel_token.h"
#include "pipeline/cuda_graph.h"

namespace kiln::pipeline {

// A request's conditioning: the transformer's inputs other than latents and timestep, on the
// device.
// B = the batch: the jobs denoised together (1 alone), one row each.
struct DenoiseConditioning {
  at::Tensor text;      // act [B, L, joint_attention_dim]: T5's last hidden state
  at::Tensor pooled;    // act [B, pooled_projection_dim]: CLIP's pooled output
  at::Tensor guidance;  // float32 [B]: the guidance scale of each job
};

class Denoiser {
 public:
  virtual ~Denoiser() = default;
  // Takes this request's conditioning; called once per request, before its first Velocity().
  virtual absl::Status Prepare(const DenoiseConditioning& conditioning) = 0;
  // The velocity at `latents` (float32 [B, S, C], the loop's state) and `timestep` (float32 [B],
  // on the device). The result may be a buffer that the next call overwrites.
  virtual absl::StatusOr<at::Tensor> Velocity(const at::Tensor& latents,
                                              const at::Tensor& timestep) = 0;
  // True if steps replay a captured CUDA graph.
  virtual bool cuda_graph() const = 0;
};

// One transformer evaluation: the whole-graph transformer's five inputs (latents in `act`, text,
// pooled, timestep, guidance) → its outputs, velocity first, run on `cuda_stream` (null: the
// current stream). A whole-graph package's AotiPackage::RunOn or a regional set's
// RegionalTransformer::RunOn (pipeline/regional.h).
using TransformerFn = GraphRunFn;
// `package`'s RunOn; `package` must outlive the function.
TransformerFn TransformerOf(AotiPackage& package);

// Runs the transformer every step. What `transformer` runs must outlive this.
class PlainDenoiser : public Denoiser {
 public:
  // `act`: the activation dtype the package takes (latents are cast to it each step).
  PlainDenoiser(AotiPackage& transformer, at::ScalarType act)
      : PlainDenoiser(TransformerOf(transformer), act) {}
  PlainDenoiser(TransformerFn transformer, at::ScalarType act)
      : transformer_(std::move(transformer)), act_(act) {}
  absl::Status Prepare(const DenoiseConditioning& conditioning) override;
  absl::StatusOr<at::Tensor> Velocity(const at::Tensor& latents,
                                      const at::Tensor& timestep) override;
  bool cuda_graph() const override { return false; }

 private:
  TransformerFn transformer_;
  const at::ScalarType act_;
  DenoiseConditioning conditioning_;
};

// Replays the transformer step captured as a CUDA graph. Captured once per bucket and reused by
// every request of that bucket. `transformer` must outlive this.
class CudaGraphDenoiser : public Denoiser {
 public:
  // Captures `transformer` (CUDA, constants loaded) on one step's inputs: `latents` and
  // `timestep` as Velocity() takes them, `conditioning` as Prepare() does. As
  // PackageGraph::Capture: FailedPrecondition for a CPU package, Unimplemented without CUDA,
  // Internal if capture fails (the caller may fall back to a PlainDenoiser).
  static absl::StatusOr<std::unique_ptr<CudaGraphDenoiser>> Capture(
      AotiPackage& transformer, at::ScalarType act, const DenoiseConditioning& conditioning,
      const at::Tensor& latents, const at::Tensor& timestep);
  // The same for any transformer function on `device` (a regional set's loop over layers is
  // captured whole, as one step); `what` names it in errors.
  static absl::StatusOr<std::unique_ptr<CudaGraphDenoiser>> Capture(
      const c10::Device& device, const std::string& what, const TransformerFn& transformer,
      at::ScalarType act, const DenoiseConditioning& conditioning, const at::Tensor& latents,
      const at::Tensor& timestep);
  absl::Status Prepare(const DenoiseConditioning& conditioning) override;
  absl::StatusOr<at::Tensor> Velocity(const at::Tensor& latents,
                                      const at::Tensor& timestep) override;
  bool cuda_graph() const override { return true; }

 private:
  explicit CudaGraphDenoiser(std::unique_ptr<PackageGraph> graph) : graph_(std::move(graph)) {}
  std::unique_ptr<PackageGraph> graph_;
};

struct DenoiseSchedule {
  std::vector<double> sigmas;  // steps + 1 (scheduler.h's FluxSchedule::sigmas)
  // float32 [steps, R] on the device, R = B rounded up to a multiple of 4: row i's first B
  // values are step i's model timestep (rows of whole 16-byte units, so each step's [B] view
  // starts aligned, as AOTI's kernels assume).
  at::Tensor timesteps;
};

class RegionalTransformer;  // pipeline/regional.h

// One job's denoise, handed to PipelineOptions::denoise_loop (flux_pipeline.h) in place of the
// pipeline's own loop: a sequence-parallel pipeline's loop over the ranks of a process group
// (parallel/sequence_parallel_pipeline.h). On a follower rank (FluxPipeline::FollowDenoise) the
// conditioning and latents are empty: the loop gets its shares from rank 0.
struct DenoiseJob {
  RegionalTransformer* transformer = nullptr;  // the bucket's regional set, loaded
  DenoiseConditioning conditioning;            // on the device (empty on a follower)
  DenoiseSchedule schedule;                    // the job's, the same on every rank
  // float32 [B, S, C] on the device: the initial noise in, the final latents out (empty on a
  // follower, where the loop may leave anything).
  at::Tensor latents;
  at::ScalarType act = at::kFloat;  // the transformer's activation dtype
};

// The flow-matching Euler loop: for i in [0, steps), latents += (sigmas[i+1] - sigmas[i]) *
// velocity(latents, timesteps[i][:B]), in float32, in place (B = latents.size(0)). Before each
// step it checks `cancel` (nullable): CancelledAfterStep(i, steps). After each step it calls `on_step(i + 1)` (nullable;
// a host-side count, the device may still be working). `profiler` (nullable) brackets each step.
// A Velocity() error is returned as it is and ends the loop.
absl::Status RunDenoiseLoop(Denoiser& denoiser, const DenoiseSchedule& schedule,
                            const at::Tensor& latents, const CancelToken* cancel,
                            const std::function<void(int step)>& on_step,
                            StepProfiler* profiler);

}  // namespace kiln::pipeline
