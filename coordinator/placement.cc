#include "coordinator/placement.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <tuple>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/job_spec.h"
#include "common/status.h"

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

LoraWarmth LoraWarmthFor(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec) {
  const std::vector<kiln::LoraChoice> loras = kiln::LorasOf(spec);
  const std::string precision =
      spec.precision().empty()
          ? kiln::DefaultPrecisionFor(kiln::DeviceCaps{node.device().kind() == "cuda", -1})
          : spec.precision();
  auto it = node.applied_loras().find(absl::StrCat(spec.model(), "/", precision));
  const std::string applied = it == node.applied_loras().end() ? "" : it->second;
  if (applied == kiln::LoraSetKey(loras)) return LoraWarmth::kApplied;
  for (const auto& l : loras) {
    if (std::find(node.loras().begin(), node.loras().end(), l.name) == node.loras().end()) {
      return LoraWarmth::kAbsent;
    }
  }
  return LoraWarmth::kOnDisk;
}

std::string BatchKey(const kiln::v1::JobSpec& spec) {
  return absl::StrCat(PackageSetKey(spec.model(), spec.precision(), spec.width(), spec.height()),
                      "|", spec.steps(), "|", kiln::LoraSetKey(kiln::LorasOf(spec)));
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

namespace {

// Whether `node` declares that it serves spec's model, precision and size (device and packages
// aside): it lists the model and either declares no set for it or one at the job's precision
// (any, for precision "") and size.
bool DeclaresServed(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec) {
  if (!Contains(node.models(), spec.model())) return false;
  const Declared d = DeclaredFor(node, spec);
  if (!d.model) return true;
  return spec.precision().empty()
             ? !d.at_size.empty()
             : std::find(d.at_size.begin(), d.at_size.end(), spec.precision()) != d.at_size.end();
}

// "320x320" parsed into (pixels, width) for ordering sizes; (0, 0) if it does not parse.
std::pair<uint64_t, uint32_t> SizeOrder(absl::string_view size) {
  std::pair<absl::string_view, absl::string_view> wh = absl::StrSplit(size, 'x');
  uint32_t w = 0, h = 0;
  if (!absl::SimpleAtoi(wh.first, &w) || !absl::SimpleAtoi(wh.second, &h)) return {0, 0};
  return {static_cast<uint64_t>(w) * h, w};
}

}  // namespace

std::string DescribeServed(const std::vector<const kiln::v1::NodeInfo*>& nodes) {
  // model → precision → sizes; precision "*" for a node that declares no set for the model.
  std::map<std::string, std::map<std::string, std::set<std::string>>> served;
  std::string model, precision, size;
  for (const kiln::v1::NodeInfo* node : nodes) {
    std::set<std::string> declared;
    for (const auto& [key, set] : node->package_sets()) {
      if (!ParsePackageSetKey(key, &model, &precision, &size)) continue;
      if (!Contains(node->models(), model)) continue;
      declared.insert(model);
      served[model][precision.empty() ? "default" : precision].insert(size);
    }
    for (const auto& m : node->models()) {
      if (!declared.count(m)) served[m]["*"];
    }
  }
  std::vector<std::string> entries;
  for (const auto& [m, precisions] : served) {
    for (const auto& [p, sizes] : precisions) {
      if (p == "*") {
        entries.push_back(absl::StrCat(m, " at any precision and size"));
        continue;
      }
      std::vector<std::string> ordered(sizes.begin(), sizes.end());
      std::sort(ordered.begin(), ordered.end(), [](const std::string& a, const std::string& b) {
        return SizeOrder(a) < SizeOrder(b);
      });
      entries.push_back(absl::StrCat(m, " ", p, " at ", absl::StrJoin(ordered, ", ")));
    }
  }
  constexpr size_t kShown = 8;
  if (entries.size() > kShown) {
    entries.resize(kShown);
    entries.push_back("...");
  }
  return entries.empty() ? "nothing" : absl::StrJoin(entries, "; ");
}

absl::Status CheckAnyServes(const std::vector<const kiln::v1::NodeInfo*>& nodes,
                             const kiln::v1::JobSpec& spec) {
  std::vector<std::string> why;  // CheckServes of the nodes that declare the job's kind
  bool model = false, declared = false;
  for (const kiln::v1::NodeInfo* node : nodes) {
    absl::Status s = CheckServes(*node, spec);
    if (s.ok()) return s;
    model = model || Contains(node->models(), spec.model());
    if (!DeclaresServed(*node, spec)) continue;
    declared = true;
    if (why.size() < 3) why.emplace_back(s.message());
  }
  const std::string what =
      !model ? absl::StrCat("model ", spec.model())
             : absl::StrCat(spec.precision().empty() ? "" : "precision ", spec.precision(),
                            spec.precision().empty() ? "" : " at ", spec.width(), "x",
                            spec.height(), " for model ", spec.model());
  std::string headline =
      declared ? absl::StrCat("no registered node can run ", what, " (", absl::StrJoin(why, "; "),
                              ")")
               : absl::StrCat("no registered node serves ", what);
  return absl::FailedPreconditionError(
      absl::StrCat(headline, "; the cluster serves: ", DescribeServed(nodes)));
}

absl::Status CheckCapable(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec) {
  if (absl::Status s = CheckServes(node, spec); !s.ok()) return s;
  if (!node.can_compile() && !node.can_fetch() && WarmthFor(node, spec) == Warmth::kCold) {
    return absl::FailedPreconditionError(
        absl::StrCat(node.node_id(), " does not hold the packages for ", NeededSetKey(node, spec),
                     " and cannot compile or fetch them (no shared cache)"));
  }
  return absl::OkStatus();
}

std::string NeededSetKey(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec) {
  std::string precision = spec.precision();
  if (precision.empty()) {
    // The set FindPackageSet settles on, else the node's default precision.
    precision = DefaultPrecision(node.device());
    if (const kiln::v1::PackageSet* set = FindPackageSet(node, spec); set != nullptr) {
      std::string model, found, size;
      for (const auto& [key, declared] : node.package_sets()) {
        if (&declared == set && ParsePackageSetKey(key, &model, &found, &size) &&
            !found.empty()) {
          precision = found;
        }
      }
    }
  }
  return PackageSetKey(spec.model(), precision, spec.width(), spec.height());
}

absl::Status CheckServes(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec) {
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
  return absl::OkStatus();
}

int ChooseNode(const std::vector<Candidate>& candidates, const kiln::v1::JobSpec& spec) {
  int best = -1;
  // Smaller is better: (-warmth, active jobs, last assignment, node id).
  std::tuple<int, int, int, int64_t, absl::string_view> best_key;
  for (int i = 0; i < static_cast<int>(candidates.size()); ++i) {
    const Candidate& c = candidates[i];
    if (!CheckCapable(*c.info, spec).ok()) continue;
    auto key = std::make_tuple(-static_cast<int>(WarmthFor(*c.info, spec)),
                               static_cast<int>(LoraWarmthFor(*c.info, spec)), c.active_jobs,
                               c.last_assigned_ms, absl::string_view(c.info->node_id()));
    if (best < 0 || key < best_key) {
      best = i;
      best_key = key;
    }
  }
  return best;
}

}  // namespace kiln::coordinator

namespace kiln::coordinator {

// ---------------------------------------------------------------------------------------------
// Expected finish time

const char* ColdTierName(ColdTier t) {
  switch (t) {
    case ColdTier::kResident:
      return "resident";
    case ColdTier::kLocalDisk:
      return "local";
    case ColdTier::kSharedStore:
      return "shared";
    case ColdTier::kCompile:
      break;
  }
  return "compiled";
}

ColdTier ColdTierOfResult(const kiln::v1::JobResult& result) {
  ColdTier tier = ColdTier::kResident;
  for (const auto& [component, where] : result.packages()) {
    ColdTier t = ColdTier::kResident;
    if (where == "compiled") {
      t = ColdTier::kCompile;
    } else if (where == "shared") {
      t = ColdTier::kSharedStore;
    } else if (where == "local") {
      t = ColdTier::kLocalDisk;
    }
    tier = std::max(tier, t);
  }
  return tier;
}

std::string DeviceClass(const kiln::v1::DeviceInfo& device) {
  std::string name = device.name().empty() ? device.kind() : device.name();
  if (name.empty()) name = "cpu";
  if (!device.mig_profile().empty()) absl::StrAppend(&name, " MIG ", device.mig_profile());
  if (GpuCount(device) > 1) absl::StrAppend(&name, " x", GpuCount(device));
  return name;
}

uint32_t GpuCount(const kiln::v1::DeviceInfo& device) {
  return std::max<uint32_t>(1, device.gpu_count());
}

absl::Status CostModelOptions::Validate() const {
  auto positive = [](double v) { return v > 0 && v < 1e9; };
  auto non_negative = [](double v) { return v >= 0 && v < 1e9; };
  if (!positive(prior_step_seconds)) {
    return kiln::InvalidField("prior_step_seconds", "must be positive");
  }
  if (!non_negative(prior_job_seconds)) {
    return kiln::InvalidField("prior_job_seconds", "must not be negative");
  }
  if (!positive(cpu_factor)) return kiln::InvalidField("cpu_factor", "must be positive");
  if (!(prior_parallel_efficiency > 0 && prior_parallel_efficiency <= 1)) {
    return kiln::InvalidField("prior_parallel_efficiency", "must be in (0, 1]");
  }
  if (!non_negative(prior_local_seconds)) {
    return kiln::InvalidField("prior_local_seconds", "must not be negative");
  }
  if (!non_negative(prior_shared_seconds)) {
    return kiln::InvalidField("prior_shared_seconds", "must not be negative");
  }
  if (!non_negative(prior_compile_seconds)) {
    return kiln::InvalidField("prior_compile_seconds", "must not be negative");
  }
  if (!(learning_rate > 0 && learning_rate <= 1)) {
    return kiln::InvalidField("learning_rate", "must be in (0, 1]");
  }
  if (!non_negative(overrun_floor_seconds)) {
    return kiln::InvalidField("overrun_floor_seconds", "must not be negative");
  }
  return absl::OkStatus();
}

namespace {

double Megapixels(uint32_t width, uint32_t height) {
  return static_cast<double>(width) * height / 1e6;
}

// The prior seconds per step on `device`, before any correction learned for its class.
double PriorStepSeconds(const CostModelOptions& o, const kiln::v1::DeviceInfo& device,
                        uint32_t width, uint32_t height) {
  double factor = 1;
  if (device.kind() == "cpu" || device.kind().empty()) {
    factor = o.cpu_factor;
  } else if (device.sm_count() > 0 && o.reference_sm_count > 0) {
    factor = static_cast<double>(o.reference_sm_count) / device.sm_count();
  }
  if (const uint32_t gpus = GpuCount(device); gpus > 1) {
    factor /= gpus * o.prior_parallel_efficiency;
  }
  return o.prior_step_seconds * Megapixels(width, height) * factor;
}


}  // namespace

void CostModel::Add(Average& a, double x) const {
  a.value = a.count == 0 ? x : a.value + options_.learning_rate * (x - a.value);
  ++a.count;
}

void CostModel::Observe(const std::string& node_id, const kiln::v1::DeviceInfo& device,
                        const kiln::v1::JobSpec& spec, const kiln::v1::JobResult& result,
                        double measured_run_seconds) {
  if (!result.ok()) return;
  const std::string key =
      PackageSetKey(spec.model(), spec.precision(), spec.width(), spec.height());
  shared_[key] = true;
  const std::string cls = DeviceClass(device);
  const double total = result.run_seconds() > 0 ? result.run_seconds() : measured_run_seconds;
  const double cold = std::max(0.0, result.cold_start().total_seconds());
  const double warm = std::max(0.0, total - cold);
  if (spec.steps() > 0 && std::isfinite(warm)) {
    const double per_step = warm / spec.steps();
    Add(step_seconds_[absl::StrCat(cls, "|", key)], per_step);
    const double prior = PriorStepSeconds(options_, device, spec.width(), spec.height()) +
                         options_.prior_job_seconds / spec.steps();
    if (prior > 0) Add(class_factor_[cls], per_step / prior);
  }
  const ColdTier tier = ColdTierOfResult(result);
  if (tier != ColdTier::kResident && std::isfinite(cold)) {
    Add(node_cold_[node_id][static_cast<int>(tier)], cold);
    Add(class_cold_[cls][static_cast<int>(tier)], cold);
  }
}

CostModel::RunEstimate CostModel::Run(const std::string& device_class,
                                      const kiln::v1::DeviceInfo& device, const std::string& key,
                                      uint32_t width, uint32_t height) const {
  RunEstimate r;
  if (auto it = step_seconds_.find(absl::StrCat(device_class, "|", key));
      it != step_seconds_.end()) {
    r.step_seconds = it->second.value;
    return r;
  }
  double factor = 1;
  if (auto it = class_factor_.find(device_class); it != class_factor_.end()) {
    factor = it->second.value;
  }
  r.step_seconds = PriorStepSeconds(options_, device, width, height) * factor;
  r.fixed_seconds = options_.prior_job_seconds * factor;
  return r;
}

double CostModel::RunSeconds(const kiln::v1::DeviceInfo& device,
                             const kiln::v1::JobSpec& spec) const {
  return Run(DeviceClass(device), device,
             PackageSetKey(spec.model(), spec.precision(), spec.width(), spec.height()),
             spec.width(), spec.height())
      .For(spec.steps());
}

double CostModel::ColdStartSeconds(const std::string& node_id, const std::string& device_class,
                                   ColdTier tier) const {
  return ColdStarts(node_id, device_class)[static_cast<int>(tier)];
}

double CostModel::LoraSeconds(LoraWarmth warmth) const {
  switch (warmth) {
    case LoraWarmth::kApplied:
      return 0;
    case LoraWarmth::kOnDisk:
      return options_.prior_lora_switch_seconds;
    case LoraWarmth::kAbsent:
      break;
  }
  return options_.prior_lora_absent_seconds;
}

std::array<double, 4> CostModel::ColdStarts(const std::string& node_id,
                                            const std::string& device_class) const {
  std::array<double, 4> out = {0, options_.prior_local_seconds, options_.prior_shared_seconds,
                               options_.prior_compile_seconds};
  const TierAverages* by_node = nullptr;
  const TierAverages* by_class = nullptr;
  if (auto it = node_cold_.find(node_id); it != node_cold_.end()) by_node = &it->second;
  if (auto it = class_cold_.find(device_class); it != class_cold_.end()) by_class = &it->second;
  for (int t = 1; t < 4; ++t) {
    if (by_node != nullptr && (*by_node)[t].count > 0) {
      out[t] = (*by_node)[t].value;
    } else if (by_class != nullptr && (*by_class)[t].count > 0) {
      out[t] = (*by_class)[t].value;
    }
  }
  return out;
}

std::array<double, 4> CostModel::MinColdStarts() const {
  std::array<double, 4> out = {0, options_.prior_local_seconds, options_.prior_shared_seconds,
                               options_.prior_compile_seconds};
  for (const auto* map : {&node_cold_, &class_cold_}) {
    for (const auto& [id, tiers] : *map) {
      for (int t = 1; t < 4; ++t) {
        if (tiers[t].count > 0) out[t] = std::min(out[t], tiers[t].value);
      }
    }
  }
  return out;
}

void CostModel::ForgetNode(const std::string& node_id) { node_cold_.erase(node_id); }

// ---------------------------------------------------------------------------------------------
// NodeIndex

void NodeIndex::Drop(KindNodes& kind, const std::string& node_id) {
  auto it = std::lower_bound(kind.nodes.begin(), kind.nodes.end(), node_id,
                             [](const Entry& e, const std::string& id) { return e.node_id < id; });
  if (it == kind.nodes.end() || it->node_id != node_id) return;
  if (it->warmth != Warmth::kCold) --kind.warm;
  if (it->slot < kind.warmth_by_slot.size()) kind.warmth_by_slot[it->slot] = -1;
  kind.nodes.erase(it);
}

void NodeIndex::Refresh(Kind& kind_in, const kiln::v1::NodeInfo& info, uint32_t slot) {
  KindNodes& kind = kind_in.nodes;
  if (!CheckCapable(info, kind_in.spec).ok()) {
    Drop(kind, info.node_id());
    return;
  }
  auto it = std::lower_bound(kind.nodes.begin(), kind.nodes.end(), info.node_id(),
                             [](const Entry& e, const std::string& id) { return e.node_id < id; });
  const bool present = it != kind.nodes.end() && it->node_id == info.node_id();
  const Warmth warmth = WarmthFor(info, kind_in.spec);
  if (present) {
    if (it->warmth != Warmth::kCold) --kind.warm;
    if (it->slot < kind.warmth_by_slot.size()) kind.warmth_by_slot[it->slot] = -1;
    it->warmth = warmth;
    it->slot = slot;
  } else {
    kind.nodes.insert(it, Entry{info.node_id(), slot, warmth});
  }
  if (warmth != Warmth::kCold) ++kind.warm;
  if (slot >= kind.warmth_by_slot.size()) kind.warmth_by_slot.resize(slot + 1, -1);
  kind.warmth_by_slot[slot] = static_cast<int8_t>(warmth);
}

void NodeIndex::Update(const kiln::v1::NodeInfo& info) {
  auto [it, inserted] = nodes_.try_emplace(info.node_id());
  Node& node = it->second;
  if (inserted) {
    if (free_slots_.empty()) {
      node.slot = slot_count_++;
    } else {
      node.slot = free_slots_.back();
      free_slots_.pop_back();
    }
  }
  node.info = info;
  for (auto& [key, kind] : kinds_) Refresh(kind, node.info, node.slot);
}

void NodeIndex::Remove(const std::string& node_id) {
  auto node = nodes_.find(node_id);
  if (node == nodes_.end()) return;
  free_slots_.push_back(node->second.slot);
  nodes_.erase(node);
  for (auto& [key, kind] : kinds_) Drop(kind.nodes, node_id);
}

int NodeIndex::Slot(const std::string& node_id) const {
  auto it = nodes_.find(node_id);
  return it == nodes_.end() ? -1 : static_cast<int>(it->second.slot);
}

const NodeIndex::KindNodes& NodeIndex::ForKind(const std::string& key,
                                               const kiln::v1::JobSpec& spec) {
  auto [it, inserted] = kinds_.try_emplace(key);
  Kind& kind = it->second;
  if (inserted) {
    kind.spec.set_model(spec.model());
    kind.spec.set_precision(spec.precision());
    kind.spec.set_width(spec.width());
    kind.spec.set_height(spec.height());
    for (const auto& [id, node] : nodes_) Refresh(kind, node.info, node.slot);
  }
  return kind.nodes;
}

}  // namespace kiln::coordinator
