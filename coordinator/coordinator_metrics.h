// The coordinator's Prometheus metrics, created from a registry passed in (the process's
// metrics::MetricsServer registry in kiln-coordinator, a private prometheus::Registry in tests).
// Every metric is thread-safe (prometheus-cpp); Coordinator and CoordinatorServer update them
// from the server's poll thread, the metrics server's HTTP threads read them.
#pragma once

#include <array>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "common/proto/kiln.pb.h"
#include "coordinator/scaling_signal.h"
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
  // kiln_jobs_unservable_total: jobs no registered node could run, refused by Submit with
  // FAILED_PRECONDITION or failed from the queue after a node deregistered or was removed.
  prometheus::Counter& submissions_unservable;
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
  // kiln_job_run_timeouts_total: running jobs requeued because no result came within their run
  // timeout (CoordinatorOptions.run_timeout_*); their nodes were marked suspect (drained).
  prometheus::Counter& run_timeouts;
  // kiln_coordinator_waits_pending: Wait requests held for an answer (job end, timeout).
  prometheus::Gauge& waits_pending;
  // kiln_coordinator_waits_dropped_total{reason}: pending waits removed before their job ended or
  // their timeout passed: "client_gone" (the client's connection closed; not answered),
  // "client_cap" (the client's oldest, answered with the job's current state to make room for
  // its next wait past max_waits_per_client).
  prometheus::Counter& waits_dropped_client_gone;
  prometheus::Counter& waits_dropped_client_cap;

  // kiln_protocol_errors_total{socket="client|node", reason}: frames answered with an
  // ErrorReply because they were not a valid message for that socket. Reasons: "malformed",
  // "version", "no_body", "empty", "frames", "unexpected" (a body not accepted on that socket),
  // "unregistered" (a node message from a peer that has not registered), "rejected" (a node
  // message the coordinator refused, e.g. a bad RegisterNode), "forbidden" (the sender's key may
  // not make that request: role table, another key's node id; docs/security.md).
  void CountProtocolError(const std::string& socket, const std::string& reason);
  prometheus::Family<prometheus::Counter>& protocol_errors;

  // ---- Per-job figures, labelled by what the job asked for. Every label set is bounded:
  //   model       the first kMaxModelLabels model names seen, then "other"
  //   precision   fp32 | bf16 | fp8 | default (the node's)
  //   resolution  the job's longest side rounded up to 256 | 512 | 768 | 1024 | 1536 | 2048 |
  //               4096 (the bucket, not the exact size)
  //   priority    high (> 0) | normal (0) | low (< 0)
  //   reason      the failure's status code name (UNAVAILABLE, DEADLINE_EXCEEDED, ...)
  //   source      resident | local | shared | compiled | other (where a component's package came
  //               from, JobResult.packages)
  // kiln_job_queue_wait_seconds{priority}: enqueue → assignment (histogram).
  void ObserveQueueWait(const kiln::v1::JobSpec& spec, double seconds);
  // A job reached a final state (the store's record of it). Succeeded jobs observe
  // kiln_job_latency_seconds{model,precision,resolution} (submit → result) and
  // kiln_job_run_seconds{model,precision,resolution} (assignment → result: the device-seconds an
  // image took), kiln_job_cold_start_seconds{phase} when the node had to get ready and
  // kiln_job_packages_total{source} per component; failed ones count
  // kiln_job_failures_total{reason}.
  // Also tells the finished-job listener, if one is set (the status board's list of recent jobs).
  void ObserveFinished(const kiln::v1::JobInfo& job);
  void SetFinishedListener(std::function<void(const kiln::v1::JobInfo&)> listener);

  // kiln_node_busy{node}: 1 while a live (ready or draining) node runs a job, 0 while it is idle;
  // nodes not in `busy` lose their series. Set by the status board's snapshot.
  void SetNodeBusy(const std::map<std::string, bool>& busy);

  // The autoscaling signal (coordinator/scaling_signal.h), one series per model and precision
  // (model bounded like the per-job figures): kiln_scaling_queued_jobs{model,precision},
  // kiln_scaling_wait_seconds{model,precision}, kiln_scaling_nodes{model,precision,state=
  // ready|busy}. Pairs without a row lose their series. Set by the status board's snapshot.
  void SetScalingSignal(const std::vector<ScalingRow>& rows);

  static constexpr size_t kMaxModelLabels = 32;
  static std::string ResolutionBucket(uint32_t width, uint32_t height);
  static std::string PrecisionLabel(const std::string& precision);
  static std::string PriorityLabel(int32_t priority);
  static std::string FailureReason(const std::string& error);

 private:
  std::string ModelLabel(const std::string& model);
  std::string ModelLabelLocked(const std::string& model) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  prometheus::Family<prometheus::Histogram>& queue_wait_;
  prometheus::Family<prometheus::Histogram>& latency_;
  prometheus::Family<prometheus::Histogram>& run_;
  prometheus::Family<prometheus::Histogram>& cold_start_;
  prometheus::Family<prometheus::Counter>& packages_;
  prometheus::Family<prometheus::Counter>& failures_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, bool> models_ ABSL_GUARDED_BY(mu_);
  prometheus::Family<prometheus::Gauge>& node_busy_;
  std::function<void(const kiln::v1::JobInfo&)> finished_listener_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, prometheus::Gauge*> busy_gauges_ ABSL_GUARDED_BY(mu_);
  prometheus::Family<prometheus::Gauge>& scaling_queued_;
  prometheus::Family<prometheus::Gauge>& scaling_wait_;
  prometheus::Family<prometheus::Gauge>& scaling_nodes_;
  // (model label, precision) → queued, wait, nodes ready, nodes busy.
  std::map<std::pair<std::string, std::string>, std::array<prometheus::Gauge*, 4>> scaling_gauges_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln::coordinator
