// StatusBoard: what the coordinator serves on its metrics port besides /metrics, for people and
// for Prometheus:
//   /sd                     Prometheus HTTP service discovery: one target group per live node
//                           (its metrics host:port; labels node, device, device_kind,
//                           mig_profile, gpu_uuid)
//   /status/                the status page (one static HTML page, no framework; it refreshes
//                           itself from /status/api every 2 s)
//   /status/api             JSON: nodes with state and device, the queue, recent jobs with their
//                           state, progress, timings and a thumbnail URL
//   /status/jobs/<id>.png   the image of a recent succeeded job
// and the coordinator's /readyz: ready while the poll loop is turning (a snapshot no older than
// stale_after_ms) and the job store answered its last read.
//
// The Coordinator may only be touched by the server's poll thread, so that thread calls
// MaybeRefresh() after each tick (CoordinatorServerOptions::after_tick); every refresh_ms it
// copies what the pages show into an immutable snapshot that the HTTP threads read under mu_.
// It also sets the fleet gauges kiln_node_busy{node} (CoordinatorMetrics::SetNodeBusy) and the
// autoscaling signal kiln_scaling_* (ScalingSignal, CoordinatorMetrics::SetScalingSignal).
// Recent finished jobs are the ones the coordinator finished since this board was created (it
// listens through CoordinatorMetrics::SetFinishedListener and reads them back from the store),
// so listing the store's finished jobs, PNGs and all, is never needed.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "common/clock.h"
#include "coordinator/coordinator.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/job_store.h"
#include "coordinator/scaling_signal.h"
#include "metrics/metrics_server.h"

namespace kiln::coordinator {

struct StatusBoardOptions {
  int64_t refresh_ms = 1000;      // ms between snapshots
  int64_t stale_after_ms = 5000;  // ms without a snapshot after which /readyz says not ready
  size_t recent_jobs = 24;        // finished jobs shown (newest first), with their images
  size_t queued_jobs = 50;        // queued jobs listed (in queue order)

  absl::Status Validate() const;  // InvalidArgument naming the field
};

class StatusBoard {
 public:
  // `clock` and `metrics` must outlive the board.
  StatusBoard(const StatusBoardOptions& options, const Clock& clock, CoordinatorMetrics& metrics);
  ~StatusBoard();  // removes its finished-job listener

  // Poll thread: takes a snapshot when refresh_ms have passed since the last one.
  void MaybeRefresh(const Coordinator& coordinator, const JobStore& store);
  // Poll thread (or a test): takes a snapshot now.
  void Refresh(const Coordinator& coordinator, const JobStore& store);

  // Registers /sd, /status/ and the readiness check on `server`, which must not outlive the
  // board.
  void Install(metrics::MetricsServer& server);

  // What the routes answer (thread-safe).
  metrics::HttpResponse ServiceDiscovery() const;
  metrics::HttpResponse Status(const std::string& path) const;
  absl::Status Ready() const;

 private:
  struct Snapshot {
    int64_t taken_ms = 0;  // monotonic
    absl::Status store;    // the store's answer to the snapshot's reads
    std::string sd_json;
    std::string status_json;
    std::map<std::string, std::string> pngs;  // job id → PNG, recent succeeded jobs
  };

  const StatusBoardOptions options_;
  const Clock& clock_;
  CoordinatorMetrics& metrics_;
  int64_t last_refresh_ms_ = -1;  // poll thread only
  ScalingSignal scaling_;         // fed by the finished-job listener, read by Refresh

  absl::Mutex recent_mu_;
  std::deque<std::string> recent_ids_ ABSL_GUARDED_BY(recent_mu_);  // newest first

  mutable absl::Mutex mu_;
  std::shared_ptr<const Snapshot> snapshot_ ABSL_GUARDED_BY(mu_);
};

// The status page's HTML (coordinator/status_page.cc).
const std::string& StatusPageHtml();

}  // namespace kiln::coordinator
