// Overlapping jobs on the real pipeline: the Worker over a FluxPipeline on the flux-tiny fixtures
// (made by scripts/test.sh; skipped without them), several jobs handed over at once so that the
// next one's encoding runs beside the current denoise and the last one's PNG beside both. Every
// job that was not cancelled gives the same bytes as the same job run alone (Generate, one at a
// time), in the whole-graph and the regional transformer layouts, and with base and LoRA jobs
// alternating (each set merged ahead beside the other's denoise); a cancel of the job being
// denoised and of the job prefetched behind it loses no other job. With batching (max_batch 2),
// each job of a batch gets its own image and a job cancelled mid-batch loses no other.
#include <chrono>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cache/package_provider.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "node/catalog.h"
#include "node/worker.h"
#include "pipeline/flux_pipeline.h"
#include "pipeline/png.h"
#include "tests/pipeline/test_support.h"

namespace kiln::node {
namespace {
namespace fs = std::filesystem;
using kiln::testing::EnvOrEmpty;

std::string TestData() { return EnvOrEmpty("KILN_TESTDATA"); }

struct Layout {
  std::string packages;  // under KILN_TESTDATA
  std::string compile_options;
};

std::unique_ptr<pipeline::FluxPipeline> TinyPipeline(const Layout& layout,
                                                     std::vector<std::string> lora_dirs = {}) {
  cache::TieredProviderConfig config;  // no shared tier, no compiler: a miss is NotFound
  config.local.root = TestData() + "/" + layout.packages;
  auto provider = cache::OpenTieredProvider(std::move(config), nullptr);
  EXPECT_TRUE(provider.ok()) << provider.status();
  if (!provider.ok()) return nullptr;
  pipeline::PipelineOptions o;
  o.model_dir = TestData() + "/flux-tiny";
  o.resolutions = {{256, 256}};
  o.lora_dirs = std::move(lora_dirs);
  auto options = pipeline::ParseCompileOptions(layout.compile_options);
  EXPECT_TRUE(options.ok()) << options.status();
  o.compile_options = *options;
  auto p = pipeline::FluxPipeline::Create(
      o, std::shared_ptr<cache::PackageProvider>(*std::move(provider)));
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? *std::move(p) : nullptr;
}

kiln::v1::JobSpec Spec(const std::string& id, const std::string& prompt, uint64_t seed) {
  kiln::v1::JobSpec spec;
  spec.set_job_id(id);
  spec.set_model("tiny");
  spec.set_prompt(prompt);
  spec.set_width(256);
  spec.set_height(256);
  spec.set_steps(4);
  spec.set_seed(seed);
  return spec;
}

class OverlapTest : public ::testing::TestWithParam<Layout> {
 protected:
  void SetUp() override {
    if (!fs::exists(TestData() + "/" + GetParam().packages)) {
      GTEST_SKIP() << "run via scripts/test.sh (fixtures)";
    }
    auto pipeline = TinyPipeline(GetParam(), lora_dirs_);
    ASSERT_NE(pipeline, nullptr);
    pipeline_ = pipeline.get();
    catalog_ = std::make_unique<ModelCatalog>("fp32", std::vector<pipeline::Resolution>{{256, 256}});
    catalog_->Add("tiny", "fp32", std::make_unique<PipelineGenerator>(std::move(pipeline)));
    outbox_ = *Outbox::Create();
    metrics_ = std::make_unique<NodeMetrics>(registry_, "node-t", "cpu", kiln::v1::DeviceInfo());
  }

  // The job alone, as kiln-run makes it: one Generate() on the same pipeline, nothing beside it.
  std::string Alone(const kiln::v1::JobSpec& spec) {
    auto plan = catalog_->Plan(spec);
    EXPECT_TRUE(plan.ok()) << plan.status();
    auto r = pipeline_->Generate(plan->request);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return "";
    return *pipeline::EncodePng(r->rgb.data(), r->width, r->height);
  }

  Job MakeJob(const kiln::v1::JobSpec& spec) {
    Job job;
    job.spec = spec;
    job.attempt = 1;
    auto plan = catalog_->Plan(spec);
    EXPECT_TRUE(plan.ok()) << plan.status();
    job.plan = *plan;
    return job;
  }

  std::vector<std::string> lora_dirs_;  // the pipeline's (LoraOverlapTest)
  prometheus::Registry registry_;
  FakeClock clock_;
  pipeline::FluxPipeline* pipeline_ = nullptr;  // owned by catalog_
  std::unique_ptr<ModelCatalog> catalog_;
  std::unique_ptr<Outbox> outbox_;
  std::unique_ptr<NodeMetrics> metrics_;
};

TEST_P(OverlapTest, JobsInFlightGiveTheirAloneBytesAndCancelsLoseNoOtherJob) {
  // Distinct prompts and seeds; "stop-run" is cancelled while it denoises, "stop-next" (handed
  // over right behind it) while it is prefetched.
  const std::vector<kiln::v1::JobSpec> specs = {
      Spec("a", "a lighthouse on a cliff at dusk", 7),
      Spec("b", "a red bicycle leaning on a wall", 123),
      Spec("stop-run", "a bowl of ramen", 5),
      Spec("stop-next", "a snowy mountain village", 6),
      Spec("c", "an owl reading a newspaper", 99),
      Spec("d", "a lighthouse on a cliff at dusk", 8),
  };
  std::map<std::string, std::string> alone;
  for (const auto& spec : specs) {
    if (absl::StartsWith(spec.job_id(), "stop")) continue;
    alone[spec.job_id()] = Alone(spec);
    ASSERT_FALSE(alone[spec.job_id()].empty());
  }
  EXPECT_NE(alone["a"], alone["d"]);  // the seed matters: a mixed-up result would show

  Worker worker(*catalog_, *outbox_, *metrics_, clock_);
  worker.Start();
  for (const auto& spec : specs) ASSERT_TRUE(worker.Enqueue(MakeJob(spec)));

  std::map<std::string, kiln::v1::JobResult> results;
  std::map<std::string, Worker::CancelOutcome> cancels;
  std::set<std::string> denoising;  // jobs seen denoising, in the order first seen
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(300);
  while (results.size() < specs.size() && std::chrono::steady_clock::now() < deadline) {
    for (auto& env : outbox_->Drain()) {
      if (env.has_result()) {
        EXPECT_TRUE(results.emplace(env.result().job_id(), env.result()).second)
            << "two results for " << env.result().job_id();
        continue;
      }
      const auto& p = env.progress();
      if (p.phase() != "denoising" || p.step() != 1) continue;
      denoising.insert(p.job_id());
      if (p.job_id() == "stop-run") {
        // Its successor was handed over with it: it is queued, being encoded or prefetched.
        cancels["stop-run"] = worker.Cancel("stop-run");
        cancels["stop-next"] = worker.Cancel("stop-next");
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ASSERT_EQ(results.size(), specs.size());
  EXPECT_EQ(cancels["stop-run"], Worker::CancelOutcome::kStopping);
  EXPECT_NE(cancels["stop-next"], Worker::CancelOutcome::kNotFound);
  EXPECT_EQ(results["stop-run"].error_code(), "CANCELLED");
  EXPECT_EQ(results["stop-next"].error_code(), "CANCELLED");
  EXPECT_TRUE(results["stop-next"].png().empty());
  EXPECT_EQ(denoising.count("stop-next"), 0u);  // cancelled before its denoise began
  for (const auto& [id, png] : alone) {
    ASSERT_TRUE(results[id].ok()) << id << ": " << results[id].error();
    EXPECT_TRUE(results[id].png() == png) << id << ": differs from the same job run alone";
    EXPECT_EQ(results[id].packages().at("transformer"), "resident") << id;
  }
  EXPECT_EQ(metrics_->jobs_succeeded.Value(), 4);
  EXPECT_EQ(metrics_->jobs_cancelled.Value(), 2);
  EXPECT_TRUE(worker.idle());
}

// Batching on the real pipeline (the batch-2 packages of packages-batch): four compatible jobs
// run as two batches of two; one job is cancelled mid-batch. Every other job's PNG is exactly
// the one its batch gives when the pipeline runs the same pair directly (DenoiseDecodeBatch,
// nothing beside it), so no job is lost or mixed up, and the cancelled one's batch-mate runs on.
class BatchOverlapTest : public OverlapTest {};

TEST_P(BatchOverlapTest, BatchesGiveEachJobItsOwnImageAndACancelMidBatchLosesNoOther) {
  const std::vector<kiln::v1::JobSpec> specs = {
      Spec("a", "a lighthouse on a cliff at dusk", 7),
      Spec("stop", "a bowl of ramen", 5),
      Spec("c", "an owl reading a newspaper", 99),
      Spec("d", "a lighthouse on a cliff at dusk", 8),
  };
  // The pipeline's own batches of (a, stop) and (c, d): the reference bytes.
  std::map<std::string, std::string> reference;
  for (size_t first : {0u, 2u}) {
    std::vector<pipeline::EncodedPrompt> encoded;
    for (size_t i = first; i < first + 2; ++i) {
      auto plan = catalog_->Plan(specs[i]);
      ASSERT_TRUE(plan.ok()) << plan.status();
      auto e = pipeline_->EncodePrompt(plan->request);
      ASSERT_TRUE(e.ok()) << e.status();
      encoded.push_back(*std::move(e));
    }
    auto results = pipeline_->DenoiseDecodeBatch(std::move(encoded));
    for (size_t i = 0; i < 2; ++i) {
      ASSERT_TRUE(results[i].ok()) << results[i].status();
      EXPECT_EQ(results[i]->batch, 2);
      reference[specs[first + i].job_id()] =
          *pipeline::EncodePng(results[i]->rgb.data(), results[i]->width, results[i]->height);
    }
  }
  EXPECT_NE(reference["a"], reference["d"]);  // the seed matters: a mixed-up result would show

  // The wait is long: each batch forms as soon as its second job is encoded.
  Worker worker(*catalog_, *outbox_, *metrics_, clock_,
                WorkerOptions{/*max_batch=*/2, /*batch_wait_ms=*/10000});
  worker.Start();
  for (const auto& spec : specs) ASSERT_TRUE(worker.Enqueue(MakeJob(spec)));
  std::map<std::string, kiln::v1::JobResult> results;
  std::map<std::string, int> last_step;
  Worker::CancelOutcome cancel = Worker::CancelOutcome::kNotFound;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(300);
  while (results.size() < specs.size() && std::chrono::steady_clock::now() < deadline) {
    for (auto& env : outbox_->Drain()) {
      if (env.has_result()) {
        EXPECT_TRUE(results.emplace(env.result().job_id(), env.result()).second)
            << "two results for " << env.result().job_id();
        continue;
      }
      const auto& p = env.progress();
      if (p.phase() != "denoising") continue;
      last_step[p.job_id()] = static_cast<int>(p.step());
      if (p.job_id() == "stop" && p.step() == 1) cancel = worker.Cancel("stop");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ASSERT_EQ(results.size(), specs.size());
  EXPECT_EQ(cancel, Worker::CancelOutcome::kStopping);
  EXPECT_EQ(results["stop"].error_code(), "CANCELLED");
  EXPECT_THAT(results["stop"].error(), ::testing::HasSubstr("cancelled by the coordinator after step"));
  // Its batch-mate ran every step (that the cancelled job stops after the step it was in is
  // tests/pipeline/flux_pipeline_test.cc's, where the cancel comes from inside the step).
  EXPECT_EQ(last_step["a"], 4);
  for (const char* id : {"a", "c", "d"}) {
    ASSERT_TRUE(results[id].ok()) << id << ": " << results[id].error();
    EXPECT_TRUE(results[id].png() == reference[id]) << id << ": differs from its batch's image";
  }
  const auto h = metrics_->batch_size.Add({{"model", "tiny"}}, NodeMetrics::BatchBuckets())
                     .Collect().histogram;
  EXPECT_EQ(h.sample_count, 2u);  // two batches of two
  EXPECT_DOUBLE_EQ(h.sample_sum, 4);
  EXPECT_EQ(metrics_->jobs_succeeded.Value(), 3);
  EXPECT_EQ(metrics_->jobs_cancelled.Value(), 1);
  EXPECT_TRUE(worker.idle());
}

// LoRA switches on the overlapped node: base and LoRA jobs alternate, so each job's encoding,
// which merges its set ahead into new transformer weight tensors, runs beside the
// denoise of a job with the other set. Every job gives the bytes of the same job alone (one
// Generate() on the same pipeline): the base jobs the base image's (the merge ahead left the
// weights in use alone), the LoRA jobs the LoRA image.
class LoraOverlapTest : public OverlapTest {
 protected:
  void SetUp() override {
    if (!fs::exists(TestData() + "/" + GetParam().packages) || !kiln::testing::HavePython()) {
      GTEST_SKIP() << "run via scripts/test.sh (fixtures, KILN_PYTHON)";
    }
    const std::string loras = dir_.Join("loras");
    auto made = kiln::testing::RunPython(
        "pipeline/python/kiln/make_lora.py",
        {"make", "--model", TestData() + "/flux-tiny", "--out", loras, "--name", "style",
         "--layout", "peft", "--rank", "4", "--seed", "0"});
    ASSERT_TRUE(made.ok()) << made.status();
    lora_dirs_ = {loras};
    OverlapTest::SetUp();
  }
  kiln::testing::TempDir dir_;
};

TEST_P(LoraOverlapTest, AlternatingLoraJobsInFlightGiveTheirAloneBytes) {
  std::vector<kiln::v1::JobSpec> specs = {
      Spec("base-1", "a lighthouse on a cliff at dusk", 7),
      Spec("lora-1", "a lighthouse on a cliff at dusk", 7),
      Spec("base-2", "a red bicycle leaning on a wall", 123),
      Spec("lora-2", "an owl reading a newspaper", 99),
      Spec("base-3", "a lighthouse on a cliff at dusk", 7),
  };
  for (auto& spec : specs) {
    if (absl::StartsWith(spec.job_id(), "lora")) {
      auto* l = spec.add_loras();
      l->set_name("style");
      l->set_scale(0.8f);
    }
  }
  std::map<std::string, std::string> alone;
  for (const auto& spec : specs) {
    alone[spec.job_id()] = Alone(spec);
    ASSERT_FALSE(alone[spec.job_id()].empty());
  }
  EXPECT_NE(alone["base-1"], alone["lora-1"]);  // the LoRA changes the image
  EXPECT_EQ(alone["base-1"], alone["base-3"]);

  Worker worker(*catalog_, *outbox_, *metrics_, clock_);
  worker.Start();
  for (const auto& spec : specs) ASSERT_TRUE(worker.Enqueue(MakeJob(spec)));
  std::map<std::string, kiln::v1::JobResult> results;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(300);
  while (results.size() < specs.size() && std::chrono::steady_clock::now() < deadline) {
    for (auto& env : outbox_->Drain()) {
      if (env.has_result()) {
        EXPECT_TRUE(results.emplace(env.result().job_id(), env.result()).second)
            << "two results for " << env.result().job_id();
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ASSERT_EQ(results.size(), specs.size());
  for (const auto& [id, png] : alone) {
    ASSERT_TRUE(results[id].ok()) << id << ": " << results[id].error();
    EXPECT_TRUE(results[id].png() == png) << id << ": differs from the same job run alone";
  }
  // Alone() ran base, lora, base, lora, base: the node's first job switches nothing.
  EXPECT_EQ(metrics_->lora_switches.Value(), 4);
  // A job's encoding may start before the job ahead of it has swapped its set in, and then
  // leaves that pending set alone (FluxPipeline::EncodePrompt): at least the first switch, whose
  // encoding runs beside the first (base) job's denoise, is merged ahead.
  EXPECT_GE(metrics_->lora_prepare_seconds.Collect().histogram.sample_count, 1u);
  EXPECT_TRUE(worker.idle());
}

INSTANTIATE_TEST_SUITE_P(Lora, LoraOverlapTest,
                         ::testing::Values(Layout{"packages", "{}"},
                                           Layout{"packages-regional",
                                                  "{\"layout\":\"regional\"}"}),
                         [](const auto& info) {
                           return info.param.packages == "packages" ? "Whole" : "Regional";
                         });

INSTANTIATE_TEST_SUITE_P(Batch, BatchOverlapTest,
                         ::testing::Values(Layout{"packages-batch", "{}"}),
                         [](const auto&) { return "Whole"; });

INSTANTIATE_TEST_SUITE_P(Layouts, OverlapTest,
                         ::testing::Values(Layout{"packages", "{}"},
                                           Layout{"packages-regional", "{\"layout\":\"regional\"}"}),
                         [](const auto& info) {
                           return info.param.packages == "packages" ? "Whole" : "Regional";
                         });

}  // namespace
}  // namespace kiln::node
