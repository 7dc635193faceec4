// BroadcastWeights: a multi-GPU node reads each checkpoint once (issue 15, item 3). Rank 0 opens
// the component's safetensors with the node's loader (pipeline::WeightSet, mmap'd, prefetched)
// and broadcasts every tensor over the ProcessGroup; the other ranks never open the files.
//
// Wire order, every rank in step (c10d's contract):
//   1. a header, int64 [ok, payload bytes]: ok = 0 when rank 0 could not open the checkpoint,
//      the payload then being its error (every rank fails with it);
//   2. the payload: the manifest's SHA-256 (64 hex digits) followed by the manifest, canonical
//      JSON {"tensors": [{"name", "dtype", "shape", "nbytes"}, ...]} in name order;
//   3. each rank checks the digest against the manifest it received and against the digest it
//      expects (`expected_digest`, when set), then all ranks all-gather their verdicts, so a
//      refusal fails every rank (rank 0 included) rather than leaving the others in a broadcast;
//   4. every tensor with nbytes > 0, in manifest order, as bytes (so fp8 and bool need no backend
//      support), one broadcast in flight while the next tensor is read (rank 0) or allocated.
// Errors: FailedPrecondition (rank 0 could not read the checkpoint; a digest mismatch, naming the
// ranks that refused and both digests on the refusing rank); DataLoss (a manifest whose digest
// does not match its bytes, or that does not parse); Unimplemented (a dtype LibTorch has no type
// for, found in the manifest check: every rank fails before any tensor moves); the
// ProcessGroup's collective errors.
//
// Threads: the caller's; the group's collectives must not be interleaved with another thread's.
#pragma once

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "parallel/process_group.h"
#include "pipeline/safetensors.h"

namespace kiln::parallel {

struct BroadcastOptions {
  // Rank 0: the component folder and checkpoint stem (pipeline::WeightSet::OpenDir). Ignored on
  // the other ranks, which never touch the file system.
  std::string dir;
  std::string stem = "diffusion_pytorch_model";
  // Hex SHA-256 of the manifest this rank expects (ManifestDigest of the checkpoint it was
  // configured for); empty accepts rank 0's checkpoint, whatever it is.
  std::string expected_digest;
};

struct BroadcastResult {
  // Every tensor of the checkpoint, in name order, on the group's device, owned (rank 0's are
  // copies of the mapping, so they outlive the files).
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::string digest;  // the manifest's SHA-256
  uint64_t bytes = 0;  // tensor bytes moved (the checkpoint's total)
  double seconds = 0;  // from the call until every tensor is on this rank's device (rank 0:
                       // opening, reading and broadcasting; other ranks: waiting and receiving)
  double GigabytesPerSecond() const { return seconds > 0 ? bytes / seconds / 1e9 : 0; }
};

// The manifest of `set` (canonical JSON, see the file comment) and its hex SHA-256.
std::string ManifestJson(const pipeline::WeightSet& set);
std::string ManifestDigest(const pipeline::WeightSet& set);

// Every rank of `group` calls this at the same point (see the file comment for the order and the
// errors).
absl::StatusOr<BroadcastResult> BroadcastWeights(ProcessGroup& group,
                                                 const BroadcastOptions& options);

}  // namespace kiln::parallel
