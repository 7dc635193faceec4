// The node's worker: runs assigned jobs in arrival order, overlapping consecutive jobs in three
// stages, each on its own thread:
//   encode   — Generator::EncodePrompt (packages, tokenizers, text encoders; on CUDA the
//              pipeline's own stream) for the next job, while
//   denoise  — Generator::DenoiseDecode (the denoise loop and the VAE decode) runs the current
//              one, and
//   finish   — the PNG of the job before is encoded and its JobResult queued.
// The encode stage takes a job from the queue as soon as no other job waits encoded for the
// denoise stage (one prefetched job at most), so a node that holds two jobs (NodeOptions
// job_slots: the running one and one prefetched) keeps the denoise stage busy back to back.
// Batching (WorkerOptions::max_batch > 1): the encode stage keeps up to max_batch jobs encoded
// ahead, and the denoise stage runs the first encoded job together with the other encoded jobs
// of the same generator (model and precision) that are pipeline::BatchCompatible with it (same
// size, steps and LoRA set) as one batch (Generator::DenoiseDecodeBatch), the batch size the
// largest power of two that fits (1, 2, 4: few bucket batches to compile). With
// batch_wait_ms > 0 it first waits up to that long for a full batch (ending early when no other
// job can be encoded beside the ones waiting): the most a batch delays its first job. Each job of a batch keeps its own progress, result and PNG; kiln_node_batch_size
// counts the batches run.
// Per job: the deadline is checked when its encoding starts; progress is queued per pipeline
// event (each denoising step timed); the result is (ok, or error_code + error) with run time
// (from the start of its encoding to its result, less any wait encoded for the denoise stage),
// package provenance and cold start; kiln_node_images_total and
// kiln_node_device_seconds_total count images and device time per model (node/node_metrics.h). Everything it produces
// goes to the Outbox; it never touches a socket. Results may leave out of order (a job whose
// encoding failed does not wait for the one denoising).
//
// Cancelling: a queued job, or a prefetched one whose encoding is done, is dropped and reported
// CANCELLED "... before it started" at once; a job being encoded or denoised has its
// pipeline::CancelToken set and stops after the step that was running, reported as CANCELLED
// "cancelled by the coordinator after step K of N" (in a batch the other jobs run on); a cancel
// that arrives while its PNG is being made still wins. A batch that fails fails each of its
// jobs with the error.
//
// Handing back (a graceful stop): TakeQueued() returns every job not yet denoising — queued,
// prefetched (its encoding dropped) and the one being encoded (its encoding cancelled; the
// encode stage then drops it with no result and no more progress) — for the caller to answer.
// Jobs denoising or finishing run to their results.
//
// Threads: Start()/Shutdown() by the owner; Enqueue, Cancel, TakeQueued, ActiveJobIds,
// LoadedPackages and idle() from any thread (the node's I/O thread); the three stage threads
// are owned and joined by this object.
#pragma once

#include <deque>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "common/clock.h"
#include "common/stopwatch.h"
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

struct WorkerOptions {
  // The most jobs run as one batch, 1..kMaxBatch (1: one job at a time, as without batching).
  int max_batch = 1;
  static constexpr int kMaxBatch = 4;
  // How long (ms, 0..kMaxBatchWaitMs) the denoise stage waits for a full batch before it runs
  // what it has; 0: never waits. Only with max_batch > 1.
  int batch_wait_ms = 0;
  static constexpr int kMaxBatchWaitMs = 10000;

  absl::Status Validate() const;  // InvalidArgument naming the field
};

class Worker : public JobRunner {
 public:
  // All references must outlive the worker. `options` must be valid (Validate()).
  Worker(const ModelCatalog& catalog, Outbox& outbox, NodeMetrics& metrics, const Clock& clock,
         WorkerOptions options = {});
  ~Worker() override;  // Shutdown(/*cancel_running=*/true)
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  void Start();
  // Stops taking jobs and joins the threads once the jobs being encoded, denoised or finished
  // are done; with `cancel_running` those are cancelled first. Jobs still queued, and one
  // prefetched and waiting, are dropped without a result (graceful stops hand them back with
  // TakeQueued() first). Idempotent.
  void Shutdown(bool cancel_running);

  // JobRunner (node/job_runner.h states the contracts).
  bool Enqueue(Job job) override;
  CancelOutcome Cancel(const std::string& job_id) override;
  std::vector<Job> TakeQueued() override;
  std::vector<std::string> ActiveJobIds() const override;
  std::vector<std::string> LoadedPackages() const override;
  std::map<std::string, std::string> AppliedLoras() const override;
  bool idle() const override;
  // Jobs whose encoding is done, waiting for the denoise stage (at most max_batch).
  std::vector<std::string> PrefetchedJobIds() const;

  // The node's disk health (null: not checked): a job that fails while the package directory
  // cannot be written reports the disk's one-line error and code (node/disk_health.h) instead
  // of whatever the pipeline saw. Call before Start(); `disk` must outlive the worker.
  void set_disk_health(DiskHealth* disk, std::string node_id) {
    disk_ = disk;
    node_id_ = std::move(node_id);
  }

 private:
  // A job taken from the queue, from its encoding until its result is queued.
  struct Taken {
    enum class Stage { kEncoding, kEncoded, kDenoising, kFinishing };
    Job job;
    Stage stage = Stage::kEncoding;
    pipeline::CancelToken cancel;
    SteadyTime start;       // its encoding began
    SteadyTime encoded_at;  // its encoding ended (kEncoded)
    double waited = 0;      // seconds encoded, waiting for the denoise stage
    bool expired = false;   // its deadline had passed when its encoding was to start
    bool handed_back = false;  // TakeQueued() took it while it was being encoded (under mu_)
    int reported_step = 0;  // the step of the last progress event: where a cancel stopped it
    int last_step_index = -1;
    SteadyTime last_step;
    absl::StatusOr<pipeline::EncodedPrompt> encoded = absl::UnknownError("not encoded");
    absl::StatusOr<pipeline::GenerateResult> result = absl::UnknownError("not run");
  };
  using TakenPtr = std::shared_ptr<Taken>;

  void EncodeLoop();
  void DenoiseLoop();
  void FinishLoop();
  // Queues progress for `t` (the stage thread that runs it calls this).
  void Progress(Taken& t, const std::string& phase, int step, int total);
  // Hands `t` (its result set) to the finish stage.
  void ToFinish(const TakenPtr& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The first job taken that is in `stage`, or null.
  TakenPtr FirstIn(Taken::Stage stage) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Jobs in `stage`.
  int CountIn(Taken::Stage stage) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `head` (encoded) and the encoded jobs that can run in one batch with it, in the order
  // taken, at most max_batch (not yet cut to a power of two).
  std::vector<TakenPtr> BatchFor(const TakenPtr& head) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // True when the first encoded job's batch is full, no other job can be encoded beside it (the
  // encoded jobs fill max_batch), or the worker shuts down: the end of a batch wait.
  bool BatchReady() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A device stage (encoding, denoise) of a job of `model` begins or ends: the model's device
  // time (kiln_node_device_seconds_total) runs while one of its jobs is in such a stage.
  void DeviceStage(const std::string& model, bool begin) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Its JobResult envelope.
  kiln::v1::Envelope Finish(Taken& t);

  const ModelCatalog& catalog_;
  Outbox& outbox_;
  NodeMetrics& metrics_;
  const Clock& clock_;
  const WorkerOptions options_;
  DiskHealth* disk_ = nullptr;
  std::string node_id_;

  mutable absl::Mutex mu_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  std::list<TakenPtr> taken_ ABSL_GUARDED_BY(mu_);       // in the order taken
  std::deque<TakenPtr> to_finish_ ABSL_GUARDED_BY(mu_);  // the finish stage's queue
  std::vector<std::string> loaded_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> applied_loras_ ABSL_GUARDED_BY(mu_);
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  bool stages_stopped_ ABSL_GUARDED_BY(mu_) = false;  // encode and denoise joined
  struct DeviceBusy {
    int stages = 0;     // jobs of the model in a device stage now
    SteadyTime since;   // when `stages` last went from 0 to 1
  };
  std::map<std::string, DeviceBusy> device_busy_ ABSL_GUARDED_BY(mu_);  // by model

  // Owned and joined by Shutdown().
  std::thread encode_thread_;
  std::thread denoise_thread_;
  std::thread finish_thread_;
};

}  // namespace kiln::node
