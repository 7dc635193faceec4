#include "parallel/weight_broadcast.h"

#include <torch/cuda.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/hash.h"
#include "common/stopwatch.h"
#include "nlohmann/json.hpp"
#include "pipeline/weights.h"

namespace kiln::parallel {
namespace {

constexpr size_t kDigestChars = 64;  // hex SHA-256

struct Entry {
  std::string name;
  at::ScalarType type = at::kByte;
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
};

nlohmann::json ManifestOf(const pipeline::WeightSet& set) {
  nlohmann::json tensors = nlohmann::json::array();
  for (const std::string& name : set.names()) {
    const pipeline::TensorView* v = set.Find(name);
    tensors.push_back({{"name", name},
                       {"dtype", pipeline::DTypeName(v->dtype)},
                       {"shape", v->shape},
                       {"nbytes", v->nbytes}});
  }
  return {{"tensors", tensors}};
}

// The torch dtype of a safetensors dtype, by the loader's own mapping: TensorFromView of an empty
// view allocates an empty tensor of that dtype.
absl::StatusOr<at::ScalarType> TorchTypeOf(pipeline::DType dtype) {
  pipeline::TensorView none;
  none.dtype = dtype;
  none.shape = {0};
  auto t = pipeline::TensorFromView(none);
  if (!t.ok()) return t.status();
  return t->scalar_type();
}

absl::StatusOr<std::vector<Entry>> ParseManifest(const std::string& text) {
  std::vector<Entry> entries;
  try {
    const nlohmann::json manifest = nlohmann::json::parse(text);
    for (const auto& t : manifest.at("tensors")) {
      Entry e;
      e.name = t.at("name").get<std::string>();
      const std::string dtype_name = t.at("dtype").get<std::string>();
      auto dtype = pipeline::ParseDType(dtype_name);
      if (!dtype)
        return absl::DataLossError(
            absl::StrCat("manifest: tensor ", e.name, ": unknown dtype ", dtype_name));
      // Checked here, before any tensor moves: a dtype LibTorch cannot hold fails every rank now
      // rather than one rank in the middle of the broadcasts.
      auto type = TorchTypeOf(*dtype);
      if (!type.ok())
        return absl::Status(type.status().code(),
                            absl::StrCat("tensor ", e.name, ": ", type.status().message()));
      e.type = *type;
      e.shape = t.at("shape").get<std::vector<int64_t>>();
      e.nbytes = t.at("nbytes").get<uint64_t>();
      entries.push_back(std::move(e));
    }
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat("manifest does not parse: ", e.what()));
  }
  return entries;
}

// A flat byte view of a contiguous tensor (what is broadcast, whatever the dtype).
at::Tensor ByteView(const at::Tensor& t) { return t.reshape({-1}).view(at::kByte); }

absl::StatusOr<at::Tensor> Attempt(const char* what, const std::function<at::Tensor()>& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, ": ", ExceptionMessage(e)));
  }
}

// Broadcasts `text` from rank 0 (others pass the length they were told; `text` is filled in).
absl::Status BroadcastText(ProcessGroup& group, std::string* text, int64_t length) {
  auto buffer = Attempt("manifest buffer", [&] {
    if (group.rank() == 0) {
      return torch::from_blob(text->data(), {length}, at::kByte)
          .to(group.device(), at::kByte, false, true);
    }
    return torch::empty({length}, torch::TensorOptions().dtype(at::kByte).device(group.device()));
  });
  if (!buffer.ok()) return buffer.status();
  if (absl::Status s = group.Broadcast(*buffer); !s.ok()) return s;
  if (group.rank() != 0) {
    at::Tensor host = buffer->to(at::kCPU).contiguous();
    text->assign(static_cast<const char*>(host.data_ptr()), static_cast<size_t>(length));
  }
  return absl::OkStatus();
}

}  // namespace

std::string ManifestJson(const pipeline::WeightSet& set) { return CanonicalJson(ManifestOf(set)); }

std::string ManifestDigest(const pipeline::WeightSet& set) { return Sha256Hex(ManifestJson(set)); }

absl::StatusOr<BroadcastResult> BroadcastWeights(ProcessGroup& group,
                                                 const BroadcastOptions& options) {
  const SteadyTime start = SteadyNow();
  const bool root = group.rank() == 0;
  const auto on_device = torch::TensorOptions().device(group.device());
  // 1. Rank 0 opens the checkpoint; the header says whether it could.
  std::unique_ptr<pipeline::WeightSet> set;
  std::string payload;  // digest + manifest, or rank 0's error
  int64_t ok = 1;
  if (root) {
    pipeline::SafetensorsOptions read;
    read.prefetch = true;  // every tensor is read right away, front to back
    auto opened = pipeline::WeightSet::OpenDir(options.dir, options.stem, read);
    if (opened.ok()) {
      set = std::move(*opened);
      std::string manifest = ManifestJson(*set);
      payload = Sha256Hex(manifest) + manifest;
    } else {
      ok = 0;
      payload = std::string(opened.status().message());
    }
  }
  auto header = Attempt("header", [&] {
    return torch::tensor({ok, static_cast<int64_t>(payload.size())}, at::kLong).to(group.device());
  });
  if (!header.ok()) return header.status();
  if (absl::Status s = group.Broadcast(*header); !s.ok()) return s;
  at::Tensor header_host = header->to(at::kCPU);
  ok = header_host[0].item<int64_t>();
  const int64_t length = header_host[1].item<int64_t>();
  if (absl::Status s = BroadcastText(group, &payload, length); !s.ok()) return s;
  if (ok == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("rank 0 could not read the checkpoint: ", payload));
  }
  // 2. The manifest, checked on every rank, and every rank's verdict.
  BroadcastResult result;
  absl::Status mine = absl::OkStatus();
  std::vector<Entry> entries;
  if (payload.size() < kDigestChars) {
    mine =
        absl::DataLossError(absl::StrCat("manifest of ", payload.size(), " bytes has no digest"));
  } else {
    result.digest = payload.substr(0, kDigestChars);
    std::string manifest = payload.substr(kDigestChars);
    if (Sha256Hex(manifest) != result.digest) {
      mine = absl::DataLossError(absl::StrCat("rank ", group.rank(),
                                              ": the manifest received does not match its digest ",
                                              result.digest));
    } else if (!options.expected_digest.empty() && options.expected_digest != result.digest) {
      mine = absl::FailedPreconditionError(
          absl::StrCat("rank ", group.rank(), " expects checkpoint manifest ",
                       options.expected_digest, ", rank 0 read ", result.digest));
    } else {
      auto parsed = ParseManifest(manifest);
      if (parsed.ok())
        entries = std::move(*parsed);
      else
        mine = parsed.status();
    }
  }
  auto verdicts = group.AllGather(
      torch::tensor({static_cast<int64_t>(mine.ok())}, at::kLong).to(group.device()));
  if (!verdicts.ok()) return verdicts.status();
  if (!mine.ok()) return mine;
  std::vector<std::string> refused;
  for (size_t r = 0; r < verdicts->size(); ++r) {
    if ((*verdicts)[r].item<int64_t>() == 0) refused.push_back(absl::StrCat(r));
  }
  if (!refused.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("rank(s) ", absl::StrJoin(refused, ", "),
                                                      " refused rank 0's checkpoint (manifest ",
                                                      result.digest, ")"));
  }
  // 3. The tensors, one broadcast in flight while the next is read or allocated.
  c10::intrusive_ptr<c10d::Work> in_flight;
  for (const Entry& e : entries) {
    absl::StatusOr<at::Tensor> tensor;
    if (root) {
      auto host = pipeline::TensorFromView(*set->Find(e.name));
      if (!host.ok()) return host.status();
      tensor = Attempt(e.name.c_str(), [&] {
        return host->to(group.device(), e.type, /*non_blocking=*/false, /*copy=*/true);
      });
    } else {
      tensor =
          Attempt(e.name.c_str(), [&] { return torch::empty(e.shape, on_device.dtype(e.type)); });
    }
    if (!tensor.ok()) return tensor.status();
    if (e.nbytes > 0) {
      at::Tensor bytes = ByteView(*tensor);
      auto work = group.BroadcastAsync(bytes);
      if (!work.ok()) return work.status();
      if (in_flight) {
        if (absl::Status s = group.Wait(in_flight); !s.ok()) return s;
      }
      in_flight = *work;
    }
    result.bytes += e.nbytes;
    result.tensors.emplace_back(e.name, *tensor);
  }
  if (in_flight) {
    if (absl::Status s = group.Wait(in_flight); !s.ok()) return s;
  }
  if (group.device().is_cuda()) {
    // NCCL's Wait orders the caller's stream after the collective without blocking the host:
    // the time is taken once the tensors are on every GPU.
    try {
      torch::cuda::synchronize(group.device().index());
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("rank ", group.rank(), ": ", ExceptionMessage(e)));
    }
  }
  result.seconds = SecondsSince(start);
  return result;
}

}  // namespace kiln::parallel
