#include "node/worker.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/stopwatch.h"
#include "common/wire.h"
#include "node/health.h"
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

absl::Status WorkerOptions::Validate() const {
  if (max_batch < 1 || max_batch > kMaxBatch) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch: ", max_batch, " is not in 1..", kMaxBatch));
  }
  if (batch_wait_ms < 0 || batch_wait_ms > kMaxBatchWaitMs) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch_wait_ms: ", batch_wait_ms, " is not in 0..", kMaxBatchWaitMs));
  }
  return absl::OkStatus();
}

Worker::Worker(const ModelCatalog& catalog, Outbox& outbox, NodeMetrics& metrics,
               const Clock& clock, WorkerOptions options)
    : catalog_(catalog), outbox_(outbox), metrics_(metrics), clock_(clock), options_(options) {}

Worker::~Worker() { Shutdown(/*cancel_running=*/true); }

void Worker::Start() {
  encode_thread_ = std::thread([this] { EncodeLoop(); });
  denoise_thread_ = std::thread([this] { DenoiseLoop(); });
  finish_thread_ = std::thread([this] { FinishLoop(); });
}

void Worker::Shutdown(bool cancel_running) {
  {
    absl::MutexLock lock(&mu_);
    shutting_down_ = true;
    if (cancel_running) {
      for (const TakenPtr& t : taken_) t->cancel.Cancel();
    }
  }
  if (encode_thread_.joinable()) encode_thread_.join();
  if (denoise_thread_.joinable()) denoise_thread_.join();
  {
    absl::MutexLock lock(&mu_);
    stages_stopped_ = true;  // the finish stage empties its queue, then ends
  }
  if (finish_thread_.joinable()) finish_thread_.join();
}

bool Worker::Enqueue(Job job) {
  absl::MutexLock lock(&mu_);
  const std::string& id = job.spec.job_id();
  for (const TakenPtr& t : taken_) {
    if (t->job.spec.job_id() == id && !t->handed_back) return false;
  }
  for (const Job& q : queue_) {
    if (q.spec.job_id() == id) return false;
  }
  queue_.push_back(std::move(job));
  return true;
}

Worker::CancelOutcome Worker::Cancel(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  const absl::Status before = absl::CancelledError("cancelled by the coordinator before it started");
  for (auto it = taken_.begin(); it != taken_.end(); ++it) {
    Taken& t = **it;
    if (t.job.spec.job_id() != job_id || t.handed_back) continue;
    if (t.stage == Taken::Stage::kEncoded) {
      // Prefetched and waiting for the denoise stage: nothing runs it, drop it now.
      outbox_.Push(ErrorResult(job_id, t.job.attempt, before));
      metrics_.jobs_cancelled.Increment();
      taken_.erase(it);
      return CancelOutcome::kDequeued;
    }
    t.cancel.Cancel();
    return CancelOutcome::kStopping;
  }
  for (auto it = queue_.begin(); it != queue_.end(); ++it) {
    if (it->spec.job_id() != job_id) continue;
    outbox_.Push(ErrorResult(job_id, it->attempt, before));
    metrics_.jobs_cancelled.Increment();
    queue_.erase(it);
    return CancelOutcome::kDequeued;
  }
  return CancelOutcome::kNotFound;
}

std::vector<Job> Worker::TakeQueued() {
  absl::MutexLock lock(&mu_);
  std::vector<Job> out;
  for (auto it = taken_.begin(); it != taken_.end();) {
    Taken& t = **it;
    if (t.stage == Taken::Stage::kEncoded) {
      // Prefetched: nothing has run it past its encoding; the encoding is dropped.
      out.push_back(std::move(t.job));
      it = taken_.erase(it);
      continue;
    }
    if (t.stage == Taken::Stage::kEncoding && !t.handed_back) {
      // Its encoding stops at the pipeline's next check; the encode stage then drops it
      // without a result (this one is the caller's to answer).
      t.handed_back = true;
      t.cancel.Cancel();
      out.push_back(t.job);
    }
    ++it;
  }
  for (Job& q : queue_) out.push_back(std::move(q));
  queue_.clear();
  return out;
}

std::vector<std::string> Worker::ActiveJobIds() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  for (const TakenPtr& t : taken_) {
    if (!t->handed_back) out.push_back(t->job.spec.job_id());
  }
  for (const Job& q : queue_) out.push_back(q.spec.job_id());
  return out;
}

std::map<std::string, std::string> Worker::AppliedLoras() const {
  absl::MutexLock lock(&mu_);
  return applied_loras_;
}

std::vector<std::string> Worker::LoadedPackages() const {
  absl::MutexLock lock(&mu_);
  return loaded_;
}

bool Worker::idle() const {
  absl::MutexLock lock(&mu_);
  // A job handed back while being encoded produces nothing more: it does not keep us busy.
  return queue_.empty() && std::all_of(taken_.begin(), taken_.end(),
                                       [](const TakenPtr& t) { return t->handed_back; });
}

std::vector<std::string> Worker::PrefetchedJobIds() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  for (const TakenPtr& t : taken_) {
    if (t->stage == Taken::Stage::kEncoded) out.push_back(t->job.spec.job_id());
  }
  return out;
}

void Worker::Progress(Taken& t, const std::string& phase, int step, int total) {
  {
    absl::MutexLock lock(&mu_);
    if (t.handed_back) return;  // the job is no longer ours: it may run elsewhere already
  }
  kiln::v1::Envelope env;
  auto* p = env.mutable_progress();
  p->set_job_id(t.job.spec.job_id());
  p->set_step(static_cast<uint32_t>(step));
  p->set_total_steps(static_cast<uint32_t>(total));
  p->set_phase(phase);
  outbox_.Push(std::move(env));
  t.reported_step = step;
  if (phase == "denoising") {
    const SteadyTime now = SteadyNow();
    if (t.last_step_index >= 0 && step == t.last_step_index + 1) {
      metrics_.step_seconds.Observe(std::chrono::duration<double>(now - t.last_step).count());
    }
    t.last_step = now;
    t.last_step_index = step;
  }
}

void Worker::DeviceStage(const std::string& model, bool begin) {
  DeviceBusy& busy = device_busy_[model];
  if (begin) {
    if (busy.stages++ == 0) busy.since = SteadyNow();
    return;
  }
  if (--busy.stages == 0) {
    metrics_.device_seconds.Add({{"model", model}}).Increment(SecondsSince(busy.since));
  }
}

Worker::TakenPtr Worker::FirstIn(Taken::Stage stage) const {
  for (const TakenPtr& x : taken_) {
    if (x->stage == stage) return x;
  }
  return nullptr;
}

int Worker::CountIn(Taken::Stage stage) const {
  return static_cast<int>(std::count_if(taken_.begin(), taken_.end(),
                                        [stage](const TakenPtr& x) { return x->stage == stage; }));
}

std::vector<Worker::TakenPtr> Worker::BatchFor(const TakenPtr& head) const {
  std::vector<TakenPtr> out{head};
  for (const TakenPtr& x : taken_) {
    if (static_cast<int>(out.size()) >= options_.max_batch) break;
    if (x == head || x->stage != Taken::Stage::kEncoded) continue;
    if (x->job.plan.generator == head->job.plan.generator &&
        pipeline::BatchCompatible(x->job.plan.request, head->job.plan.request)) {
      out.push_back(x);
    }
  }
  return out;
}

bool Worker::BatchReady() const {
  if (shutting_down_) return true;
  const TakenPtr head = FirstIn(Taken::Stage::kEncoded);
  // Full, or no room to encode another job (the encoded ones that do not fit hold the slots).
  return head == nullptr || static_cast<int>(BatchFor(head).size()) >= options_.max_batch ||
         CountIn(Taken::Stage::kEncoded) >= options_.max_batch;
}

void Worker::ToFinish(const TakenPtr& t) {
  t->stage = Taken::Stage::kFinishing;
  to_finish_.push_back(t);
}

void Worker::EncodeLoop() {
  while (true) {
    TakenPtr t;
    {
      absl::MutexLock lock(&mu_);
      // One job (a batch: max_batch jobs) ahead of the denoise stage at most: take the next
      // when none is being encoded and fewer wait encoded.
      mu_.Await(absl::Condition(
          +[](Worker* w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(w->mu_) {
            if (w->shutting_down_) return true;
            return !w->queue_.empty() && w->FirstIn(Taken::Stage::kEncoding) == nullptr &&
                   w->CountIn(Taken::Stage::kEncoded) < w->options_.max_batch;
          },
          this));
      if (shutting_down_) return;
      t = std::make_shared<Taken>();
      t->job = std::move(queue_.front());
      queue_.pop_front();
      t->start = SteadyNow();
      taken_.push_back(t);
      DeviceStage(t->job.plan.model, /*begin=*/true);
    }
    const kiln::v1::JobSpec& spec = t->job.spec;
    absl::StatusOr<pipeline::EncodedPrompt> encoded = absl::UnknownError("not encoded");
    if (spec.deadline_unix_ms() != 0 && clock_.UnixMs() > spec.deadline_unix_ms()) {
      t->expired = true;
      encoded = absl::DeadlineExceededError(
          absl::StrCat("spec.deadline_unix_ms: the job was not started by its deadline ",
                       spec.deadline_unix_ms()));
    } else {
      pipeline::GenerateRequest request = t->job.plan.request;
      request.cancel = &t->cancel;
      try {
        encoded = t->job.plan.generator->EncodePrompt(
            request, [&](const std::string& phase, int step, int total) {
              Progress(*t, phase, step, total);
            });
      } catch (const std::exception& e) {
        encoded = absl::InternalError(absl::StrCat("generate: ", e.what()));
      }
    }
    absl::MutexLock lock(&mu_);
    DeviceStage(t->job.plan.model, /*begin=*/false);
    if (t->handed_back) {
      taken_.remove(t);  // TakeQueued gave it back: no result from here
    } else if (encoded.ok() && !t->cancel.cancelled()) {
      t->encoded = std::move(encoded);
      t->stage = Taken::Stage::kEncoded;
      t->encoded_at = SteadyNow();
    } else {
      t->result = encoded.ok() ? absl::CancelledError("cancelled") : encoded.status();
      ToFinish(t);
    }
  }
}

void Worker::DenoiseLoop() {
  while (true) {
    std::vector<TakenPtr> batch;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](Worker* w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(w->mu_) {
            return w->shutting_down_ || w->FirstIn(Taken::Stage::kEncoded) != nullptr;
          },
          this));
      if (options_.max_batch > 1 && options_.batch_wait_ms > 0) {
        // Bounded: the longest a batch holds back its first job.
        mu_.AwaitWithTimeout(absl::Condition(this, &Worker::BatchReady),
                             absl::Milliseconds(options_.batch_wait_ms));
      }
      if (shutting_down_) return;
      const TakenPtr head = FirstIn(Taken::Stage::kEncoded);
      if (head == nullptr) continue;  // cancelled or handed back during the wait
      batch = BatchFor(head);
      size_t size = 1;  // a power of two: the bucket batches a node compiles are 1, 2, 4
      while (size * 2 <= batch.size()) size *= 2;
      batch.resize(size);
      for (const TakenPtr& t : batch) {
        t->stage = Taken::Stage::kDenoising;
        t->waited += SecondsSince(t->encoded_at);
        DeviceStage(t->job.plan.model, /*begin=*/true);
      }
    }
    const size_t n = batch.size();
    std::vector<pipeline::EncodedPrompt> encoded;
    std::vector<pipeline::ProgressFn> progress;
    for (const TakenPtr& t : batch) {
      encoded.push_back(*std::move(t->encoded));
      progress.push_back([this, t = t.get()](const std::string& phase, int step, int total) {
        Progress(*t, phase, step, total);
      });
    }
    Generator* generator = batch.front()->job.plan.generator;
    std::vector<absl::StatusOr<pipeline::GenerateResult>> results;
    try {
      results = generator->DenoiseDecodeBatch(std::move(encoded), progress);
    } catch (const std::exception& e) {
      results.assign(n, absl::InternalError(absl::StrCat("generate: ", e.what())));
    }
    if (results.size() != n) {
      results.assign(n, absl::InternalError(absl::StrCat(
                            "generate: ", results.size(), " results for a batch of ", n)));
    }
    metrics_.batch_size.Add({{"model", batch.front()->job.plan.model}}, NodeMetrics::BatchBuckets())
        .Observe(static_cast<double>(n));
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < n; ++i) {
      const TakenPtr& t = batch[i];
      DeviceStage(t->job.plan.model, /*begin=*/false);
      t->encoded = absl::UnknownError("consumed");
      t->result = std::move(results[i]);
      ToFinish(t);
    }
  }
}

void Worker::FinishLoop() {
  while (true) {
    TakenPtr t;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](Worker* w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(w->mu_) {
            return w->stages_stopped_ || !w->to_finish_.empty();
          },
          this));
      if (to_finish_.empty()) return;  // stages stopped and nothing left
      t = to_finish_.front();
      to_finish_.pop_front();
    }
    kiln::v1::Envelope result = Finish(*t);
    std::set<std::string> loaded;
    for (Generator* g : catalog_.generators()) {
      for (auto& d : g->LoadedDigests()) loaded.insert(std::move(d));
    }
    std::map<std::string, std::string> applied;  // as of now: the next job may have switched it
    for (const auto& [key, g] : catalog_.GeneratorsByKey()) {
      if (std::string set = g->AppliedLoras(); !set.empty()) applied[key] = std::move(set);
    }
    // One step under the lock: whoever sees the worker idle finds the result already queued,
    // and no heartbeat lists a job whose result has gone out.
    absl::MutexLock lock(&mu_);
    taken_.remove(t);
    loaded_.assign(loaded.begin(), loaded.end());
    applied_loras_ = std::move(applied);
    outbox_.Push(std::move(result));
  }
}

kiln::v1::Envelope Worker::Finish(Taken& t) {
  const std::string& id = t.job.spec.job_id();
  absl::StatusOr<pipeline::GenerateResult>& result = t.result;
  if (t.expired) {
    metrics_.jobs_rejected.Increment();
    return ErrorResult(id, t.job.attempt, result.status());
  }
  // A cancel that arrived after the pipeline's last check still wins: the coordinator has
  // already told its client the job is cancelled.
  if (t.cancel.cancelled()) {
    metrics_.jobs_cancelled.Increment();
    return ErrorResult(
        id, t.job.attempt,
        absl::CancelledError(absl::IsCancelled(result.status())
                                 ? absl::StrCat("cancelled by the coordinator after step ",
                                                t.reported_step, " of ", t.job.spec.steps())
                                 : "cancelled by the coordinator"));
  }
  if (!result.ok()) {
    // The whole error (a compiler's traceback included) stays in this log; the result carries
    // one line when the disk is to blame.
    LogWarning("node", absl::StrCat("job ", id, " failed: ", result.status().ToString()));
    metrics_.jobs_failed.Increment();
    // A disk that cannot be written, or a generator that can run no more jobs (a multi-GPU
    // node's rank group failed), is named instead, with a code the coordinator requeues on.
    const absl::Status error = GeneratorFailure(result.status(), *t.job.plan.generator,
                                                t.job.plan.model, t.job.plan.precision, node_id_);
    return ErrorResult(id, t.job.attempt, DiskFailure(error, disk_, node_id_));
  }
  if (result->lora_switched) {
    metrics_.lora_switches.Increment();
    metrics_.lora_switch_seconds.Observe(result->seconds.lora_load + result->seconds.lora_switch);
  }
  if (result->seconds.lora_prepare > 0) {
    metrics_.lora_prepare_seconds.Observe(result->seconds.lora_prepare);
  }
  for (const auto& w : result->warnings) LogWarning("node", absl::StrCat("job ", id, ": ", w));
  auto png = pipeline::EncodePng(result->rgb.data(), result->width, result->height);
  if (!png.ok()) {
    metrics_.jobs_failed.Increment();
    return ErrorResult(id, t.job.attempt, png.status());
  }
  // Its own time: the wait for the denoise stage (behind the job before) is not its run.
  const double run_seconds = SecondsSince(t.start) - t.waited;
  kiln::v1::Envelope env;
  auto* r = env.mutable_result();
  r->set_job_id(id);
  r->set_ok(true);
  r->set_png(*std::move(png));
  r->set_run_seconds(run_seconds);
  r->set_attempt(t.job.attempt);
  for (const auto& [component, provenance] : result->packages) {
    (*r->mutable_packages())[component] = provenance;
  }
  *r->mutable_cold_start() = ColdStartOf(result->seconds);

  metrics_.jobs_succeeded.Increment();
  metrics_.images.Add({{"model", t.job.plan.model}}).Increment();
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
