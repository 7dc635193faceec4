#include "coordinator/coordinator_metrics.h"

#include "metrics/metrics_server.h"

namespace kiln::coordinator {
namespace {

prometheus::Family<prometheus::Counter>& Counters(prometheus::Registry& r, const char* name,
                                                  const char* help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r);
}
prometheus::Family<prometheus::Gauge>& Gauges(prometheus::Registry& r, const char* name,
                                              const char* help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r);
}

}  // namespace

CoordinatorMetrics::CoordinatorMetrics(prometheus::Registry& r)
    : jobs_succeeded(Counters(r, "kiln_jobs_total", "Jobs that reached a final state, by outcome")
                         .Add({{"outcome", "succeeded"}})),
      jobs_failed(Counters(r, "kiln_jobs_total", "").Add({{"outcome", "failed"}})),
      jobs_cancelled(Counters(r, "kiln_jobs_total", "").Add({{"outcome", "cancelled"}})),
      queue_seconds(prometheus::BuildHistogram()
                        .Name("kiln_job_duration_seconds")
                        .Help("Seconds a job spent queued (enqueue to assignment) and running "
                              "(assignment to result)")
                        .Register(r)
                        .Add({{"phase", "queue"}}, metrics::DurationBuckets())),
      run_seconds(prometheus::BuildHistogram()
                      .Name("kiln_job_duration_seconds")
                      .Register(r)
                      .Add({{"phase", "run"}}, metrics::DurationBuckets())),
      queue_depth(
          Gauges(r, "kiln_queue_depth", "Jobs queued at the coordinator, waiting for a node")
              .Add({})),
      nodes_ready(Gauges(r, "kiln_nodes", "Nodes known to the coordinator, by state")
                      .Add({{"state", "ready"}})),
      nodes_draining(Gauges(r, "kiln_nodes", "").Add({{"state", "draining"}})),
      nodes_dead(Gauges(r, "kiln_nodes", "").Add({{"state", "dead"}})),
      nodes_left(Gauges(r, "kiln_nodes", "").Add({{"state", "left"}})),
      jobs_requeued(Counters(r, "kiln_jobs_requeued_total",
                             "Jobs requeued after their node died, left, lost them or failed them "
                             "with a retryable error")
                        .Add({})),
      submissions_created(
          Counters(r, "kiln_job_submissions_total",
                   "Submit requests by result (created, duplicate job_id, rejected)")
              .Add({{"result", "created"}})),
      submissions_duplicate(
          Counters(r, "kiln_job_submissions_total", "").Add({{"result", "duplicate"}})),
      submissions_rejected(
          Counters(r, "kiln_job_submissions_total", "").Add({{"result", "rejected"}})),
      stale_results(Counters(r, "kiln_node_stale_messages_total",
                             "Node messages about a job the node no longer holds (ignored)")
                        .Add({{"type", "result"}})),
      stale_progress(
          Counters(r, "kiln_node_stale_messages_total", "").Add({{"type", "progress"}})),
      store_errors(Counters(r, "kiln_coordinator_errors_total",
                            "Failures handled without a reply: job store writes, sends, "
                            "exceptions while handling a message")
                       .Add({{"kind", "store"}})),
      send_errors(Counters(r, "kiln_coordinator_errors_total", "").Add({{"kind", "send"}})),
      internal_errors(
          Counters(r, "kiln_coordinator_errors_total", "").Add({{"kind", "internal"}})),
      protocol_errors(Counters(r, "kiln_protocol_errors_total",
                               "Frames answered with an ErrorReply, by socket and reason")) {
  for (const char* socket : {"client", "node"}) {
    for (const char* reason :
         {"malformed", "version", "no_body", "empty", "frames", "unexpected"}) {
      protocol_errors.Add({{"socket", socket}, {"reason", reason}});
    }
  }
}

void CoordinatorMetrics::CountProtocolError(const std::string& socket, const std::string& reason) {
  protocol_errors.Add({{"socket", socket}, {"reason", reason}}).Increment();
}

}  // namespace kiln::coordinator
