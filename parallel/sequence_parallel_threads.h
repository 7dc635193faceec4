// SequenceParallelThreads: the P ranks of a multi-device node (kiln-node --gpus, issue 15,
// docs/multi_gpu.md) as threads of the node process, one per device, each with its own
// ProcessGroup (c10d's thread isolation mode: each thread registers its group under the name
// the packages resolve, the compile option `process_group`, "0" when absent) and its own
// SequenceParallelPipeline (rank 0 broadcasts the transformer weights to the others while they
// start). A job is encoded on the caller's thread with rank 0's pipeline (EncodePrompt) and
// denoised and decoded on rank 0's thread (DenoiseDecode), the others waiting in
// SequenceParallelPipeline::Follow; idle, rank 0's thread keeps them alive, also while a job is
// encoded.
//
// This header names no LibTorch type, so node/ (which must not see LibTorch's include
// directories) can hold one per served (model, precision).
//
// Threads: Start and the destructor on one thread; Generate, EncodePrompt and DenoiseDecode
// from any thread (calls of each served one at a time, in arrival order; an EncodePrompt may
// run beside a DenoiseDecode); DigestsFor, LoadedDigests, AppliedLoras and AvailableLoras from
// any thread. The object owns and joins its P threads. Start turns c10d's thread isolation mode
// on for the process and leaves it on (a process group registered by one thread is then
// invisible to the others: kiln-node registers groups only here).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/package_provider.h"
#include "pipeline/flux_pipeline.h"

namespace kiln::parallel {

struct ThreadsOptions {
  // One entry per rank, the device its thread runs on: "cpu" (gloo) or "cuda:<index>" (NCCL).
  // Rank 0 is the first. At least one.
  std::vector<std::string> devices;
  // Bounds the group's join and each of its collectives, seconds. Rank 0's thread sends a
  // keep-alive after a quarter of it without a job to denoise (an encode on the caller's thread,
  // a compile on a package miss included, needs no bound); once it has one, the followers wait
  // within it for each step of the loop.
  double timeout_seconds = 600;
};

class SequenceParallelThreads {
 public:
  // Starts one thread per device; each joins the group (TCPStore on loopback, ephemeral port,
  // registered under pipeline.compile_options' `process_group`: pipeline::ProcessGroupName)
  // and creates its SequenceParallelPipeline from `options` (pipeline.device is replaced by the
  // rank's device; compile_options must carry sequence_parallel = P and the regional layout,
  // as SequenceParallelPipeline::Create checks). Returns when every rank is ready; the first
  // rank's error otherwise (e.g. Unimplemented: no gloo in this build; FailedPrecondition: a
  // set for another rank count; DeadlineExceeded: a rank that never joined), after every
  // thread has ended.
  static absl::StatusOr<std::unique_ptr<SequenceParallelThreads>> Start(
      const ThreadsOptions& options, const pipeline::PipelineOptions& pipeline,
      std::shared_ptr<cache::PackageProvider> provider);
  // Stops the followers (SequenceParallelPipeline::Stop) and joins every thread.
  ~SequenceParallelThreads();
  SequenceParallelThreads(const SequenceParallelThreads&) = delete;
  SequenceParallelThreads& operator=(const SequenceParallelThreads&) = delete;

  // One job over every rank: EncodePrompt then DenoiseDecode; blocks until it ends.
  absl::StatusOr<pipeline::GenerateResult> Generate(const pipeline::GenerateRequest& request,
                                                    const pipeline::ProgressFn& progress);
  // The job in two stages, as FluxPipeline's (node/worker.h overlaps them): EncodePrompt on
  // the calling thread with rank 0's pipeline (no collective: it may run beside the previous
  // job's loop; while it runs, rank 0's thread keeps the followers alive, so the group's
  // timeout need not cover it), DenoiseDecode on rank 0's thread (the loop over every rank,
  // the decode; `progress` is called there). Calls of each are served one at a time.
  // Unavailable once the group failed (health()); FailedPrecondition once the object is
  // stopping.
  absl::StatusOr<pipeline::EncodedPrompt> EncodePrompt(const pipeline::GenerateRequest& request,
                                                       const pipeline::ProgressFn& progress);
  absl::StatusOr<pipeline::GenerateResult> DenoiseDecode(pipeline::EncodedPrompt encoded,
                                                         const pipeline::ProgressFn& progress);
  // Rank 0's pipeline's (its set: the text encoders, the VAE, one rank's transformer set).
  std::vector<std::string> DigestsFor(int width, int height) const;
  std::vector<std::string> LoadedDigests() const;
  // Rank 0's pipeline's LoRA set merged now (LoraSetKey; every rank merges each job's set) and
  // the LoRAs its lora_dirs hold (a follower reads its own: one missing there fails the job).
  std::string AppliedLoras() const;
  std::vector<std::string> AvailableLoras() const;
  int world_size() const;
  // OK while the group is usable; once one of its collectives failed (a rank gone, or not in
  // step within the timeout), Unavailable for good: "sequence parallel group '<name>' of P
  // ranks (<devices>) failed: <the collective's error>". The node reports it in its heartbeats
  // (node/README.md "A multi-GPU node"). Any thread.
  absl::Status health() const;

  struct State;  // shared with the rank threads (sequence_parallel_threads.cc)

 private:
  explicit SequenceParallelThreads(std::shared_ptr<State> state) : state_(std::move(state)) {}
  std::shared_ptr<State> state_;
};

}  // namespace kiln::parallel
