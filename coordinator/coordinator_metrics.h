// The coordinator's Prometheus metrics, created from a registry passed in (the process's
// metrics::MetricsServer registry in kiln-coordinator, a private prometheus::Registry in tests).
// Every metric is thread-safe (prometheus-cpp); Coordinator and CoordinatorServer update them
// from the server's poll thread, the exposer reads them from its own.
#pragma once

#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace kiln::coordinator {

struct CoordinatorMetrics {
  explicit CoordinatorMetrics(prometheus::Registry& registry);

  // kiln_jobs_total{outcome}: jobs that reached a final state.
  prometheus::Counter& jobs_succeeded;
  prometheus::Counter& jobs_failed;
  prometheus::Counter& jobs_cancelled;
  // kiln_job_duration_seconds{phase}: queue = enqueued (submit or requeue) → assignment,
  // run = assignment → result.
  prometheus::Histogram& queue_seconds;
  prometheus::Histogram& run_seconds;
  // kiln_queue_depth: jobs waiting at the coordinator for a node.
  prometheus::Gauge& queue_depth;
  // kiln_nodes{state}: nodes in the node table by state.
  prometheus::Gauge& nodes_ready;
  prometheus::Gauge& nodes_draining;
  prometheus::Gauge& nodes_dead;
  prometheus::Gauge& nodes_left;
  // kiln_jobs_requeued_total: jobs put back in the queue after their node died, left, lost them
  // or failed them with a retryable code.
  prometheus::Counter& jobs_requeued;
  // kiln_job_submissions_total{result}
  prometheus::Counter& submissions_created;
  prometheus::Counter& submissions_duplicate;
  prometheus::Counter& submissions_rejected;
  // kiln_node_stale_messages_total{type}: progress or results from a node that no longer holds
  // the job (late after a requeue, or for an unknown job); ignored.
  prometheus::Counter& stale_results;
  prometheus::Counter& stale_progress;
  // kiln_coordinator_errors_total{kind}: failures handled without a reply to anyone: the job
  // store refused a write ("store"), a send failed ("send"), or handling a message threw
  // ("internal"). Each is also logged.
  prometheus::Counter& store_errors;
  prometheus::Counter& send_errors;
  prometheus::Counter& internal_errors;

  // kiln_protocol_errors_total{socket="client|node", reason}: frames answered with an
  // ErrorReply because they were not a valid message for that socket. Reasons: "malformed",
  // "version", "no_body", "empty", "frames", "unexpected" (a body not accepted on that socket),
  // "unregistered" (a node message from a peer that has not registered), "rejected" (a node
  // message the coordinator refused, e.g. a bad RegisterNode).
  void CountProtocolError(const std::string& socket, const std::string& reason);
  prometheus::Family<prometheus::Counter>& protocol_errors;
};

}  // namespace kiln::coordinator
