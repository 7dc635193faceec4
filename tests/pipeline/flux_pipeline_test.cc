// FluxPipeline end to end on the flux-tiny fixtures (made by scripts/test.sh) with a provider
// that only reads the fixtures' package directory: provenance in the wire's words ("local", then
// "resident"), a job cancelled through its CancelToken stops after the step it was running and
// names it, the same pipeline then makes the fixture's image byte for byte, and a pipeline
// without a provider is refused. Batches (DenoiseDecodeBatch, on the batch-2 packages of
// $KILN_TESTDATA/packages-batch): each job's image equals the same job alone within one level
// of 255 on a few bytes (measured: 8 of 196,608 bytes differ, by 1), one job cancelled
// mid-batch leaves the other's image as alone, and jobs that cannot share a batch are refused.
#include "pipeline/flux_pipeline.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "cache/package_provider.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "pipeline/png.h"
#include "tests/pipeline/fixture_provider.h"
#include "tests/pipeline/test_support.h"

namespace kiln::pipeline {
namespace {
namespace fs = std::filesystem;
using kiln::testing::EnvOrEmpty;
using kiln::testing::FixtureProvider;
using ::testing::HasSubstr;

std::string TestData() { return EnvOrEmpty("KILN_TESTDATA"); }

PipelineOptions TinyOptions() {
  PipelineOptions o;
  o.model_dir = TestData() + "/flux-tiny";
  return o;
}

// The request scripts/test.sh made first.png with.
GenerateRequest FixtureRequest() {
  GenerateRequest r;
  r.prompt = "a lighthouse on a cliff at dusk";
  r.width = 256;
  r.height = 256;
  r.steps = 4;
  r.seed = 7;
  return r;
}

TEST(FluxPipelineTest, CancelStopsAfterTheStepThenTheSamePipelineMakesTheFixtureImage) {
  if (!fs::exists(TestData() + "/first.png")) GTEST_SKIP() << "run via scripts/test.sh (fixtures)";
  auto pipeline = FluxPipeline::Create(TinyOptions(), FixtureProvider());
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();

  CancelToken token;
  GenerateRequest request = FixtureRequest();
  request.cancel = &token;
  std::vector<std::string> events;
  auto cancelled = (*pipeline)->Generate(request, [&](const std::string& phase, int step, int) {
    events.push_back(phase + " " + std::to_string(step));
    if (phase == "denoising" && step == 2) token.Cancel();
  });
  EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kCancelled) << cancelled.status();
  EXPECT_EQ(cancelled.status().message(), "cancelled after step 2 of 4");
  EXPECT_EQ(events.back(), "denoising 2");  // no step after the cancel, no decoding

  token.Reset();
  auto result = (*pipeline)->Generate(request);
  ASSERT_TRUE(result.ok()) << result.status();
  for (const auto& [component, provenance] : result->packages) {
    EXPECT_EQ(provenance, "resident") << component;  // loaded by the cancelled call
  }
  auto png = EncodePng(result->rgb.data(), result->width, result->height);
  ASSERT_TRUE(png.ok()) << png.status();
  auto fixture = kiln::testing::ReadFileOrDie(TestData() + "/first.png");
  EXPECT_TRUE(*png == fixture) << "the image differs from the fixture's first.png";
}

TEST(FluxPipelineTest, PackagesFoundLocallyAreReportedAsLocal) {
  if (!fs::exists(TestData() + "/packages")) GTEST_SKIP() << "run via scripts/test.sh (fixtures)";
  auto pipeline = FluxPipeline::Create(TinyOptions(), FixtureProvider());
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();
  GenerateRequest request = FixtureRequest();
  request.steps = 1;
  auto result = (*pipeline)->Generate(request);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->packages.size(), 4u);
  for (const auto& [component, provenance] : result->packages) {
    EXPECT_EQ(provenance, "local") << component;
  }
  EXPECT_EQ(result->seconds.compile, 0);
  EXPECT_GT(result->weight_bytes, 0u);
}

// Batched jobs are not bit-exact against jobs alone on the CPU: the transformer's GEMMs over
// 2·S rows round differently from S rows. Measured on flux-tiny 256², 4 steps: at most 1 level
// of 255, on 8 of 196,608 bytes. The bound allows that and fails on any real mix-up (another
// seed, prompt or guidance changes most bytes by far more).
constexpr int kBatchMaxByteDiff = 1;
constexpr double kBatchMaxDifferingFraction = 1e-3;

void ExpectSameImage(const GenerateResult& batched, const GenerateResult& alone,
                     const std::string& what) {
  ASSERT_EQ(batched.rgb.size(), alone.rgb.size()) << what;
  int max_diff = 0;
  size_t differing = 0;
  for (size_t i = 0; i < alone.rgb.size(); ++i) {
    const int d = std::abs(int{batched.rgb[i]} - int{alone.rgb[i]});
    max_diff = std::max(max_diff, d);
    differing += d != 0;
  }
  EXPECT_LE(max_diff, kBatchMaxByteDiff) << what;
  EXPECT_LE(static_cast<double>(differing) / alone.rgb.size(), kBatchMaxDifferingFraction)
      << what << ": " << differing << " bytes differ";
}

// Two jobs of the fixture's bucket with their own prompt, seed and guidance.
std::vector<GenerateRequest> TwoJobs() {
  GenerateRequest a = FixtureRequest();
  GenerateRequest b = FixtureRequest();
  b.prompt = "a red fox in fresh snow";
  b.seed = 8;
  b.guidance = 5.0;
  return {a, b};
}

bool HaveBatchFixture() { return fs::exists(TestData() + "/packages-batch"); }

TEST(FluxPipelineTest, EachJobOfABatchEqualsTheSameJobAlone) {
  if (!HaveBatchFixture()) GTEST_SKIP() << "run via scripts/test.sh (fixtures)";
  auto pipeline = FluxPipeline::Create(TinyOptions(), FixtureProvider("packages-batch"));
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();
  const std::vector<GenerateRequest> jobs = TwoJobs();
  std::vector<GenerateResult> alone;
  std::vector<EncodedPrompt> encoded;
  for (const auto& job : jobs) {
    auto r = (*pipeline)->Generate(job);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->batch, 1);
    alone.push_back(*std::move(r));
    auto e = (*pipeline)->EncodePrompt(job);
    ASSERT_TRUE(e.ok()) << e.status();
    encoded.push_back(*std::move(e));
  }
  std::vector<std::vector<std::string>> events(2);
  auto batched = (*pipeline)->DenoiseDecodeBatch(
      std::move(encoded),
      {[&](const std::string& phase, int step, int) { events[0].push_back(phase + " " + std::to_string(step)); },
       [&](const std::string& phase, int step, int) { events[1].push_back(phase + " " + std::to_string(step)); }});
  ASSERT_EQ(batched.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(batched[i].ok()) << batched[i].status();
    EXPECT_EQ(batched[i]->batch, 2);
    EXPECT_EQ(batched[i]->packages.at("transformer"), "local");  // the batch-2 package, loaded now
    ExpectSameImage(*batched[i], alone[i], "job " + std::to_string(i));
    EXPECT_EQ(events[i].back(), "decoding 4");
  }
  // The two jobs differ: an image mixed up between them would not pass the bound above.
  size_t differ = 0;
  for (size_t i = 0; i < alone[0].rgb.size(); ++i) differ += alone[0].rgb[i] != alone[1].rgb[i];
  EXPECT_GT(differ, alone[0].rgb.size() / 2);
}

TEST(FluxPipelineTest, AJobCancelledMidBatchStopsAndTheOtherRunsOnAsAlone) {
  if (!HaveBatchFixture()) GTEST_SKIP() << "run via scripts/test.sh (fixtures)";
  auto pipeline = FluxPipeline::Create(TinyOptions(), FixtureProvider("packages-batch"));
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();
  std::vector<GenerateRequest> jobs = TwoJobs();
  auto alone = (*pipeline)->Generate(jobs[1]);
  ASSERT_TRUE(alone.ok()) << alone.status();
  CancelToken token;
  jobs[0].cancel = &token;
  std::vector<EncodedPrompt> encoded;
  for (const auto& job : jobs) {
    auto e = (*pipeline)->EncodePrompt(job);
    ASSERT_TRUE(e.ok()) << e.status();
    encoded.push_back(*std::move(e));
  }
  std::vector<std::string> cancelled_events;
  int other_steps = 0;
  auto batched = (*pipeline)->DenoiseDecodeBatch(
      std::move(encoded),
      {[&](const std::string& phase, int step, int) {
         cancelled_events.push_back(phase + " " + std::to_string(step));
         if (phase == "denoising" && step == 2) token.Cancel();
       },
       [&](const std::string& phase, int step, int) {
         if (phase == "denoising") other_steps = step;
       }});
  ASSERT_EQ(batched.size(), 2u);
  EXPECT_EQ(batched[0].status().code(), absl::StatusCode::kCancelled) << batched[0].status();
  EXPECT_EQ(batched[0].status().message(), "cancelled after step 2 of 4");
  EXPECT_EQ(cancelled_events.back(), "denoising 2");  // no progress after its cancel
  ASSERT_TRUE(batched[1].ok()) << batched[1].status();
  EXPECT_EQ(other_steps, 4);
  ExpectSameImage(*batched[1], *alone, "the job left running");
}

TEST(FluxPipelineTest, JobsThatCannotShareABatchAreRefused) {
  if (!fs::exists(TestData() + "/packages")) GTEST_SKIP() << "run via scripts/test.sh (fixtures)";
  auto pipeline = FluxPipeline::Create(TinyOptions(), FixtureProvider());
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();
  std::vector<GenerateRequest> jobs = TwoJobs();
  jobs[1].steps = 3;
  EXPECT_FALSE(BatchCompatible(jobs[0], jobs[1]));
  std::vector<EncodedPrompt> encoded;
  for (const auto& job : jobs) {
    auto e = (*pipeline)->EncodePrompt(job);
    ASSERT_TRUE(e.ok()) << e.status();
    encoded.push_back(*std::move(e));
  }
  auto batched = (*pipeline)->DenoiseDecodeBatch(std::move(encoded));
  ASSERT_EQ(batched.size(), 2u);
  for (const auto& r : batched) {
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr("not one batch"));
  }
  jobs[1].steps = jobs[0].steps;
  EXPECT_TRUE(BatchCompatible(jobs[0], jobs[1]));  // prompt, seed and guidance may differ
  jobs[1].loras = {{"style", 1.0}};
  EXPECT_FALSE(BatchCompatible(jobs[0], jobs[1]));
  jobs[1].loras.clear();
  jobs[1].width = 512;
  EXPECT_FALSE(BatchCompatible(jobs[0], jobs[1]));
}

TEST(FluxPipelineTest, AProviderIsRequired) {
  auto pipeline = FluxPipeline::Create(TinyOptions(), nullptr);
  EXPECT_EQ(pipeline.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(pipeline.status().message(), HasSubstr("provider"));
}

}  // namespace
}  // namespace kiln::pipeline
