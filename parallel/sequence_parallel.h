// The sequence-parallel (Ulysses) denoise loop over the ranks of one process group (issue 15,
// docs/multi_gpu.md): one image denoised by P ranks, each holding a contiguous 1/P of the image
// tokens and of the text tokens for the whole loop.
//
//   rank 0: the whole noise [B, S, C] and text [B, L, J], the pooled vector and the guidance
//   1. a verdict from every rank (all-gathered): the set is one rank's of P = the group's size,
//      registered under the name its all-to-alls resolve (the manifest's `process_group`),
//      and, on rank 0, the inputs' token counts divide over P into the set's per-rank sizes;
//      any refusal fails every rank, naming the refusing rank(s), before any data moves
//   2. scatter: rank r receives tokens [r*S/P, (r+1)*S/P) of the noise and [r*L/P, (r+1)*L/P)
//      of the text; pooled and guidance are broadcast
//   3. the Euler loop (pipeline::RunDenoiseLoop around a PlainDenoiser) on the rank's shard; each
//      step is RegionalTransformer::RunOn over every block, the all-to-alls inside the blocks'
//      packages going through the group registered under the packages' name (the compile
//      option `process_group`, "0" when absent)
//   4. all-gather: every rank returns the whole final latents [B, S, C], in token order
//
// The same function with P = 1 (a group of one, an ordinary regional set) is the single-rank
// loop, which is what tests/parallel/sequence_parallel_test.cc compares against.
//
// Threads: called on the thread that issues the group's collectives, on every rank at once.
#pragma once

#include <torch/torch.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "parallel/process_group.h"
#include "pipeline/denoiser.h"
#include "pipeline/regional.h"

namespace kiln::parallel {

// Rank `rank`'s contiguous 1/world of `x` along `dim` (a view). InvalidArgument, naming the
// numbers, when world < 1, rank is not in [0, world), or x.size(dim) does not divide by world
// (`what` names the tokens in that message: "image tokens", "text tokens").
absl::StatusOr<at::Tensor> TokenShard(const at::Tensor& x, int rank, int world, int64_t dim = 1,
                                      const char* what = "tokens");

// What rank 0 brings to the loop (the other ranks pass an empty one: they get their shares).
struct SequenceParallelInputs {
  at::Tensor latents;  // float32 [B, S, C] on the group's device: the initial noise, whole
  pipeline::DenoiseConditioning conditioning;  // text [B, L, J] whole; pooled; guidance [B]
};

// Runs steps 1-4 above and returns the whole final latents (float32 [B, S, C]) on every rank.
// `transformer` is this rank's sequence-parallel regional set (weights loaded), `schedule` the
// job's (the same on every rank), `act` the transformer's activation dtype. Errors:
// FailedPrecondition when the set is for another number of ranks than the group has, or
// resolves another group name than the group's (or a peer refused); InvalidArgument on rank 0
// for inputs that do not fit the set (token counts not divisible by P, or not P times the set's
// per-rank sizes, or a wrong shape); a transformer or collective error as it is.
absl::StatusOr<at::Tensor> SequenceParallelDenoise(ProcessGroup& group,
                                                   pipeline::RegionalTransformer& transformer,
                                                   const SequenceParallelInputs& inputs,
                                                   const pipeline::DenoiseSchedule& schedule,
                                                   at::ScalarType act);

}  // namespace kiln::parallel
