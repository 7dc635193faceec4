// FluxPipeline end to end on the flux-tiny fixtures (made by scripts/test.sh) with a provider
// that only reads the fixtures' package directory: provenance in the wire's words ("local", then
// "resident"), a job cancelled through its CancelToken stops after the step it was running and
// names it, the same pipeline then makes the fixture's image byte for byte, and a pipeline
// without a provider is refused.
#include "pipeline/flux_pipeline.h"

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

TEST(FluxPipelineTest, AProviderIsRequired) {
  auto pipeline = FluxPipeline::Create(TinyOptions(), nullptr);
  EXPECT_EQ(pipeline.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(pipeline.status().message(), HasSubstr("provider"));
}

}  // namespace
}  // namespace kiln::pipeline
