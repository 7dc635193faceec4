#include "coordinator/placement.h"

#include <algorithm>
#include <tuple>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/job_spec.h"

namespace kiln::coordinator {
namespace {

bool Contains(const google::protobuf::RepeatedPtrField<std::string>& list, const std::string& s) {
  return std::find(list.begin(), list.end(), s) != list.end();
}

// The device as the shared precision rules see it (common/job_spec.h).
kiln::DeviceCaps CapsOf(const kiln::v1::DeviceInfo& device) {
  kiln::DeviceCaps caps;
  caps.cuda = device.kind() == "cuda";
  caps.compute_capability = kiln::ParseComputeCapability(device.compute_capability());
  return caps;
}

}  // namespace

const char* WarmthName(Warmth w) {
  switch (w) {
    case Warmth::kLoaded:
      return "loaded";
    case Warmth::kLocalDisk:
      return "local";
    case Warmth::kCold:
      break;
  }
  return "cold";
}

std::string PackageSetKey(absl::string_view model, absl::string_view precision, uint32_t width,
                          uint32_t height) {
  return absl::StrCat(model, "/", precision, "/", width, "x", height);
}

std::string DefaultPrecision(const kiln::v1::DeviceInfo& device) {
  // Only a cpu device runs fp32 by default; any other kind counts as an accelerator.
  kiln::DeviceCaps caps;
  caps.cuda = device.kind() != "cpu";
  return kiln::DefaultPrecisionFor(caps);
}

bool ParsePackageSetKey(absl::string_view key, std::string* model, std::string* precision,
                        std::string* size) {
  const size_t last = key.rfind('/');
  if (last == absl::string_view::npos || last == 0) return false;
  const size_t middle = key.rfind('/', last - 1);
  if (middle == absl::string_view::npos || middle == 0) return false;
  *model = std::string(key.substr(0, middle));
  *precision = std::string(key.substr(middle + 1, last - middle - 1));
  *size = std::string(key.substr(last + 1));
  return true;
}

namespace {

// What a node declares in package_sets about one job's model.
struct Declared {
  bool model = false;                // any set for the job's model
  std::vector<std::string> at_size;  // precisions declared at the job's size
  std::vector<std::string> all;      // "<precision> <W>x<H>", for messages
};

Declared DeclaredFor(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec) {
  Declared d;
  const std::string size = absl::StrCat(spec.width(), "x", spec.height());
  std::string model, precision, key_size;
  for (const auto& [key, set] : node.package_sets()) {
    if (!ParsePackageSetKey(key, &model, &precision, &key_size) || model != spec.model()) continue;
    d.model = true;
    if (key_size == size) d.at_size.push_back(precision);
    d.all.push_back(absl::StrCat(precision.empty() ? "default" : precision, " ", key_size));
  }
  std::sort(d.all.begin(), d.all.end());
  return d;
}

}  // namespace

const kiln::v1::PackageSet* FindPackageSet(const kiln::v1::NodeInfo& node,
                                           const kiln::v1::JobSpec& spec) {
  std::vector<std::string> precisions = {spec.precision()};
  if (spec.precision().empty()) {
    precisions.push_back(DefaultPrecision(node.device()));
    const Declared d = DeclaredFor(node, spec);
    if (d.at_size.size() == 1) precisions.push_back(d.at_size.front());
  }
  for (const auto& precision : precisions) {
    auto it = node.package_sets().find(
        PackageSetKey(spec.model(), precision, spec.width(), spec.height()));
    if (it != node.package_sets().end() && it->second.digests_size() > 0) return &it->second;
  }
  return nullptr;
}

Warmth WarmthFor(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec) {
  const kiln::v1::PackageSet* set = FindPackageSet(node, spec);
  if (set == nullptr) return Warmth::kCold;
  bool all_loaded = true;
  for (const auto& digest : set->digests()) {
    if (Contains(node.loaded_packages(), digest)) continue;
    all_loaded = false;
    if (!Contains(node.packages(), digest)) return Warmth::kCold;
  }
  return all_loaded ? Warmth::kLoaded : Warmth::kLocalDisk;
}

absl::Status CheckCapable(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec) {
  const std::string& id = node.node_id();
  if (!Contains(node.models(), spec.model())) {
    return absl::FailedPreconditionError(absl::StrCat(id, " does not serve model ", spec.model()));
  }
  if (const Declared d = DeclaredFor(node, spec); d.model) {
    const bool served =
        spec.precision().empty()
            ? !d.at_size.empty()
            : std::find(d.at_size.begin(), d.at_size.end(), spec.precision()) != d.at_size.end();
    if (!served) {
      const size_t n = std::min<size_t>(4, d.all.size());
      const std::vector<std::string> shown(d.all.begin(), d.all.begin() + n);
      return absl::FailedPreconditionError(absl::StrCat(
          id, " does not serve ", spec.model(), " ",
          spec.precision().empty() ? "" : absl::StrCat(spec.precision(), " "), "at ",
          spec.width(), "x", spec.height(), " (it serves ", absl::StrJoin(shown, ", "),
          d.all.size() > shown.size() ? ", ..." : "", ")"));
    }
  }
  if (const kiln::DeviceCaps caps = CapsOf(node.device());
      !kiln::CheckDeviceRuns(spec.precision(), caps).ok()) {
    const auto& device = node.device();
    if (!caps.cuda) {
      return absl::FailedPreconditionError(
          absl::StrCat(id, " has a ", device.kind().empty() ? "cpu" : device.kind(),
                       " device, which cannot run ", spec.precision()));
    }
    return absl::FailedPreconditionError(
        absl::StrCat(id, " has compute capability ", device.compute_capability(), "; ",
                     kiln::CheckDeviceRuns(spec.precision(), caps).message()));
  }
  if (!node.can_compile() && WarmthFor(node, spec) == Warmth::kCold) {
    return absl::FailedPreconditionError(absl::StrCat(
        id, " does not hold the packages for ",
        PackageSetKey(spec.model(), spec.precision(), spec.width(), spec.height()),
        " and cannot compile"));
  }
  return absl::OkStatus();
}

int ChooseNode(const std::vector<Candidate>& candidates, const kiln::v1::JobSpec& spec) {
  int best = -1;
  // Smaller is better: (-warmth, active jobs, last assignment, node id).
  std::tuple<int, int, int64_t, absl::string_view> best_key;
  for (int i = 0; i < static_cast<int>(candidates.size()); ++i) {
    const Candidate& c = candidates[i];
    if (!CheckCapable(*c.info, spec).ok()) continue;
    auto key = std::make_tuple(-static_cast<int>(WarmthFor(*c.info, spec)), c.active_jobs,
                               c.last_assigned_ms, absl::string_view(c.info->node_id()));
    if (best < 0 || key < best_key) {
      best = i;
      best_key = key;
    }
  }
  return best;
}

}  // namespace kiln::coordinator
