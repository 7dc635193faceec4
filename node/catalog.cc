#include "node/catalog.h"

#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kiln::node {
namespace {

constexpr double kDefaultGuidance = 3.5;  // JobSpec.guidance 0 = model default
constexpr size_t kMaxPromptBytes = 10000;
constexpr size_t kMaxJobIdChars = 128;
constexpr uint32_t kMaxSteps = 1000;

absl::Status FieldError(const std::string& field, const std::string& message) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", message));
}

bool ValidJobId(const std::string& id) {
  if (id.empty() || id.size() > kMaxJobIdChars) return false;
  for (char c : id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != ':' &&
        c != '-') {
      return false;
    }
  }
  return true;
}

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
  if (!ValidJobId(spec.job_id())) {
    return FieldError("spec.job_id", "want 1..128 characters of [A-Za-z0-9._:-]");
  }
  auto model = generators_.find(spec.model());
  if (model == generators_.end()) {
    return FieldError("spec.model", absl::StrCat("'", spec.model(), "' is not served by this node",
                                                 " (serves: ", Keys(generators_), ")"));
  }
  const std::string precision = spec.precision().empty() ? default_precision_ : spec.precision();
  auto gen = model->second.find(precision);
  if (gen == model->second.end()) {
    return FieldError("spec.precision",
                      absl::StrCat("'", precision, "' is not served by this node for model ",
                                   spec.model(), " (serves: ", Keys(model->second), ")"));
  }
  if (spec.prompt().empty()) return FieldError("spec.prompt", "empty");
  if (spec.prompt().size() > kMaxPromptBytes) {
    return FieldError("spec.prompt", absl::StrCat(spec.prompt().size(), " bytes; at most ",
                                                  kMaxPromptBytes));
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
    return FieldError(width_known ? "spec.height" : "spec.width", why);
  }
  if (spec.steps() < 1 || spec.steps() > kMaxSteps) {
    return FieldError("spec.steps", absl::StrCat(spec.steps(), "; want 1..", kMaxSteps));
  }
  if (!std::isfinite(spec.guidance()) || spec.guidance() < 0 || spec.guidance() > 100) {
    return FieldError("spec.guidance",
                      absl::StrCat(spec.guidance(), "; want 0..100 (0 = default)"));
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
  return plan;
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

std::string ErrorField(const absl::Status& status) {
  if (!absl::IsInvalidArgument(status)) return "";
  const absl::string_view m = status.message();
  if (m.substr(0, 5) != "spec.") return "";
  const auto colon = m.find(':');
  return colon == absl::string_view::npos ? "" : std::string(m.substr(0, colon));
}

}  // namespace kiln::node
