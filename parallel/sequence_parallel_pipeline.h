// SequenceParallelPipeline: a whole image on the P ranks of one process group (issue 15,
// docs/multi_gpu.md): prompt → RGB on rank 0, the transformer's denoise loop over every rank.
// Each rank owns one (one process or one thread per GPU), built on a group that is already up.
//
//   rank 0     Generate: FluxPipeline::EncodePrompt (tokenize, the bucket's packages — the
//              transformer by KeyPolicy's key, one rank's set of P — the text encoders), the
//              noise drawn from the seed as Generate draws it, the loop below, the VAE decode
//   rank r > 0 Follow: FluxPipeline::FollowDenoise (the bucket's transformer set only)
//
// One job, in the same order on every rank:
//   1. rank 0 broadcasts the job's header (width, height, steps, the byte length of its LoRA
//      set; or "stop"), then the LoRA set's bytes if any, once the request passed its own
//      checks (a bad request, a LoRA rank 0 cannot read, or a size whose rows do not divide over
//      P fails on rank 0 alone: the followers never hear of it and wait for the next job);
//   2. every rank says whether it got as far as the loop (all-gathered): rank 0 after encoding
//      and switching to the job's LoRA set, the others after reading the job's LoRA files from
//      their own LoraLibrary, loading their transformer and merging the set into it
//      (FollowDenoise); the first rank that did not broadcasts its error: the followers return
//      rank 0's as Aborted ("rank 0 failed the job: ..."), every other rank a follower's as
//      FailedPrecondition naming the ranks that refused and the first one's reason (e.g. a
//      LoRA missing there: "rank(s) 1 could not take the job (rank 1: ... not found ...)");
//   3. parallel::SequenceParallelDenoise (its own verdict, the scatter, the loop, the gather);
//   4. rank 0 decodes; Follow returns OK.
// The pipeline's FluxPipeline gets PipelineOptions::denoise_loop (steps 2 and 3), so the rest
// of a job is FluxPipeline's own code.
//
// Every wait is a collective of the group, bounded by its timeout (GroupOptions::
// timeout_seconds): a follower waiting for a job that does not come, or for a rank 0 that died
// or takes longer than that to encode (or to compile a package on a miss), fails with the
// group's DeadlineExceeded/Internal error; after such an error the group is not usable. After
// any other error the ranks are still in step and the next job can run.
//
// Threads: every call on the thread that issues the group's collectives (with c10d's thread
// isolation mode, the thread that registered it); the group must outlive the pipeline.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/package_provider.h"
#include "parallel/process_group.h"
#include "pipeline/flux_pipeline.h"

namespace kiln::parallel {

class SequenceParallelPipeline {
 public:
  // `options` as for FluxPipeline, with compile_options' `sequence_parallel` equal to the
  // group's size (1 or absent for a group of one) and the regional layout; denoise_loop must
  // be empty (this class sets it). Every rank calls it at once: in a group of more than one,
  // rank 0 reads the transformer checkpoint under its model_dir once and broadcasts it
  // (parallel::BroadcastWeights), and every rank's pipeline takes its transformer weights from
  // the broadcast tensors (pipeline::ComponentWeights::FromTensors), so no other rank opens the
  // checkpoint (its model_dir needs the configs and tokenizers only). FailedPrecondition for a
  // rank count the options (the package set) are not for, InvalidArgument for a device other
  // than the group's; the broadcast's errors on every rank ("sequence parallel: the transformer
  // weights broadcast: ...", e.g. FailedPrecondition with rank 0's error when it cannot read the
  // checkpoint; a rank that never takes part fails the others at the group's timeout);
  // FluxPipeline's errors as they are.
  static absl::StatusOr<std::unique_ptr<SequenceParallelPipeline>> Create(
      ProcessGroup& group, pipeline::PipelineOptions options,
      std::shared_ptr<cache::PackageProvider> provider);
  ~SequenceParallelPipeline();
  SequenceParallelPipeline(const SequenceParallelPipeline&) = delete;
  SequenceParallelPipeline& operator=(const SequenceParallelPipeline&) = delete;

  // Rank 0: one job over every rank (the followers must be in Follow). Same seed, same image
  // as a single-rank FluxPipeline with the regional layout, within fp32 rounding
  // (tests/parallel/sequence_parallel_pipeline_test.cc). The request's CancelToken is checked
  // before and after the loop, not inside it. The request's LoRA set is merged on every rank,
  // each reading the files from its own PipelineOptions::lora_dirs. FailedPrecondition on
  // another rank.
  absl::StatusOr<pipeline::GenerateResult> Generate(const pipeline::GenerateRequest& request,
                                                    const pipeline::ProgressFn& progress = {});
  // Rank 0: Generate after its EncodePrompt, for a prompt encoded beforehand by pipeline()
  // .EncodePrompt, which may run on another thread beside the previous job's loop (it issues no
  // collective): steps 1 to 4. FailedPrecondition on another rank.
  absl::StatusOr<pipeline::GenerateResult> DenoiseDecode(pipeline::EncodedPrompt encoded,
                                                         const pipeline::ProgressFn& progress = {});
  // Rank 0: tells the followers there are no more jobs (their Follow returns OutOfRange).
  absl::Status Stop();
  // Rank 0, between jobs: a header that is no job (the followers' Follow goes on waiting), so
  // that a follower of an idle node is not failed by the group's timeout. Sent more often than
  // the timeout (parallel/sequence_parallel_threads.h does).
  absl::Status KeepAlive();
  // Ranks other than 0: serves rank 0's next job and returns when its loop ended here. OK: the
  // job's denoise ran. OutOfRange: rank 0 stopped. Aborted: rank 0 failed the job before its
  // loop (its message included). This rank's own error as it is (e.g. NotFound for a missing
  // package or LoRA); FailedPrecondition naming the ranks that refused and the first one's
  // reason; a collective's error.
  absl::Status Follow();

  int rank() const;
  pipeline::FluxPipeline& pipeline() { return *pipeline_; }
  // The transformer weights' broadcast at Create (0 in a group of one, which reads its own):
  // the checkpoint's tensor bytes, and the seconds from the call until they were on this rank's
  // device (rank 0: reading and sending; the others: waiting and receiving).
  uint64_t broadcast_bytes() const { return broadcast_bytes_; }
  double broadcast_seconds() const { return broadcast_seconds_; }

 private:
  explicit SequenceParallelPipeline(ProcessGroup& group) : group_(group) {}
  // Step 2 for this rank: ready if `error` is OK, else refusing with it (rank 0's is sent to
  // the followers). Returns `error`, rank 0's (Aborted, on a follower), a refusal naming the
  // refusing ranks, or a collective's error.
  absl::Status Rendezvous(const absl::Status& error);
  // PipelineOptions::denoise_loop: steps 2 and 3.
  absl::Status Loop(pipeline::DenoiseJob& job);
  // Rank 0: a header with no job (kind: stop or idle); `what` names the caller for the error a
  // follower gets (FailedPrecondition).
  absl::Status SendHeader(int64_t kind, const char* what);

  ProcessGroup& group_;
  std::unique_ptr<pipeline::FluxPipeline> pipeline_;
  bool met_ = false;  // this job's Rendezvous has run
  uint64_t broadcast_bytes_ = 0;
  double broadcast_seconds_ = 0;
};

}  // namespace kiln::parallel
