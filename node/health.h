// The node's readiness as its /readyz reports it (metrics::MetricsServer::SetReadiness): ready
// to be sent jobs once registered with a coordinator, until it drains or stops. A node loads
// weights and packages per job (a cold start is part of the job's latency), so registration is
// the point from which it can take one. Pure function; main wires it to the NodeAgent's flags.
//
// And what a node whose generators cannot run jobs any more (a multi-GPU node's rank group
// whose collective failed: Generator::Health) says: its heartbeats' `unhealthy` reason
// (GeneratorsReason) and a failed job's error (GeneratorFailure), so that the coordinator
// places nothing more here and requeues the job elsewhere. Pure functions.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "node/catalog.h"

namespace kiln::node {

// OK when registered and neither draining nor done; else Unavailable saying which.
absl::Status NodeReadiness(bool registered, bool draining, bool done);
// The same, and not ready while `health` is not OK (NodeAgent::health_status: the package
// directory cannot be written, or a rank group failed).
absl::Status NodeReadiness(bool registered, bool draining, bool done, const absl::Status& health);

// Heartbeat.unhealthy for `unhealthy` (ModelCatalog::UnhealthyGenerators): "" when empty; else
// "model M (P): <its health's message>" per generator, joined with "; ", then "; restart the
// node".
std::string GeneratorsReason(const std::vector<ModelCatalog::Unhealthy>& unhealthy);

// What a job that failed with `error` on `generator` reports: `error` itself while the generator
// is healthy; else Unavailable (the coordinator requeues the job) "node N: model M (P): <its
// health's message>; the job moves to another node". The node's log keeps `error`.
absl::Status GeneratorFailure(const absl::Status& error, const Generator& generator,
                              const std::string& model, const std::string& precision,
                              const std::string& node_id);

}  // namespace kiln::node
