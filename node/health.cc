#include "node/health.h"

namespace kiln::node {

absl::Status NodeReadiness(bool registered, bool draining, bool done) {
  if (done) return absl::UnavailableError("node stopped");
  if (draining) return absl::UnavailableError("draining: finishing its job, taking no new one");
  if (!registered) return absl::UnavailableError("not registered with a coordinator yet");
  return absl::OkStatus();
}

absl::Status NodeReadiness(bool registered, bool draining, bool done, const absl::Status& disk) {
  absl::Status s = NodeReadiness(registered, draining, done);
  if (!s.ok() || disk.ok()) return s;
  return absl::UnavailableError(disk.message());
}

}  // namespace kiln::node
