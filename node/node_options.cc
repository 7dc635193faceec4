#include "node/node_options.h"

#include <algorithm>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cache/artifact_key.h"
#include "node/device_probe.h"

namespace kiln::node {
namespace {

bool ValidNodeId(const std::string& id) {
  if (id.empty() || id.size() > 128) return false;
  for (char c : id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != ':' &&
        c != '-') {
      return false;
    }
  }
  return true;
}

}  // namespace

absl::Status NodeOptions::Validate() const {
  if (curve.enabled() && (!IsCurveKey(curve.server_public_key) ||
                          !IsCurveKey(curve.own.public_key) || !IsCurveKey(curve.own.secret_key))) {
    return absl::InvalidArgumentError("curve: not Z85 CURVE keys");
  }
  if (!ValidNodeId(node_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("node_id '", node_id, "': want 1..128 characters of [A-Za-z0-9._:-]"));
  }
  if (coordinator.rfind("tcp://", 0) != 0 && coordinator.rfind("ipc://", 0) != 0 &&
      coordinator.rfind("inproc://", 0) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("coordinator '", coordinator, "': want tcp://HOST:PORT"));
  }
  for (const auto& [name, dir] : models) {
    if (name.empty() || name.find('/') != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("models: bad model name '", name, "'"));
    }
    if (dir.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("models: ", name, " has no directory"));
    }
  }
  if (device != "cpu" && !CudaOrdinal(device).ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("device '", device, "': want cpu, cuda or cuda:N"));
  }
  if (!gpus.empty()) {
    if (gpus.size() < 2 || gpus.size() > static_cast<size_t>(kMaxGpus)) {
      return absl::InvalidArgumentError(
          absl::StrCat("gpus: ", gpus.size(), " device(s); a multi-GPU node has 2..", kMaxGpus,
                       " (one device: --device cuda:N without --gpus)"));
    }
    std::set<int> seen;
    for (int g : gpus) {
      if (g < 0) return absl::InvalidArgumentError(absl::StrCat("gpus: ", g, " is negative"));
      if (!seen.insert(g).second) {
        return absl::InvalidArgumentError(absl::StrCat("gpus: ", g, " is listed twice"));
      }
    }
    if (device != "cpu" && device != "cuda") {
      return absl::InvalidArgumentError(absl::StrCat(
          "gpus: needs --device cpu or cuda (the list names the GPUs), not '", device, "'"));
    }
    if (batching.max_batch > 1) {
      return absl::InvalidArgumentError(
          "gpus: a multi-GPU node runs one job at a time over its GPUs; --max_batch must be 1");
    }
    if (!(group_timeout_seconds > 0)) {
      return absl::InvalidArgumentError("group_timeout_seconds: must be > 0");
    }
  }
  auto check_precision = [&](const std::string& p, const char* field) -> absl::Status {
    if (std::find(cache::kPrecisions.begin(), cache::kPrecisions.end(), p) ==
        cache::kPrecisions.end()) {
      return absl::InvalidArgumentError(absl::StrCat(field, " '", p, "': want ",
                                                     absl::StrJoin(cache::kPrecisions, ", ")));
    }
    if (p == "fp8" && device == "cpu") {
      return absl::InvalidArgumentError(absl::StrCat(field, " fp8: needs a cuda device"));
    }
    return absl::OkStatus();
  };
  if (auto s = check_precision(precision, "precision"); !s.ok()) return s;
  for (const auto& p : precisions) {
    if (auto s = check_precision(p, "precisions"); !s.ok()) return s;
  }
  if (!precisions.empty() &&
      std::find(precisions.begin(), precisions.end(), precision) == precisions.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("precision '", precision, "': must be one of the served precisions"));
  }
  if (resolutions.empty()) return absl::InvalidArgumentError("resolutions: empty");
  if (package_dir.empty()) return absl::InvalidArgumentError("package_dir: required");
  if (!compile_options.is_object()) {
    return absl::InvalidArgumentError("compile_options: not a JSON object");
  }
  if (auto s = link.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("link.", s.message()));
  }
  if (package_dir_max_bytes < 0) {
    return absl::InvalidArgumentError("package_dir_max_bytes: must be >= 0");
  }
  if (drain_timeout_ms < 0) return absl::InvalidArgumentError("drain_timeout_ms: must be >= 0");
  if (job_slots < 1 || job_slots > kMaxJobSlots) {
    return absl::InvalidArgumentError(
        absl::StrCat("job_slots: ", job_slots, " is not in 1..", kMaxJobSlots));
  }
  if (auto s = batching.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("batching.", s.message()));
  }
  if (disk_check_interval_ms <= 0) {
    return absl::InvalidArgumentError("disk_check_interval_ms: must be > 0");
  }
  return absl::OkStatus();
}

std::vector<std::string> NodeOptions::RankDevices() const {
  std::vector<std::string> out;
  for (int g : gpus) out.push_back(device == "cpu" ? "cpu" : absl::StrCat("cuda:", g));
  return out;
}

absl::StatusOr<std::vector<int>> ParseGpus(const std::string& text) {
  std::vector<int> out;
  if (text.empty()) return out;
  int n = 0;
  for (absl::string_view entry : absl::StrSplit(text, ',')) {
    ++n;
    int g = -1;
    if (entry.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--gpus '", text, "': entry ", n, " is empty"));
    }
    if (!absl::SimpleAtoi(entry, &g) || g < 0 || entry[0] == '+' || entry[0] == ' ') {
      return absl::InvalidArgumentError(absl::StrCat("--gpus '", text, "': entry ", n, " '",
                                                     entry, "' is not a device index (0, 1, ...)"));
    }
    if (std::find(out.begin(), out.end(), g) != out.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--gpus '", text, "': device ", g, " is listed twice"));
    }
    out.push_back(g);
  }
  return out;
}

int NodeOptions::AdvertisedJobSlots() const {
  return batching.max_batch > 1 ? std::max(job_slots, batching.max_batch + 1) : job_slots;
}

}  // namespace kiln::node
