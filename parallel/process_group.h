// ProcessGroup: the c10d process group of the ranks of one host (issue 15, docs/multi_gpu.md),
// set up from C++ so that the node owns it: a TCPStore for the rendezvous (rank 0 listens, the
// others connect), a gloo backend for CPU tensors and, in a build whose LibTorch has NCCL
// (KILN_WITH_NCCL: the CUDA wheel, with nccl.h found at configure time), an NCCL backend for
// CUDA tensors; the group is registered in c10d's registry under `group_name`, the name
// AOTInductor packages with functional collectives (`_c10d_functional.all_to_all_single`) resolve
// at run time.
//
// Joining is checked before any backend connects, so a misconfigured rank fails with a clear
// Status instead of hanging in a backend's own rendezvous:
//   InvalidArgument     bad options (GroupOptions::Validate: rank out of range, ...)
//   Unavailable         rank 0's store not reachable within `timeout_seconds` (or, on rank 0,
//                       the port cannot be bound)
//   DeadlineExceeded    ranks that did not join within `timeout_seconds` (named)
//   FailedPrecondition  a rank that joined with another world size, or twice with one rank
//                       (every rank of the group fails, each naming the offender)
//   Unimplemented       a CUDA group in a build without NCCL, a CPU one without gloo
// Collectives (Broadcast, AllGather) return Internal on a backend error or a peer that is gone
// or silent (gloo notices a silent peer only at the timeout: bounded by `timeout_seconds`);
// LibTorch's exceptions never leave this class.
//
// Threads: Create blocks the calling thread until every rank joined. One thread issues a group's
// collectives, in the same order on every rank (c10d's contract). The registry entry is removed
// by the destructor.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "pipeline/torch_error.h"

namespace kiln::parallel {

struct GroupOptions {
  // Rank 0's address; every rank of a host uses the same (loopback by default).
  std::string address = "127.0.0.1";
  // Rank 0's TCPStore port. Rank 0 may pass 0 to bind an ephemeral port (reported through
  // `on_listen`); the other ranks need the real one.
  int port = 0;
  // Ranks in the group (GPUs of the node), >= 1.
  int world_size = 1;
  // This process's rank, 0 <= rank < world_size; rank 0 reads the weights and hosts the store.
  int rank = 0;
  // "cpu": gloo; "cuda:<index>": NCCL on that GPU (needs KILN_WITH_NCCL).
  std::string device = "cpu";
  // Name the group is registered under (c10d::register_process_group): the one the SP packages
  // were exported with ("0", Python's WORLD, for bench/sp's packages). Empty: not registered.
  std::string group_name = "0";
  // Bound on joining (store connection, every rank's arrival) and on each collective, seconds.
  // Ranks other than 0 wait up to twice this for rank 0's verdict on the join (rank 0 may spend
  // the whole timeout waiting for a missing rank before it judges).
  double timeout_seconds = 60;
  // Called on rank 0 with the bound port once the store listens, before waiting for the others
  // (a launcher that passed port 0 hands the port to the other ranks from here, e.g. with
  // parallel/port_file.h). A world of one needs no store: it is called with 0.
  std::function<void(int port)> on_listen;

  absl::Status Validate() const;
};

// True when this build can make a gloo (CPU) / an NCCL (CUDA) group.
bool HasGloo();
bool HasNccl();

class ProcessGroup {
 public:
  // Joins the group (see the file comment for the errors).
  static absl::StatusOr<std::unique_ptr<ProcessGroup>> Create(const GroupOptions& options);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return options_.rank; }
  int world_size() const { return options_.world_size; }
  // The device collectives run on: tensors handed to Broadcast/AllGather live there.
  const c10::Device& device() const { return device_; }
  // The name the group is registered under ("" if not registered).
  const std::string& group_name() const { return options_.group_name; }
  // The port rank 0's store listens on.
  int port() const { return port_; }
  // The c10d group (for callers that hand it to LibTorch code).
  const c10::intrusive_ptr<c10d::ProcessGroup>& c10d_group() const { return group_; }

  // Broadcasts `tensor` (contiguous, on device()) from `root` in place, waiting for completion.
  absl::Status Broadcast(at::Tensor& tensor, int root = 0);
  // Starts a broadcast; Wait() it before reading `tensor` (or, on the root, writing it).
  absl::StatusOr<c10::intrusive_ptr<c10d::Work>> BroadcastAsync(at::Tensor& tensor, int root = 0);
  absl::Status Wait(const c10::intrusive_ptr<c10d::Work>& work);
  // Every rank's `tensor` (same shape and dtype on every rank), in rank order.
  absl::StatusOr<std::vector<at::Tensor>> AllGather(const at::Tensor& tensor);
  // Scatters from `root`: rank r receives `chunks[r]` into `out` (contiguous, on device(), the
  // chunk's shape and dtype). On the root `chunks` holds world_size() tensors; elsewhere it is
  // ignored. InvalidArgument for a bad root or, on the root, a wrong number of chunks.
  absl::Status Scatter(const std::vector<at::Tensor>& chunks, at::Tensor& out, int root = 0);

 private:
  ProcessGroup(GroupOptions options, c10::Device device)
      : options_(std::move(options)), device_(device) {}

  GroupOptions options_;
  c10::Device device_;
  int port_ = 0;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  bool registered_ = false;
};

// The message of a LibTorch exception without its C++ backtrace (pipeline/torch_error.h).
using pipeline::ExceptionMessage;

}  // namespace kiln::parallel
