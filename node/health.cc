#include "node/health.h"

namespace kiln::node {

absl::Status NodeReadiness(bool registered, bool draining, bool done) {
  if (done) return absl::UnavailableError("node stopped");
  if (draining) return absl::UnavailableError("draining: finishing its job, taking no new one");
  if (!registered) return absl::UnavailableError("not registered with a coordinator yet");
  return absl::OkStatus();
}

}  // namespace kiln::node
