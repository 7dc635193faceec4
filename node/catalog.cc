#include "node/catalog.h"

#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/job_spec.h"
#include "common/status.h"

namespace kiln::node {
namespace {

constexpr double kDefaultGuidance = 3.5;  // JobSpec.guidance 0 = model default

template <typename Map>
std::string Keys(const Map& m) {
  std::vector<std::string> keys;
  for (const auto& [k, v] : m) keys.push_back(k);
  return absl::StrJoin(keys, ", ");
}

}  // namespace

void ModelCatalog::Add(const std::string& model, const std::string& precision,
                       std::unique_ptr<Generator> generator) {
  generators_[model][precision] = std::move(generator);
}

absl::StatusOr<JobPlan> ModelCatalog::Plan(const kiln::v1::JobSpec& spec) const {
  // The spec's own rules, as the coordinator checks them (common/job_spec.h); then only what
  // this node knows: whether it serves the model, the precision and the size.
  if (auto s = kiln::ValidateJobSpec(spec); !s.ok()) return s;
  auto model = generators_.find(spec.model());
  if (model == generators_.end()) {
    return kiln::InvalidField("spec.model",
                              absl::StrCat("'", spec.model(), "' is not served by this node",
                                           " (serves: ", Keys(generators_), ")"));
  }
  const std::string precision = spec.precision().empty() ? default_precision_ : spec.precision();
  auto gen = model->second.find(precision);
  if (gen == model->second.end()) {
    return kiln::InvalidField(
        "spec.precision", absl::StrCat("'", precision, "' is not served by this node for model ",
                                       spec.model(), " (serves: ", Keys(model->second), ")"));
  }
  bool width_known = false, size_known = false;
  for (const auto& r : resolutions_) {
    width_known |= static_cast<uint32_t>(r.width) == spec.width();
    size_known |= static_cast<uint32_t>(r.width) == spec.width() &&
                  static_cast<uint32_t>(r.height) == spec.height();
  }
  if (!size_known) {
    const std::string why =
        absl::StrCat(spec.width(), "x", spec.height(), " is not one of this node's resolutions: ",
                     pipeline::FormatResolutions(resolutions_));
    return kiln::InvalidField(width_known ? "spec.height" : "spec.width", why);
  }
  JobPlan plan;
  plan.generator = gen->second.get();
  plan.model = spec.model();
  plan.precision = precision;
  plan.request.prompt = spec.prompt();
  plan.request.width = static_cast<int>(spec.width());
  plan.request.height = static_cast<int>(spec.height());
  plan.request.steps = static_cast<int>(spec.steps());
  plan.request.seed = spec.seed();
  plan.request.guidance = spec.guidance() == 0 ? kDefaultGuidance : spec.guidance();
  plan.request.loras = kiln::LorasOf(spec);
  return plan;
}

std::map<std::string, Generator*> ModelCatalog::GeneratorsByKey() const {
  std::map<std::string, Generator*> out;
  for (const auto& [model, by_precision] : generators_) {
    for (const auto& [precision, gen] : by_precision) out[model + "/" + precision] = gen.get();
  }
  return out;
}

std::vector<ModelCatalog::Unhealthy> ModelCatalog::UnhealthyGenerators() const {
  std::vector<Unhealthy> out;
  for (const auto& [model, by_precision] : generators_) {
    for (const auto& [precision, gen] : by_precision) {
      if (absl::Status h = gen->Health(); !h.ok()) out.push_back({model, precision, h});
    }
  }
  return out;
}

std::vector<std::string> ModelCatalog::AvailableLoras() const {
  std::set<std::string> names;
  for (const auto& [model, by_precision] : generators_) {
    for (const auto& [precision, gen] : by_precision) {
      for (auto& n : gen->AvailableLoras()) names.insert(std::move(n));
    }
  }
  return {names.begin(), names.end()};
}

std::map<std::string, std::vector<std::string>> ModelCatalog::PackageSets() const {
  std::map<std::string, std::vector<std::string>> out;
  for (const auto& [model, by_precision] : generators_) {
    for (const auto& [precision, gen] : by_precision) {
      for (const auto& r : resolutions_) {
        out[absl::StrCat(model, "/", precision, "/", r.width, "x", r.height)] =
            gen->DigestsFor(r.width, r.height);
      }
    }
  }
  return out;
}

std::vector<std::string> ModelCatalog::models() const {
  std::vector<std::string> out;
  for (const auto& [model, unused] : generators_) out.push_back(model);
  return out;
}

std::vector<Generator*> ModelCatalog::generators() const {
  std::vector<Generator*> out;
  for (const auto& [model, by_precision] : generators_) {
    for (const auto& [precision, gen] : by_precision) out.push_back(gen.get());
  }
  return out;
}

}  // namespace kiln::node
