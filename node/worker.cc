#include "node/worker.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/stopwatch.h"
#include "common/wire.h"
#include "pipeline/png.h"

namespace kiln::node {

kiln::v1::Envelope ErrorResult(const std::string& job_id, uint32_t attempt,
                               const absl::Status& status) {
  kiln::v1::Envelope env;
  auto* r = env.mutable_result();
  r->set_job_id(job_id);
  r->set_ok(false);
  r->set_error_code(StatusCodeName(status.code()));
  r->set_error(std::string(status.message()));
  r->set_attempt(attempt);
  return env;
}

kiln::v1::ColdStart ColdStartOf(const pipeline::PhaseSeconds& s) {
  kiln::v1::ColdStart c;
  c.set_weights_seconds(s.weights);
  c.set_package_load_seconds(s.package_load);
  c.set_compile_seconds(s.compile);
  c.set_fetch_seconds(s.fetch);
  c.set_total_seconds(s.weights + s.package_load + s.fetch + s.compile);
  return c;
}

Worker::Worker(const ModelCatalog& catalog, Outbox& outbox, NodeMetrics& metrics,
               const Clock& clock)
    : catalog_(catalog), outbox_(outbox), metrics_(metrics), clock_(clock) {}

Worker::~Worker() { Shutdown(/*cancel_running=*/true); }

void Worker::Start() { thread_ = std::thread([this] { Loop(); }); }

void Worker::Shutdown(bool cancel_running) {
  {
    absl::MutexLock lock(&mu_);
    shutting_down_ = true;
    if (cancel_running && !running_.empty()) cancel_.Cancel();
  }
  if (thread_.joinable()) thread_.join();
}

bool Worker::Enqueue(Job job) {
  absl::MutexLock lock(&mu_);
  const std::string& id = job.spec.job_id();
  if (running_ == id) return false;
  for (const Job& q : queue_) {
    if (q.spec.job_id() == id) return false;
  }
  queue_.push_back(std::move(job));
  return true;
}

Worker::CancelOutcome Worker::Cancel(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  if (!running_.empty() && running_ == job_id) {
    cancel_.Cancel();
    return CancelOutcome::kStopping;
  }
  for (auto it = queue_.begin(); it != queue_.end(); ++it) {
    if (it->spec.job_id() != job_id) continue;
    const absl::Status why = absl::CancelledError("cancelled by the coordinator before it started");
    outbox_.Push(ErrorResult(job_id, it->attempt, why));
    metrics_.jobs_cancelled.Increment();
    queue_.erase(it);
    return CancelOutcome::kDequeued;
  }
  return CancelOutcome::kNotFound;
}

std::vector<Job> Worker::TakeQueued() {
  absl::MutexLock lock(&mu_);
  std::vector<Job> out(std::make_move_iterator(queue_.begin()),
                       std::make_move_iterator(queue_.end()));
  queue_.clear();
  return out;
}

std::vector<std::string> Worker::ActiveJobIds() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  if (!running_.empty()) out.push_back(running_);
  for (const Job& q : queue_) out.push_back(q.spec.job_id());
  return out;
}

std::vector<std::string> Worker::LoadedPackages() const {
  absl::MutexLock lock(&mu_);
  return loaded_;
}

bool Worker::idle() const {
  absl::MutexLock lock(&mu_);
  return running_.empty() && queue_.empty();
}

void Worker::Loop() {
  while (true) {
    Job job;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](Worker* w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(w->mu_) {
            return w->shutting_down_ || !w->queue_.empty();
          },
          this));
      if (shutting_down_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
      running_ = job.spec.job_id();
      cancel_.Reset();
    }
    kiln::v1::Envelope result = Run(job);
    // Loaded packages change only inside Generate(), i.e. on this thread.
    std::set<std::string> loaded;
    for (Generator* g : catalog_.generators()) {
      for (auto& d : g->LoadedDigests()) loaded.insert(std::move(d));
    }
    // One step under the lock: whoever sees the worker idle finds the result already queued,
    // and no heartbeat lists a job whose result has gone out.
    absl::MutexLock lock(&mu_);
    running_.clear();
    loaded_.assign(loaded.begin(), loaded.end());
    outbox_.Push(std::move(result));
  }
}

kiln::v1::Envelope Worker::Run(const Job& job) {
  const std::string& id = job.spec.job_id();
  if (job.spec.deadline_unix_ms() != 0 && clock_.UnixMs() > job.spec.deadline_unix_ms()) {
    metrics_.jobs_rejected.Increment();
    return ErrorResult(id, job.attempt,
                       absl::DeadlineExceededError(absl::StrCat(
                           "spec.deadline_unix_ms: the job was not started by its deadline ",
                           job.spec.deadline_unix_ms())));
  }
  const SteadyTime start = SteadyNow();
  auto last_step = start;
  int last_step_index = -1;
  int reported_step = 0;  // the step of the last progress event: where a cancel stops the job
  auto progress = [&](const std::string& phase, int step, int total) {
    kiln::v1::Envelope env;
    auto* p = env.mutable_progress();
    p->set_job_id(id);
    p->set_step(static_cast<uint32_t>(step));
    p->set_total_steps(static_cast<uint32_t>(total));
    p->set_phase(phase);
    outbox_.Push(std::move(env));
    reported_step = step;
    if (phase == "denoising") {
      const SteadyTime now = SteadyNow();
      if (last_step_index >= 0 && step == last_step_index + 1) {
        metrics_.step_seconds.Observe(std::chrono::duration<double>(now - last_step).count());
      }
      last_step = now;
      last_step_index = step;
    }
  };

  pipeline::GenerateRequest request = job.plan.request;
  request.cancel = &cancel_;
  absl::StatusOr<pipeline::GenerateResult> result = absl::UnknownError("not run");
  try {
    result = job.plan.generator->Generate(request, progress);
  } catch (const std::exception& e) {
    result = absl::InternalError(absl::StrCat("generate: ", e.what()));
  }
  // A cancel that arrived after the pipeline's last check still wins: the coordinator has
  // already told its client the job is cancelled.
  if (cancel_.cancelled()) {
    metrics_.jobs_cancelled.Increment();
    return ErrorResult(
        id, job.attempt,
        absl::CancelledError(absl::IsCancelled(result.status())
                                 ? absl::StrCat("cancelled by the coordinator after step ",
                                                reported_step, " of ", request.steps)
                                 : "cancelled by the coordinator"));
  }
  if (!result.ok()) {
    // The whole error (a compiler's traceback included) stays in this log; the result carries
    // one line when the disk is to blame.
    LogWarning("node", absl::StrCat("job ", id, " failed: ", result.status().ToString()));
    metrics_.jobs_failed.Increment();
    return ErrorResult(id, job.attempt, DiskFailure(result.status(), disk_, node_id_));
  }
  for (const auto& w : result->warnings) LogWarning("node", absl::StrCat("job ", id, ": ", w));
  auto png = pipeline::EncodePng(result->rgb.data(), result->width, result->height);
  if (!png.ok()) {
    metrics_.jobs_failed.Increment();
    return ErrorResult(id, job.attempt, png.status());
  }
  const double run_seconds = SecondsSince(start);
  kiln::v1::Envelope env;
  auto* r = env.mutable_result();
  r->set_job_id(id);
  r->set_ok(true);
  r->set_png(*std::move(png));
  r->set_run_seconds(run_seconds);
  r->set_attempt(job.attempt);
  for (const auto& [component, provenance] : result->packages) {
    (*r->mutable_packages())[component] = provenance;
  }
  *r->mutable_cold_start() = ColdStartOf(result->seconds);

  metrics_.jobs_succeeded.Increment();
  metrics_.job_seconds.Observe(run_seconds);
  const auto& cold = r->cold_start();
  if (cold.total_seconds() > 0) {
    metrics_.cold_weights.Observe(cold.weights_seconds());
    metrics_.cold_package_load.Observe(cold.package_load_seconds());
    metrics_.cold_fetch.Observe(cold.fetch_seconds());
    metrics_.cold_compile.Observe(cold.compile_seconds());
    metrics_.cold_total.Observe(cold.total_seconds());
  }
  return env;
}

}  // namespace kiln::node
