// The worker without sockets: a fake generator, the Outbox, a FakeClock and a private registry.
// Progress for every step, the result (PNG, provenance, cold start, attempt), metrics, cancel of
// a running job after its current step and of a queued job, duplicates, deadlines, errors.
#include "node/worker.h"

#include <chrono>
#include <functional>
#include <map>
#include <thread>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "pipeline/png.h"
#include "tests/node/node_test_support.h"

namespace kiln::node {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

class WorkerTest : public ::testing::Test {
 protected:
  WorkerTest()
      : catalog_("fp32", {{64, 32}}),
        outbox_(*Outbox::Create()),
        metrics_(registry_, "node-t", "cpu", kiln::v1::DeviceInfo()) {
    auto gen = std::make_unique<testing::FakeGenerator>();
    gen_ = gen.get();
    catalog_.Add("tiny", "fp32", std::move(gen));
    worker_ = std::make_unique<Worker>(catalog_, *outbox_, metrics_, clock_);
    worker_->Start();
  }

  Job MakeJob(const std::string& id, int steps, uint32_t attempt = 1) {
    Job job;
    job.spec.set_job_id(id);
    job.spec.set_model("tiny");
    job.spec.set_prompt("p");
    job.spec.set_width(64);
    job.spec.set_height(32);
    job.spec.set_steps(steps);
    job.spec.set_seed(9);
    job.attempt = attempt;
    auto plan = catalog_.Plan(job.spec);
    EXPECT_TRUE(plan.ok()) << plan.status();
    job.plan = *plan;
    return job;
  }

  // Collects outbox messages until the result of `job_id` arrives; progress goes to `progress`.
  kiln::v1::JobResult WaitResult(const std::string& job_id,
                                 std::vector<kiln::v1::JobProgress>* progress = nullptr) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline) {
      for (auto& env : outbox_->Drain()) {
        if (env.has_progress() && progress) progress->push_back(env.progress());
        if (env.has_result() && env.result().job_id() == job_id) {
          pending_.push_back(env.result());
        } else if (env.has_result()) {
          pending_.push_back(env.result());
          continue;
        }
      }
      for (auto it = pending_.begin(); it != pending_.end(); ++it) {
        if (it->job_id() == job_id) {
          auto r = *it;
          pending_.erase(it);
          return r;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    ADD_FAILURE() << "no result for " << job_id;
    return {};
  }

  // Polls `done` every millisecond for up to 30 s.
  static bool WaitUntil(const std::function<bool()>& done) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline) {
      if (done()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return done();
  }

  // Replaces the worker by one with `options`.
  void Restart(WorkerOptions options) {
    worker_->Shutdown(/*cancel_running=*/true);
    worker_ = std::make_unique<Worker>(catalog_, *outbox_, metrics_, clock_, options);
    worker_->Start();
  }

  prometheus::Registry registry_;
  FakeClock clock_;
  ModelCatalog catalog_;
  std::unique_ptr<Outbox> outbox_;
  NodeMetrics metrics_;
  testing::FakeGenerator* gen_;
  std::unique_ptr<Worker> worker_;
  std::vector<kiln::v1::JobResult> pending_;
};

TEST_F(WorkerTest, RunsAJobWithProgressForEveryStepThenAWarmOne) {
  ASSERT_TRUE(worker_->Enqueue(MakeJob("j1", 3, /*attempt=*/2)));
  std::vector<kiln::v1::JobProgress> progress;
  const auto r = WaitResult("j1", &progress);
  ASSERT_TRUE(r.ok()) << r.error();
  std::vector<std::string> events;
  for (const auto& p : progress) {
    EXPECT_EQ(p.job_id(), "j1");
    EXPECT_EQ(p.total_steps(), 3u);
    events.push_back(absl::StrCat(p.phase(), ":", p.step()));
  }
  EXPECT_THAT(events, ElementsAre("preparing:0", "text_encoding:0", "denoising:0", "denoising:1",
                                  "denoising:2", "denoising:3", "decoding:3"));
  const std::vector<uint8_t> rgb(64 * 32 * 3, 9);
  EXPECT_EQ(r.png(), *pipeline::EncodePng(rgb.data(), 64, 32));
  EXPECT_EQ(r.attempt(), 2u);
  EXPECT_GT(r.run_seconds(), 0);
  EXPECT_EQ(r.packages().at("text_encoder"), "local");
  EXPECT_EQ(r.packages().at("transformer"), "compiled");
  EXPECT_DOUBLE_EQ(r.cold_start().weights_seconds(), 0.5);
  EXPECT_DOUBLE_EQ(r.cold_start().package_load_seconds(), 0.25);
  EXPECT_DOUBLE_EQ(r.cold_start().fetch_seconds(), 0.125);
  EXPECT_DOUBLE_EQ(r.cold_start().compile_seconds(), 2);
  EXPECT_DOUBLE_EQ(r.cold_start().total_seconds(), 2.875);
  EXPECT_EQ(gen_->last_request.seed, 9u);

  ASSERT_TRUE(worker_->Enqueue(MakeJob("j2", 2)));
  const auto warm = WaitResult("j2");
  ASSERT_TRUE(warm.ok());
  EXPECT_EQ(warm.packages().at("transformer"), "resident");
  EXPECT_DOUBLE_EQ(warm.cold_start().total_seconds(), 0);
  EXPECT_THAT(worker_->LoadedPackages(), ElementsAre("m-loaded"));
  EXPECT_TRUE(worker_->idle());
  EXPECT_TRUE(worker_->ActiveJobIds().empty());

  EXPECT_EQ(metrics_.jobs_succeeded.Value(), 2);
  EXPECT_EQ(metrics_.cold_total.Collect().histogram.sample_count, 1u);  // warm jobs not observed
  EXPECT_DOUBLE_EQ(metrics_.cold_compile.Collect().histogram.sample_sum, 2);
  EXPECT_EQ(metrics_.step_seconds.Collect().histogram.sample_count, 5u);
  EXPECT_EQ(metrics_.job_seconds.Collect().histogram.sample_count, 2u);
}

// A job's LoRAs reach the generator; a changed set counts as a switch (and its time), the set
// merged is reported per "<model>/<precision>" once the job is done, and base weights are
// reported as no entry.
TEST_F(WorkerTest, LoraSwitchesAreCountedTimedAndTheAppliedSetReported) {
  Job job = MakeJob("j1", 1);
  auto* lora = job.spec.add_loras();
  lora->set_name("style");
  lora->set_scale(0.5f);
  job.plan = *catalog_.Plan(job.spec);
  ASSERT_TRUE(worker_->Enqueue(job));
  ASSERT_TRUE(WaitResult("j1").ok());
  ASSERT_EQ(gen_->last_request.loras.size(), 1u);
  EXPECT_EQ(gen_->last_request.loras[0].name, "style");
  EXPECT_EQ(gen_->last_request.loras[0].scale, 0.5);
  EXPECT_THAT(worker_->AppliedLoras(),
              ElementsAre(std::make_pair(std::string("tiny/fp32"), std::string("style@0.5"))));
  EXPECT_EQ(metrics_.lora_switches.Value(), 1);

  Job same = MakeJob("j2", 1);
  *same.spec.mutable_loras() = job.spec.loras();
  same.plan = *catalog_.Plan(same.spec);
  ASSERT_TRUE(worker_->Enqueue(same));
  ASSERT_TRUE(WaitResult("j2").ok());
  EXPECT_EQ(metrics_.lora_switches.Value(), 1);  // the same set: no switch

  ASSERT_TRUE(worker_->Enqueue(MakeJob("j3", 1)));
  ASSERT_TRUE(WaitResult("j3").ok());
  EXPECT_TRUE(worker_->AppliedLoras().empty());
  EXPECT_EQ(metrics_.lora_switches.Value(), 2);
  EXPECT_EQ(metrics_.lora_switch_seconds.Collect().histogram.sample_count, 2u);
  EXPECT_DOUBLE_EQ(metrics_.lora_switch_seconds.Collect().histogram.sample_sum, 0.125);
  EXPECT_EQ(metrics_.lora_prepare_seconds.Collect().histogram.sample_count, 2u);
  EXPECT_DOUBLE_EQ(metrics_.lora_prepare_seconds.Collect().histogram.sample_sum, 0.5);
}

TEST_F(WorkerTest, CancelStopsTheRunningJobAfterItsCurrentStep) {
  gen_->on_step = [this](int step) {
    if (step == 3) EXPECT_EQ(worker_->Cancel("long"), Worker::CancelOutcome::kStopping);
  };
  ASSERT_TRUE(worker_->Enqueue(MakeJob("long", 100)));
  std::vector<kiln::v1::JobProgress> progress;
  const auto r = WaitResult("long", &progress);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.error_code(), "CANCELLED");
  EXPECT_EQ(r.error(), "cancelled by the coordinator after step 3 of 100");
  ASSERT_FALSE(progress.empty());
  EXPECT_EQ(progress.back().step(), 3u);
  EXPECT_EQ(metrics_.jobs_cancelled.Value(), 1);
  // The generator is usable again.
  gen_->on_step = nullptr;
  ASSERT_TRUE(worker_->Enqueue(MakeJob("next", 2)));
  EXPECT_TRUE(WaitResult("next").ok());
  EXPECT_EQ(worker_->Cancel("next"), Worker::CancelOutcome::kNotFound);
}

TEST_F(WorkerTest, QueuedAndPrefetchedJobsCanBeCancelledOrTakenAndDuplicatesAreRefused) {
  absl::Notification started, release;
  gen_->on_step = [&](int step) {
    if (step == 1 && !started.HasBeenNotified()) {
      started.Notify();
      release.WaitForNotification();
    }
  };
  ASSERT_TRUE(worker_->Enqueue(MakeJob("first", 2)));
  started.WaitForNotification();
  EXPECT_FALSE(worker_->Enqueue(MakeJob("first", 2)));  // running
  ASSERT_TRUE(worker_->Enqueue(MakeJob("second", 2)));
  ASSERT_TRUE(worker_->Enqueue(MakeJob("third", 2)));
  ASSERT_TRUE(worker_->Enqueue(MakeJob("fourth", 2, /*attempt=*/4)));
  // "second" is encoded while "first" denoises, and waits; the others stay queued.
  ASSERT_TRUE(WaitUntil([&] { return worker_->PrefetchedJobIds().size() == 1; }));
  EXPECT_THAT(worker_->PrefetchedJobIds(), ElementsAre("second"));
  EXPECT_FALSE(worker_->Enqueue(MakeJob("second", 2)));  // prefetched
  EXPECT_FALSE(worker_->Enqueue(MakeJob("third", 2)));   // queued
  EXPECT_THAT(worker_->ActiveJobIds(), ElementsAre("first", "second", "third", "fourth"));
  EXPECT_FALSE(worker_->idle());
  EXPECT_EQ(gen_->encode_calls, 2);

  EXPECT_EQ(worker_->Cancel("third"), Worker::CancelOutcome::kDequeued);
  const auto cancelled = WaitResult("third");
  EXPECT_EQ(cancelled.error_code(), "CANCELLED");
  EXPECT_THAT(cancelled.error(), HasSubstr("before it started"));

  // The prefetched job is dropped at once: nothing runs it; "fourth" moves up into its slot.
  EXPECT_EQ(worker_->Cancel("second"), Worker::CancelOutcome::kDequeued);
  const auto dropped = WaitResult("second");
  EXPECT_EQ(dropped.error_code(), "CANCELLED");
  EXPECT_THAT(dropped.error(), HasSubstr("before it started"));
  ASSERT_TRUE(WaitUntil([&] { return worker_->PrefetchedJobIds().size() == 1; }));
  EXPECT_THAT(worker_->PrefetchedJobIds(), ElementsAre("fourth"));

  // A graceful stop takes the prefetched job back too (its encoding is dropped), not only the
  // queued ones; the running one stays.
  ASSERT_TRUE(worker_->Enqueue(MakeJob("fifth", 2)));
  auto taken = worker_->TakeQueued();
  ASSERT_EQ(taken.size(), 2u);
  EXPECT_EQ(taken[0].spec.job_id(), "fourth");
  EXPECT_EQ(taken[0].attempt, 4u);
  EXPECT_EQ(taken[1].spec.job_id(), "fifth");
  EXPECT_THAT(worker_->PrefetchedJobIds(), ::testing::IsEmpty());
  EXPECT_THAT(worker_->ActiveJobIds(), ElementsAre("first"));
  EXPECT_EQ(worker_->Cancel("fourth"), Worker::CancelOutcome::kNotFound);

  release.Notify();
  EXPECT_TRUE(WaitResult("first").ok());
  EXPECT_EQ(gen_->calls, 1);  // only "first" was denoised
  EXPECT_TRUE(WaitUntil([&] { return worker_->idle(); }));
  // Nothing more came: no result for the jobs taken back (an idle worker has queued all).
  for (auto& env : outbox_->Drain()) {
    if (env.has_result()) ADD_FAILURE() << "unexpected result for " << env.result().job_id();
  }
  for (const auto& r : pending_) ADD_FAILURE() << "unexpected result for " << r.job_id();
}

TEST_F(WorkerTest, AJobTakenBackWhileBeingEncodedStopsAndSendsNothingMore) {
  absl::Notification running, release_step, encoding, release_encode;
  gen_->on_step = [&](int step) {
    if (step == 1 && !running.HasBeenNotified()) {
      running.Notify();
      release_step.WaitForNotification();
    }
  };
  gen_->on_encode = [&](const pipeline::GenerateRequest& r) {
    if (r.seed == 7) {
      encoding.Notify();
      release_encode.WaitForNotification();
    }
  };
  ASSERT_TRUE(worker_->Enqueue(MakeJob("first", 2)));
  running.WaitForNotification();
  Job second = MakeJob("second", 2, /*attempt=*/2);
  second.plan.request.seed = 7;
  ASSERT_TRUE(worker_->Enqueue(second));
  encoding.WaitForNotification();  // "second" is in its encoding now

  auto taken = worker_->TakeQueued();
  ASSERT_EQ(taken.size(), 1u);
  EXPECT_EQ(taken[0].spec.job_id(), "second");
  EXPECT_EQ(taken[0].attempt, 2u);
  EXPECT_THAT(worker_->ActiveJobIds(), ElementsAre("first"));
  EXPECT_EQ(worker_->Cancel("second"), Worker::CancelOutcome::kNotFound);
  EXPECT_TRUE(worker_->Enqueue(MakeJob("second", 2)));  // no longer ours: may come back
  EXPECT_EQ(worker_->TakeQueued().size(), 1u);
  for (auto& env : outbox_->Drain()) EXPECT_FALSE(env.has_result());  // its progress so far

  release_encode.Notify();  // its encoding sees the cancel and the encode stage drops it
  release_step.Notify();
  std::vector<kiln::v1::JobProgress> progress;
  EXPECT_TRUE(WaitResult("first", &progress).ok());
  EXPECT_TRUE(WaitUntil([&] { return worker_->idle(); }));
  worker_->Shutdown(/*cancel_running=*/false);  // joins the encode stage: it has let go
  for (auto& env : outbox_->Drain()) {
    EXPECT_FALSE(env.has_result()) << env.result().job_id();
    if (env.has_progress()) progress.push_back(env.progress());
  }
  for (const auto& p : progress) EXPECT_EQ(p.job_id(), "first") << p.phase();
  for (const auto& p : pending_) ADD_FAILURE() << "unexpected result for " << p.job_id();
  EXPECT_EQ(gen_->calls, 1);  // "second" was never denoised
}

TEST_F(WorkerTest, TheNextJobIsEncodedWhileTheCurrentOneDenoises) {
  absl::Notification started, release;
  gen_->on_step = [&](int step) {
    if (step == 1 && !started.HasBeenNotified()) {
      started.Notify();
      release.WaitForNotification();
    }
  };
  Job first = MakeJob("first", 3);
  first.plan.request.seed = 11;
  Job second = MakeJob("second", 3);
  second.plan.request.seed = 22;
  ASSERT_TRUE(worker_->Enqueue(std::move(first)));
  started.WaitForNotification();
  ASSERT_TRUE(worker_->Enqueue(std::move(second)));
  // "first" is held inside its denoise; "second" gets encoded meanwhile.
  ASSERT_TRUE(WaitUntil([&] { return gen_->encode_calls == 2; }));
  EXPECT_EQ(gen_->calls, 1);
  release.Notify();
  std::vector<kiln::v1::JobProgress> progress;
  const auto r1 = WaitResult("first", &progress);
  const auto r2 = WaitResult("second", &progress);
  ASSERT_TRUE(r1.ok()) << r1.error();
  ASSERT_TRUE(r2.ok()) << r2.error();
  const std::vector<uint8_t> rgb1(64 * 32 * 3, 11), rgb2(64 * 32 * 3, 22);
  EXPECT_EQ(r1.png(), *pipeline::EncodePng(rgb1.data(), 64, 32));
  EXPECT_EQ(r2.png(), *pipeline::EncodePng(rgb2.data(), 64, 32));
  // Per job, its own events in the pipeline's order.
  std::map<std::string, std::vector<std::string>> events;
  for (const auto& p : progress) events[p.job_id()].push_back(absl::StrCat(p.phase(), ":", p.step()));
  for (const char* id : {"first", "second"}) {
    EXPECT_THAT(events[id], ElementsAre("preparing:0", "text_encoding:0", "denoising:0",
                                        "denoising:1", "denoising:2", "denoising:3", "decoding:3"))
        << id;
  }
}

TEST_F(WorkerTest, ACancelDuringItsEncodingStopsThatJobOnly) {
  absl::Notification started, release;
  gen_->on_step = [&](int step) {
    if (step == 1 && !started.HasBeenNotified()) {
      started.Notify();
      release.WaitForNotification();
    }
  };
  gen_->on_encode = [&](const pipeline::GenerateRequest& request) {
    if (request.seed == 5) EXPECT_EQ(worker_->Cancel("enc"), Worker::CancelOutcome::kStopping);
  };
  ASSERT_TRUE(worker_->Enqueue(MakeJob("run", 2)));
  started.WaitForNotification();
  Job enc = MakeJob("enc", 2);
  enc.plan.request.seed = 5;
  ASSERT_TRUE(worker_->Enqueue(std::move(enc)));
  const auto cancelled = WaitResult("enc");
  EXPECT_EQ(cancelled.error_code(), "CANCELLED");
  EXPECT_EQ(cancelled.error(), "cancelled by the coordinator after step 0 of 2");
  release.Notify();
  EXPECT_TRUE(WaitResult("run").ok());
  EXPECT_EQ(gen_->calls, 1);
  EXPECT_EQ(metrics_.jobs_cancelled.Value(), 1);
}

TEST_F(WorkerTest, ManyJobsInFlightKeepTheirOwnResults) {
  gen_->step_time = std::chrono::milliseconds(1);
  for (int i = 1; i <= 8; ++i) {
    Job job = MakeJob(absl::StrCat("j", i), 3, /*attempt=*/i);
    job.plan.request.seed = static_cast<uint64_t>(10 * i);
    ASSERT_TRUE(worker_->Enqueue(std::move(job)));
  }
  for (int i = 1; i <= 8; ++i) {
    const auto r = WaitResult(absl::StrCat("j", i));
    ASSERT_TRUE(r.ok()) << r.error();
    EXPECT_EQ(r.attempt(), static_cast<uint32_t>(i));
    const std::vector<uint8_t> rgb(64 * 32 * 3, static_cast<uint8_t>(10 * i));
    EXPECT_EQ(r.png(), *pipeline::EncodePng(rgb.data(), 64, 32)) << "j" << i;
  }
  EXPECT_EQ(gen_->calls, 8);
  EXPECT_EQ(gen_->encode_calls, 8);
  EXPECT_TRUE(WaitUntil([&] { return worker_->idle(); }));
}

TEST_F(WorkerTest, AJobPastItsDeadlineIsNotRun) {
  Job job = MakeJob("late", 2);
  job.spec.set_deadline_unix_ms(clock_.UnixMs() - 1);
  ASSERT_TRUE(worker_->Enqueue(std::move(job)));
  const auto r = WaitResult("late");
  EXPECT_EQ(r.error_code(), "DEADLINE_EXCEEDED");
  EXPECT_THAT(r.error(), HasSubstr("spec.deadline_unix_ms"));
  EXPECT_EQ(gen_->calls, 0);
  EXPECT_EQ(metrics_.jobs_rejected.Value(), 1);

  Job in_time = MakeJob("in-time", 2);
  in_time.spec.set_deadline_unix_ms(clock_.UnixMs() + 1000);
  ASSERT_TRUE(worker_->Enqueue(std::move(in_time)));
  EXPECT_TRUE(WaitResult("in-time").ok());
}

TEST_F(WorkerTest, GeneratorErrorsBecomeErrorResultsWithTheirCode) {
  gen_->fail = absl::FailedPreconditionError("package abc: compiled by torch 2.0");
  ASSERT_TRUE(worker_->Enqueue(MakeJob("bad", 2, /*attempt=*/3)));
  const auto r = WaitResult("bad");
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.error_code(), "FAILED_PRECONDITION");
  EXPECT_EQ(r.error(), "package abc: compiled by torch 2.0");
  EXPECT_EQ(r.attempt(), 3u);
  EXPECT_TRUE(r.png().empty());
  EXPECT_EQ(metrics_.jobs_failed.Value(), 1);
}

TEST_F(WorkerTest, ShutdownWithCancelStopsARunningJob) {
  gen_->step_time = std::chrono::milliseconds(5);
  ASSERT_TRUE(worker_->Enqueue(MakeJob("endless", 1000)));
  while (gen_->calls == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const auto t0 = std::chrono::steady_clock::now();
  worker_->Shutdown(/*cancel_running=*/true);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  EXPECT_EQ(WaitResult("endless").error_code(), "CANCELLED");
  worker_->Shutdown(/*cancel_running=*/true);  // idempotent
}

TEST_F(WorkerTest, BatchesCompatibleEncodedJobsAndRunsTheOthersAlone) {
  // j1 and j2 share a batch; j3 (another step count) cannot join j4. The wait ends early when
  // the batch is full or the encoded jobs hold every slot; j4, alone at the end, waits 300 ms.
  Restart(WorkerOptions{/*max_batch=*/2, /*batch_wait_ms=*/300});
  gen_->step_time = std::chrono::milliseconds(5);
  Job j1 = MakeJob("j1", 4), j2 = MakeJob("j2", 4), j3 = MakeJob("j3", 3), j4 = MakeJob("j4", 4);
  j2.plan.request.seed = 20;  // per-job seeds stay per job
  for (Job* j : {&j1, &j2, &j3, &j4}) ASSERT_TRUE(worker_->Enqueue(*j));
  std::map<std::string, kiln::v1::JobResult> results;
  for (const char* id : {"j1", "j2", "j3", "j4"}) results[id] = WaitResult(id);
  for (const auto& [id, r] : results) ASSERT_TRUE(r.ok()) << id << ": " << r.error();
  EXPECT_THAT(gen_->batches(), ElementsAre(2, 1, 1));
  const std::vector<uint8_t> seed9(64 * 32 * 3, 9), seed20(64 * 32 * 3, 20);
  EXPECT_EQ(results["j1"].png(), *pipeline::EncodePng(seed9.data(), 64, 32));
  EXPECT_EQ(results["j2"].png(), *pipeline::EncodePng(seed20.data(), 64, 32));
  auto& batch_size = metrics_.batch_size.Add({{"model", "tiny"}}, NodeMetrics::BatchBuckets());
  const auto h = batch_size.Collect().histogram;
  EXPECT_EQ(h.sample_count, 3u);
  EXPECT_DOUBLE_EQ(h.sample_sum, 4);
  EXPECT_EQ(metrics_.jobs_succeeded.Value(), 4);
}

TEST_F(WorkerTest, ABatchThatFailsFailsEachOfItsJobs) {
  Restart(WorkerOptions{/*max_batch=*/2, /*batch_wait_ms=*/10000});
  gen_->fail = absl::FailedPreconditionError("package abc: compiled by torch 2.0");
  ASSERT_TRUE(worker_->Enqueue(MakeJob("j1", 2)));
  ASSERT_TRUE(worker_->Enqueue(MakeJob("j2", 2)));
  for (const char* id : {"j1", "j2"}) {
    const auto r = WaitResult(id);
    EXPECT_FALSE(r.ok()) << id;
    EXPECT_EQ(r.error_code(), "FAILED_PRECONDITION") << id;
    EXPECT_THAT(r.error(), HasSubstr("compiled by torch 2.0")) << id;
  }
  EXPECT_THAT(gen_->batches(), ElementsAre(2));  // the wait ended when the batch was full
  EXPECT_EQ(metrics_.jobs_failed.Value(), 2);
  EXPECT_TRUE(WaitUntil([&] { return worker_->idle(); }));
}

TEST_F(WorkerTest, WithoutBatchingEveryJobRunsAlone) {
  for (const char* id : {"j1", "j2", "j3"}) ASSERT_TRUE(worker_->Enqueue(MakeJob(id, 2)));
  for (const char* id : {"j1", "j2", "j3"}) ASSERT_TRUE(WaitResult(id).ok()) << id;
  EXPECT_THAT(gen_->batches(), ElementsAre(1, 1, 1));
}

TEST(WorkerOptionsTest, BatchLimitsAreChecked) {
  EXPECT_TRUE(WorkerOptions{}.Validate().ok());
  EXPECT_TRUE((WorkerOptions{4, 10000}).Validate().ok());
  for (const WorkerOptions& bad : {WorkerOptions{0, 0}, WorkerOptions{5, 0}, WorkerOptions{2, -1},
                                   WorkerOptions{2, 10001}}) {
    const auto s = bad.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.message(), HasSubstr(bad.max_batch < 1 || bad.max_batch > 4 ? "max_batch"
                                                                              : "batch_wait_ms"));
  }
}

TEST(ColdStartOfTest, TotalIsTheSumOfTheReadinessPhases) {
  pipeline::PhaseSeconds s;
  s.weights = 1;
  s.package_load = 2;
  s.fetch = 4;
  s.compile = 8;
  s.denoise = 100;  // not part of a cold start
  s.total = 200;
  const auto c = ColdStartOf(s);
  EXPECT_DOUBLE_EQ(c.total_seconds(), 15);
  EXPECT_DOUBLE_EQ(c.fetch_seconds(), 4);
}

TEST(ErrorResultTest, CarriesCodeMessageAndAttempt) {
  const auto env = ErrorResult("j", 5, absl::UnavailableError("node is shutting down"));
  ASSERT_TRUE(env.has_result());
  EXPECT_EQ(env.result().job_id(), "j");
  EXPECT_FALSE(env.result().ok());
  EXPECT_EQ(env.result().error_code(), "UNAVAILABLE");
  EXPECT_EQ(env.result().error(), "node is shutting down");
  EXPECT_EQ(env.result().attempt(), 5u);
}

}  // namespace
}  // namespace kiln::node
