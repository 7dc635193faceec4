// The node's readiness as its /readyz reports it (metrics::MetricsServer::SetReadiness): ready
// to be sent jobs once registered with a coordinator, until it drains or stops. A node loads
// weights and packages per job (a cold start is part of the job's latency), so registration is
// the point from which it can take one. Pure function; main wires it to the NodeAgent's flags.
#pragma once

#include "absl/status/status.h"

namespace kiln::node {

// OK when registered and neither draining nor done; else Unavailable saying which.
absl::Status NodeReadiness(bool registered, bool draining, bool done);
// The same, and not ready while the package directory cannot be written (`disk` not OK).
absl::Status NodeReadiness(bool registered, bool draining, bool done, const absl::Status& disk);

}  // namespace kiln::node
