// The node's worker: one thread that runs assigned jobs one at a time, in arrival order.
//
// For each job it checks the deadline, calls Generator::Generate with a progress callback that
// queues a JobProgress per pipeline event and times each denoising step, encodes the PNG, and
// queues the JobResult (ok, or error_code + error) with run time, package provenance and cold
// start. Everything it produces goes to the Outbox; it never touches a socket.
//
// Cancelling the running job: the worker sets the pipeline::CancelToken it passes in the job's
// request; Generate() stops after the step that was running when the cancel arrived and returns
// CancelledError, reported as CANCELLED "cancelled by the coordinator after step K of N". A job
// cancelled while queued is dropped and reported CANCELLED at once.
//
// Threads: Start()/Shutdown() by the owner; Enqueue, Cancel, TakeQueued, ActiveJobIds,
// LoadedPackages and idle() from any thread (the node's I/O thread); the worker thread is owned
// and joined by this object.
#pragma once

#include <deque>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "common/clock.h"
#include "common/proto/kiln.pb.h"
#include "node/catalog.h"
#include "node/disk_health.h"
#include "node/job_runner.h"
#include "node/node_metrics.h"
#include "node/outbox.h"
#include "pipeline/cancel_token.h"

namespace kiln::node {

// An Envelope holding JobResult{job_id, ok=false, error_code=code name, error=message, attempt}.
kiln::v1::Envelope ErrorResult(const std::string& job_id, uint32_t attempt,
                               const absl::Status& status);

// ColdStart from the pipeline's phase seconds; total = weights + package_load + fetch + compile.
kiln::v1::ColdStart ColdStartOf(const pipeline::PhaseSeconds& s);

class Worker : public JobRunner {
 public:
  // All references must outlive the worker.
  Worker(const ModelCatalog& catalog, Outbox& outbox, NodeMetrics& metrics, const Clock& clock);
  ~Worker() override;  // Shutdown(/*cancel_running=*/true)
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  void Start();
  // Stops taking jobs and joins the thread once the running job (if any) is done; with
  // `cancel_running` that job is cancelled first. Jobs still queued are dropped without a
  // result (graceful stops take them with TakeQueued() first). Idempotent.
  void Shutdown(bool cancel_running);

  // JobRunner (node/job_runner.h states the contracts).
  bool Enqueue(Job job) override;
  CancelOutcome Cancel(const std::string& job_id) override;
  std::vector<Job> TakeQueued() override;
  std::vector<std::string> ActiveJobIds() const override;
  std::vector<std::string> LoadedPackages() const override;
  bool idle() const override;

  // The node's disk health (null: not checked): a job that fails while the package directory
  // cannot be written reports the disk's one-line error and code (node/disk_health.h) instead
  // of whatever the pipeline saw. Call before Start(); `disk` must outlive the worker.
  void set_disk_health(DiskHealth* disk, std::string node_id) {
    disk_ = disk;
    node_id_ = std::move(node_id);
  }

 private:
  void Loop();
  // Runs one job; returns its JobResult envelope (queued by Loop()).
  kiln::v1::Envelope Run(const Job& job);

  const ModelCatalog& catalog_;
  Outbox& outbox_;
  NodeMetrics& metrics_;
  const Clock& clock_;
  DiskHealth* disk_ = nullptr;
  std::string node_id_;
  pipeline::CancelToken cancel_;  // the running job's; reset when a job starts

  mutable absl::Mutex mu_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  std::string running_ ABSL_GUARDED_BY(mu_);  // id of the running job, "" when none
  std::vector<std::string> loaded_ ABSL_GUARDED_BY(mu_);
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;

  std::thread thread_;  // runs Loop(); joined by Shutdown()
};

}  // namespace kiln::node
