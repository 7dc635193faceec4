#include "parallel/process_group.h"

// The backends are compiled in only where parallel/CMakeLists.txt found their headers
// (KILN_WITH_GLOO: gloo's, Debian's libgloo-dev; KILN_WITH_NCCL: nccl.h in a CUDA build).
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if KILN_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if KILN_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"

namespace kiln::parallel {
namespace {

constexpr char kJoinPrefix[] = "kiln/join/";

std::chrono::milliseconds Millis(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

std::string Key(const std::string& what) { return absl::StrCat(kJoinPrefix, what); }

std::string ToString(const std::vector<uint8_t>& bytes) {
  return std::string(bytes.begin(), bytes.end());
}

std::vector<uint8_t> ToBytes(const std::string& text) {
  return std::vector<uint8_t>(text.begin(), text.end());
}

// Waits up to `timeout_seconds` for `keys`; the indices of those still missing when it gives up
// (empty: all present), and the store's reason in `reason`.
std::vector<size_t> WaitKeys(c10d::Store& store, const std::vector<std::string>& keys,
                             double timeout_seconds, std::string* reason) {
  try {
    store.wait(keys, Millis(timeout_seconds));
    return {};
  } catch (const std::exception& e) {
    *reason = ExceptionMessage(e);
    std::vector<size_t> missing;
    for (size_t i = 0; i < keys.size(); ++i) {
      bool present = false;
      try {
        present = store.check({keys[i]});
      } catch (const std::exception&) {
        // The store itself is gone: count the key as missing.
      }
      if (!present) missing.push_back(i);
    }
    return missing;
  }
}

// The join protocol (rank 0 judges, the others read its verdict): each rank claims its rank
// once and records its world size; rank 0 waits for ranks 1..N-1, compares their world sizes
// with its own and publishes "ok <N>" or the reason the group cannot form. On a refusal rank 0
// waits (bounded) for every rank that joined to have read the verdict before it returns, since
// its process may exit and take the store with it.
absl::Status Join(c10d::Store& store, const GroupOptions& o) {
  const int64_t claims = store.add(Key(absl::StrCat("claims/", o.rank)), 1);
  if (claims > 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "rank ", o.rank, " joined twice: another process already holds it (", claims, " claims)"));
  }
  store.set(Key(absl::StrCat("world/", o.rank)), ToBytes(absl::StrCat(o.world_size)));
  const std::string verdict_key = Key("verdict");
  auto read_key = [](int r) { return Key(absl::StrCat("read/", r)); };
  if (o.rank == 0) {
    std::vector<std::string> keys;
    for (int r = 1; r < o.world_size; ++r) keys.push_back(Key(absl::StrCat("world/", r)));
    std::string reason;
    std::vector<size_t> missing = WaitKeys(store, keys, o.timeout_seconds, &reason);
    std::vector<std::string> absent, wrong;
    std::vector<std::string> joined;  // the read keys of the ranks present
    for (size_t i = 0, m = 0; i < keys.size(); ++i) {
      const int r = static_cast<int>(i) + 1;
      if (m < missing.size() && missing[m] == i) {
        absent.push_back(absl::StrCat(r));
        ++m;
        continue;
      }
      joined.push_back(read_key(r));
      std::string theirs = ToString(store.get(keys[i]));
      if (theirs != absl::StrCat(o.world_size)) {
        wrong.push_back(absl::StrCat("rank ", r, " was started with world size ", theirs));
      }
    }
    absl::Status status = absl::OkStatus();
    if (!wrong.empty()) {
      status = absl::FailedPreconditionError(absl::StrCat(
          "world size mismatch: rank 0 has ", o.world_size, ", ", absl::StrJoin(wrong, "; "),
          absent.empty() ? ""
                         : absl::StrCat(" (rank(s) ", absl::StrJoin(absent, ", "), " absent)")));
    } else if (!absent.empty()) {
      status = absl::DeadlineExceededError(
          absl::StrCat("rank(s) ", absl::StrJoin(absent, ", "), " of ", o.world_size,
                       " did not join within ", o.timeout_seconds, " s (", reason, ")"));
    }
    store.set(verdict_key, ToBytes(status.ok() ? absl::StrCat("ok ", o.world_size)
                                               : std::string(status.message())));
    if (!status.ok() && !joined.empty()) WaitKeys(store, joined, o.timeout_seconds, &reason);
    return status;
  }
  // Rank 0 may itself wait the whole timeout for a missing rank before it judges: wait twice as
  // long, so that its verdict, not this rank's own clock, says what went wrong.
  std::string reason;
  if (!WaitKeys(store, {verdict_key}, 2 * o.timeout_seconds, &reason).empty()) {
    return absl::DeadlineExceededError(absl::StrCat("rank ", o.rank,
                                                    ": no verdict from rank 0 within ",
                                                    2 * o.timeout_seconds, " s (", reason, ")"));
  }
  std::string verdict = ToString(store.get(verdict_key));
  store.set(read_key(o.rank), ToBytes("1"));
  absl::string_view rest = verdict;
  int64_t theirs = 0;
  if (!absl::ConsumePrefix(&rest, "ok ") || !absl::SimpleAtoi(rest, &theirs)) {
    return absl::FailedPreconditionError(
        absl::StrCat("rank ", o.rank, ": rank 0 refused the group: ", verdict));
  }
  if (theirs != o.world_size) {
    return absl::FailedPreconditionError(absl::StrCat("world size mismatch: rank 0 has ", theirs,
                                                      ", rank ", o.rank, " was started with ",
                                                      o.world_size));
  }
  return absl::OkStatus();
}

}  // namespace

bool HasGloo() {
#if KILN_WITH_GLOO
  return true;
#else
  return false;
#endif
}

bool HasNccl() {
#if KILN_WITH_NCCL
  return true;
#else
  return false;
#endif
}

absl::Status GroupOptions::Validate() const {
  if (world_size < 1)
    return absl::InvalidArgumentError(absl::StrCat("world_size: ", world_size, " (must be >= 1)"));
  if (rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rank: ", rank,
                                                   " is out of range for world size ", world_size,
                                                   " (0..", world_size - 1, ")"));
  }
  if (port < 0 || port > 65535)
    return absl::InvalidArgumentError(absl::StrCat("port: ", port, " (0..65535)"));
  if (port == 0 && rank != 0 && world_size > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "port: rank ", rank, " needs rank 0's port (0 = ephemeral is rank 0's alone)"));
  }
  if (address.empty()) return absl::InvalidArgumentError("address: empty");
  if (!(timeout_seconds > 0))
    return absl::InvalidArgumentError(
        absl::StrCat("timeout_seconds: ", timeout_seconds, " (must be > 0)"));
  try {
    c10::Device d(device);
    if (!d.is_cpu() && !d.is_cuda())
      return absl::InvalidArgumentError(absl::StrCat("device: ", device, " (cpu or cuda:<index>)"));
    if (d.is_cuda() && !d.has_index()) {
      return absl::InvalidArgumentError(
          absl::StrCat("device: ", device, " needs an index (cuda:<index>: this rank's GPU)"));
    }
  } catch (const std::exception&) {
    return absl::InvalidArgumentError(
        absl::StrCat("device: '", device, "' is not a device (cpu or cuda:<index>)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ProcessGroup>> ProcessGroup::Create(const GroupOptions& options) {
  if (absl::Status s = options.Validate(); !s.ok()) return s;
  c10::Device device(options.device);
  if (device.is_cuda() && !HasNccl()) {
    return absl::UnimplementedError(
        absl::StrCat("device ", options.device,
                     ": this build has no NCCL (a CUDA LibTorch and nccl.h at configure time)"));
  }
  if (device.is_cpu() && !HasGloo()) {
    return absl::UnimplementedError(
        absl::StrCat("device ", options.device,
                     ": this build has no gloo (its headers, libgloo-dev, at configure time)"));
  }
  std::unique_ptr<ProcessGroup> pg(new ProcessGroup(options, device));
  const auto timeout = Millis(options.timeout_seconds);
  // 1. The store.
  if (options.world_size == 1) {
    pg->store_ = c10::make_intrusive<c10d::HashStore>();
  } else {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(options.port);
    so.isServer = options.rank == 0;
    so.waitWorkers = false;  // Join() waits, with errors that name the missing ranks
    so.timeout = timeout;
    try {
      auto tcp = c10::make_intrusive<c10d::TCPStore>(options.address, so);
      pg->port_ = tcp->getPort();
      pg->store_ = tcp;
    } catch (const std::exception& e) {
      return absl::UnavailableError(
          absl::StrCat("rank ", options.rank, ": ",
                       options.rank == 0 ? "cannot listen on " : "rank 0's store not reachable at ",
                       options.address, ":", options.port, " within ", options.timeout_seconds,
                       " s: ", ExceptionMessage(e)));
    }
  }
  if (options.rank == 0 && options.on_listen) options.on_listen(pg->port_);
  // 2. Every rank present, with one world size.
  try {
    if (absl::Status s = Join(*pg->store_, options); !s.ok()) return s;
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat(
        "rank ", options.rank, ": the group's store failed while joining: ", ExceptionMessage(e)));
  }
  // 3. The backends, rendezvousing under the group's own prefix.
  try {
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(
        absl::StrCat("kiln/group/", options.group_name, "/"), pg->store_);
    auto group =
        c10::make_intrusive<c10d::ProcessGroup>(prefixed, options.rank, options.world_size);
#if KILN_WITH_GLOO
    // CPU tensors go through gloo in every group (a CUDA group too, as Python's "cpu:gloo").
    auto gloo_options = c10d::ProcessGroupGloo::Options::create(timeout);
    gloo_options->devices.push_back(
        c10d::ProcessGroupGloo::createDeviceForHostname(options.address));
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>("gloo/", prefixed), options.rank, options.world_size,
        gloo_options);
    group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
    group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
#endif
#if KILN_WITH_NCCL
    if (device.is_cuda()) {
      // NCCL's communicator and the collectives' streams belong to the current device.
      c10::cuda::set_device(device.index());
      auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
      nccl_options->timeout = timeout;
      auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          c10::make_intrusive<c10d::PrefixStore>("nccl/", prefixed), options.rank,
          options.world_size, nccl_options);
      group->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
      group->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
    }
#endif
    if (!options.group_name.empty()) {
      group->setGroupName(options.group_name);
      c10d::register_process_group(options.group_name, group);
      pg->registered_ = true;
    }
    pg->group_ = group;
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("rank ", options.rank, ": the ",
                                               device.is_cuda() ? "NCCL" : "gloo",
                                               " backend did not start: ", ExceptionMessage(e)));
  }
  return pg;
}

ProcessGroup::~ProcessGroup() {
  if (registered_) {
    try {
      c10d::unregister_process_group(options_.group_name);
    } catch (const std::exception&) {
      // Already gone from the registry: nothing to undo.
    }
  }
}

absl::Status ProcessGroup::Wait(const c10::intrusive_ptr<c10d::Work>& work) {
  try {
    if (!work->wait(Millis(options_.timeout_seconds))) {
      return absl::DeadlineExceededError(absl::StrCat(
          "rank ", rank(), ": collective not done within ", options_.timeout_seconds, " s"));
    }
    return absl::OkStatus();
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("rank ", rank(), ": collective failed (a peer gone, or not done within ",
                     options_.timeout_seconds, " s): ", ExceptionMessage(e)));
  }
}

absl::StatusOr<c10::intrusive_ptr<c10d::Work>> ProcessGroup::BroadcastAsync(at::Tensor& tensor,
                                                                            int root) {
  if (root < 0 || root >= world_size()) {
    return absl::InvalidArgumentError(absl::StrCat("broadcast root ", root, " out of range"));
  }
  try {
    std::vector<at::Tensor> tensors{tensor};
    c10d::BroadcastOptions bo;
    bo.rootRank = root;
    bo.timeout = Millis(options_.timeout_seconds);
    return group_->broadcast(tensors, bo);
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("rank ", rank(), ": broadcast failed: ", ExceptionMessage(e)));
  }
}

absl::Status ProcessGroup::Broadcast(at::Tensor& tensor, int root) {
  auto work = BroadcastAsync(tensor, root);
  if (!work.ok()) return work.status();
  return Wait(*work);
}

absl::StatusOr<std::vector<at::Tensor>> ProcessGroup::AllGather(const at::Tensor& tensor) {
  try {
    std::vector<std::vector<at::Tensor>> out(1);
    for (int r = 0; r < world_size(); ++r) out[0].push_back(torch::empty_like(tensor));
    std::vector<at::Tensor> in{tensor};
    auto work = group_->allgather(out, in);
    if (absl::Status s = Wait(work); !s.ok()) return s;
    return out[0];
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("rank ", rank(), ": all-gather failed: ", ExceptionMessage(e)));
  }
}

absl::Status ProcessGroup::Scatter(const std::vector<at::Tensor>& chunks, at::Tensor& out,
                                   int root) {
  if (root < 0 || root >= world_size()) {
    return absl::InvalidArgumentError(absl::StrCat("scatter root ", root, " out of range"));
  }
  if (rank() == root && static_cast<int>(chunks.size()) != world_size()) {
    return absl::InvalidArgumentError(absl::StrCat("scatter: ", chunks.size(), " chunks for ",
                                                   world_size(), " ranks"));
  }
  try {
    std::vector<at::Tensor> outputs{out};
    std::vector<std::vector<at::Tensor>> inputs;
    if (rank() == root) {
      inputs.emplace_back();
      for (const auto& c : chunks) inputs[0].push_back(c.contiguous());
    }
    c10d::ScatterOptions so;
    so.rootRank = root;
    so.timeout = Millis(options_.timeout_seconds);
    return Wait(group_->scatter(outputs, inputs, so));
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("rank ", rank(), ": scatter failed: ", ExceptionMessage(e)));
  }
}

}  // namespace kiln::parallel
