#include "coordinator/coordinator_metrics.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/match.h"
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
      submissions_unservable(
          Counters(r, "kiln_jobs_unservable_total",
                   "Jobs no registered node could run: refused at submit, or failed from the "
                   "queue after a node deregistered or was removed")
              .Add({})),
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
      run_timeouts(Counters(r, "kiln_job_run_timeouts_total",
                            "Running jobs requeued after their run timeout (node marked suspect)")
                       .Add({})),
      waits_pending(Gauges(r, "kiln_coordinator_waits_pending",
                           "Wait requests held for an answer (the job's end or the timeout)")
                        .Add({})),
      waits_dropped_client_gone(
          Counters(r, "kiln_coordinator_waits_dropped_total",
                   "Pending waits removed early: the client's connection closed (client_gone), "
                   "or its oldest made room past its per-client cap (client_cap)")
              .Add({{"reason", "client_gone"}})),
      waits_dropped_client_cap(
          Counters(r, "kiln_coordinator_waits_dropped_total", "").Add({{"reason", "client_cap"}})),
      protocol_errors(Counters(r, "kiln_protocol_errors_total",
                               "Frames answered with an ErrorReply, by socket and reason")),
      queue_wait_(prometheus::BuildHistogram()
                      .Name("kiln_job_queue_wait_seconds")
                      .Help("Seconds a job waited in the queue (enqueue to assignment), by "
                            "priority class (high > 0, normal 0, low < 0)")
                      .Register(r)),
      latency_(prometheus::BuildHistogram()
                   .Name("kiln_job_latency_seconds")
                   .Help("Seconds from submit to result of succeeded jobs, by model, precision "
                         "and resolution bucket (longest side rounded up)")
                   .Register(r)),
      run_(prometheus::BuildHistogram()
               .Name("kiln_job_run_seconds")
               .Help("Seconds from assignment to result of succeeded jobs (device time per "
                     "image, cold start included), by model, precision and resolution bucket")
               .Register(r)),
      cold_start_(prometheus::BuildHistogram()
                      .Name("kiln_job_cold_start_seconds")
                      .Help("Seconds succeeded jobs' nodes spent getting ready, by phase (jobs "
                            "that found everything warm are not observed)")
                      .Register(r)),
      packages_(Counters(r, "kiln_job_packages_total",
                         "Packages succeeded jobs used, by where each came from (resident in "
                         "memory, local disk, shared cache, compiled)")),
      failures_(Counters(r, "kiln_job_failures_total",
                         "Jobs that failed, by the status code of the failure")),
      node_busy_(Gauges(r, "kiln_node_busy",
                        "1 while a live node runs a job, 0 while it is idle, by node")),
      scaling_queued_(Gauges(r, "kiln_scaling_queued_jobs",
                             "jobs queued at the coordinator, by model and precision")),
      scaling_wait_(Gauges(r, "kiln_scaling_wait_seconds",
                           "estimated wait of the next job, by model and precision")),
      scaling_nodes_(Gauges(r, "kiln_scaling_nodes",
                            "ready nodes that serve a model and precision, and the busy ones "
                            "among them (state=ready|busy)")) {
  for (const char* priority : {"high", "normal", "low"}) {
    queue_wait_.Add({{"priority", priority}}, metrics::DurationBuckets());
  }
  for (const char* source : {"resident", "local", "shared", "compiled"}) {
    packages_.Add({{"source", source}});
  }
  for (const char* socket : {"client", "node"}) {
    for (const char* reason :
         {"malformed", "version", "no_body", "empty", "frames", "unexpected"}) {
      protocol_errors.Add({{"socket", socket}, {"reason", reason}});
    }
  }
}

std::string CoordinatorMetrics::ResolutionBucket(uint32_t width, uint32_t height) {
  const uint32_t side = std::max(width, height);
  for (uint32_t bucket : {256u, 512u, 768u, 1024u, 1536u, 2048u}) {
    if (side <= bucket) return std::to_string(bucket);
  }
  return "4096";
}

std::string CoordinatorMetrics::PrecisionLabel(const std::string& precision) {
  if (precision == "fp32" || precision == "bf16" || precision == "fp8") return precision;
  return "default";
}

std::string CoordinatorMetrics::PriorityLabel(int32_t priority) {
  return priority > 0 ? "high" : priority < 0 ? "low" : "normal";
}

std::string CoordinatorMetrics::FailureReason(const std::string& error) {
  // JobInfo.error is "<CODE>: why"; the code is one of absl's status code names.
  const std::string code = error.substr(0, error.find(':'));
  for (int c = 1; c <= 16; ++c) {
    if (code == absl::StatusCodeToString(static_cast<absl::StatusCode>(c))) return code;
  }
  return "OTHER";
}

std::string CoordinatorMetrics::ModelLabel(const std::string& model) {
  absl::MutexLock lock(&mu_);
  return ModelLabelLocked(model);
}

std::string CoordinatorMetrics::ModelLabelLocked(const std::string& model) {
  if (models_.contains(model)) return model;
  if (models_.size() >= kMaxModelLabels) return "other";
  models_[model] = true;
  return model;
}

void CoordinatorMetrics::ObserveQueueWait(const kiln::v1::JobSpec& spec, double seconds) {
  queue_wait_.Add({{"priority", PriorityLabel(spec.priority())}}, metrics::DurationBuckets())
      .Observe(seconds);
}

void CoordinatorMetrics::SetFinishedListener(
    std::function<void(const kiln::v1::JobInfo&)> listener) {
  absl::MutexLock lock(&mu_);
  finished_listener_ = std::move(listener);
}

void CoordinatorMetrics::ObserveFinished(const kiln::v1::JobInfo& job) {
  {
    absl::MutexLock lock(&mu_);
    if (finished_listener_) finished_listener_(job);
  }
  if (job.state() == kiln::v1::JOB_STATE_FAILED) {
    failures_.Add({{"reason", FailureReason(job.error())}}).Increment();
    return;
  }
  if (job.state() != kiln::v1::JOB_STATE_SUCCEEDED) return;
  const kiln::v1::JobSpec& spec = job.spec();
  const prometheus::Labels labels = {{"model", ModelLabel(spec.model())},
                                     {"precision", PrecisionLabel(spec.precision())},
                                     {"resolution", ResolutionBucket(spec.width(), spec.height())}};
  double latency = job.queue_seconds() + job.run_seconds();
  if (job.submitted_unix_ms() > 0 && job.finished_unix_ms() >= job.submitted_unix_ms()) {
    latency = (job.finished_unix_ms() - job.submitted_unix_ms()) / 1000.0;
  }
  latency_.Add(labels, metrics::DurationBuckets()).Observe(latency);
  run_.Add(labels, metrics::DurationBuckets()).Observe(job.run_seconds());
  const kiln::v1::ColdStart& cold = job.cold_start();
  if (cold.total_seconds() > 0) {
    const std::pair<const char*, double> phases[] = {
        {"weights", cold.weights_seconds()}, {"package_load", cold.package_load_seconds()},
        {"compile", cold.compile_seconds()}, {"fetch", cold.fetch_seconds()},
        {"total", cold.total_seconds()}};
    for (const auto& [phase, seconds] : phases) {
      cold_start_.Add({{"phase", phase}}, metrics::DurationBuckets()).Observe(seconds);
    }
  }
  for (const auto& [component, source] : job.packages()) {
    const bool known = source == "resident" || source == "local" || source == "shared" ||
                       source == "compiled";
    packages_.Add({{"source", known ? source : "other"}}).Increment();
  }
}

void CoordinatorMetrics::SetNodeBusy(const std::map<std::string, bool>& busy) {
  absl::MutexLock lock(&mu_);
  for (auto it = busy_gauges_.begin(); it != busy_gauges_.end();) {
    if (busy.count(it->first) == 0) {
      node_busy_.Remove(it->second);
      it = busy_gauges_.erase(it);
    } else {
      ++it;
    }
  }
  for (const auto& [node, is_busy] : busy) {
    prometheus::Gauge*& g = busy_gauges_[node];
    if (g == nullptr) g = &node_busy_.Add({{"node", node}});
    g->Set(is_busy ? 1 : 0);
  }
}

void CoordinatorMetrics::SetScalingSignal(const std::vector<ScalingRow>& rows) {
  absl::MutexLock lock(&mu_);
  std::map<std::pair<std::string, std::string>, ScalingRow> merged;  // "other" models merge
  for (const ScalingRow& row : rows) {
    ScalingRow& m = merged[{ModelLabelLocked(row.model), row.precision}];
    m.queued += row.queued;
    m.wait_seconds = std::max(m.wait_seconds, row.wait_seconds);
    m.nodes_ready += row.nodes_ready;
    m.nodes_busy += row.nodes_busy;
  }
  // Series of a (model, precision) that has no row any more are removed, not left at their last
  // value.
  for (auto it = scaling_gauges_.begin(); it != scaling_gauges_.end();) {
    if (merged.count(it->first) > 0) {
      ++it;
      continue;
    }
    scaling_queued_.Remove(it->second[0]);
    scaling_wait_.Remove(it->second[1]);
    scaling_nodes_.Remove(it->second[2]);
    scaling_nodes_.Remove(it->second[3]);
    it = scaling_gauges_.erase(it);
  }
  for (const auto& [key, row] : merged) {
    std::array<prometheus::Gauge*, 4>& g = scaling_gauges_[key];
    if (g[0] == nullptr) {
      const prometheus::Labels labels = {{"model", key.first}, {"precision", key.second}};
      prometheus::Labels ready = labels, busy = labels;
      ready["state"] = "ready";
      busy["state"] = "busy";
      g = {&scaling_queued_.Add(labels), &scaling_wait_.Add(labels), &scaling_nodes_.Add(ready),
           &scaling_nodes_.Add(busy)};
    }
    g[0]->Set(row.queued);
    g[1]->Set(row.wait_seconds);
    g[2]->Set(row.nodes_ready);
    g[3]->Set(row.nodes_busy);
  }
}

void CoordinatorMetrics::CountProtocolError(const std::string& socket, const std::string& reason) {
  protocol_errors.Add({{"socket", socket}, {"reason", reason}}).Increment();
}

}  // namespace kiln::coordinator
