#include "node/health.h"

#include "absl/strings/str_cat.h"

namespace kiln::node {

absl::Status NodeReadiness(bool registered, bool draining, bool done) {
  if (done) return absl::UnavailableError("node stopped");
  if (draining) return absl::UnavailableError("draining: finishing its job, taking no new one");
  if (!registered) return absl::UnavailableError("not registered with a coordinator yet");
  return absl::OkStatus();
}

absl::Status NodeReadiness(bool registered, bool draining, bool done,
                           const absl::Status& health) {
  absl::Status s = NodeReadiness(registered, draining, done);
  if (!s.ok() || health.ok()) return s;
  return absl::UnavailableError(health.message());
}

std::string GeneratorsReason(const std::vector<ModelCatalog::Unhealthy>& unhealthy) {
  if (unhealthy.empty()) return "";
  std::string reason;
  for (const auto& u : unhealthy) {
    absl::StrAppend(&reason, reason.empty() ? "" : "; ", "model ", u.model, " (", u.precision,
                    "): ", u.health.message());
  }
  return absl::StrCat(reason, "; restart the node");
}

absl::Status GeneratorFailure(const absl::Status& error, const Generator& generator,
                              const std::string& model, const std::string& precision,
                              const std::string& node_id) {
  const absl::Status health = generator.Health();
  if (health.ok()) return error;
  return absl::UnavailableError(absl::StrCat("node ", node_id, ": model ", model, " (",
                                             precision, "): ", health.message(),
                                             "; the job moves to another node"));
}

}  // namespace kiln::node
