// common/job_spec.h: the spec's field checks, ids, precisions and device needs.
#include "common/job_spec.h"

#include <cmath>
#include <functional>
#include <limits>

#include "common/proto/kiln.pb.h"
#include "common/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

kiln::v1::JobSpec GoodSpec() {
  kiln::v1::JobSpec s;
  s.set_job_id("job-1");
  s.set_model("org/flux-tiny");
  s.set_prompt("a lighthouse at dusk");
  s.set_width(256);
  s.set_height(512);
  s.set_steps(4);
  s.set_guidance(3.5f);
  return s;
}

TEST(JobSpecTest, AGoodSpecPasses) {
  EXPECT_TRUE(ValidateJobSpec(GoodSpec()).ok()) << ValidateJobSpec(GoodSpec());
  auto s = GoodSpec();
  s.set_precision("fp8");
  s.set_guidance(0);  // 0: the model's default
  EXPECT_TRUE(ValidateJobSpec(s).ok());
}

TEST(JobSpecTest, EachBadFieldIsNamed) {
  struct Case {
    std::function<void(kiln::v1::JobSpec&)> edit;
    std::string field;
    std::string detail;
  };
  const std::vector<Case> cases = {
      {[](auto& s) { s.set_job_id(""); }, "spec.job_id", "must not be empty (1..128"},
      {[](auto& s) { s.set_job_id("a/b"); }, "spec.job_id", "byte 0x2f"},
      {[](auto& s) { s.set_model("a b"); }, "spec.model", "[A-Za-z0-9._:/-]"},
      {[](auto& s) { s.set_model(std::string(129, 'm')); }, "spec.model", "129 characters"},
      {[](auto& s) { s.set_prompt(""); }, "spec.prompt", "must not be empty"},
      {[](auto& s) { s.set_prompt("\xED\xA0\x80"); }, "spec.prompt", "UTF-8 at byte 0"},
      {[](auto& s) { s.set_width(0); }, "spec.width", "must be set"},
      {[](auto& s) { s.set_width(250); }, "spec.width", "250 is not a multiple of 16"},
      {[](auto& s) { s.set_height(4112); }, "spec.height", "4112 is more than 4096"},
      {[](auto& s) { s.set_steps(0); }, "spec.steps", "0 is not in 1..1000"},
      {[](auto& s) { s.set_guidance(std::numeric_limits<float>::infinity()); }, "spec.guidance",
       "not in 0..100"},
      {[](auto& s) { s.set_precision("fp16"); }, "spec.precision", "'fp16'"},
      {[](auto& s) { s.set_deadline_unix_ms(-1); }, "spec.deadline_unix_ms", "negative"},
      {[](auto& s) { s.add_loras()->set_name("a/b"); }, "spec.loras[0].name", "'/'"},
      {[](auto& s) { s.add_loras()->set_name(".hidden"); }, "spec.loras[0].name", "starts with '.'"},
      {[](auto& s) { s.add_loras()->set_name(""); }, "spec.loras[0].name", "1..128"},
      {[](auto& s) {
         s.add_loras()->set_name("a");
         auto* l = s.add_loras();
         l->set_name("b");
         l->set_scale(std::numeric_limits<float>::quiet_NaN());
       },
       "spec.loras[1].scale", "not in -100..100"},
      {[](auto& s) {
         s.add_loras()->set_name("a");
         s.add_loras()->set_name("a");
       },
       "spec.loras[1].name", "'a' is named twice"},
      {[](auto& s) {
         for (int i = 0; i < 9; ++i) s.add_loras()->set_name("l" + std::to_string(i));
       },
       "spec.loras", "9 LoRAs, more than 8"},
  };
  for (const auto& c : cases) {
    auto spec = GoodSpec();
    c.edit(spec);
    const absl::Status s = ValidateJobSpec(spec);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_EQ(ErrorField(s), c.field);
    EXPECT_THAT(std::string(s.message()), StartsWith(c.field + ": "));
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.detail)) << s;
  }
}

TEST(JobSpecTest, LoraChoicesKeysAndParsing) {
  auto spec = GoodSpec();
  auto* style = spec.add_loras();
  style->set_name("style");  // scale 0 on the wire: 1.0
  auto* ink = spec.add_loras();
  ink->set_name("ink");
  ink->set_scale(-0.3f);
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << ValidateJobSpec(spec);
  const std::vector<LoraChoice> loras = LorasOf(spec);
  ASSERT_EQ(loras.size(), 2u);
  EXPECT_EQ(loras[0].scale, 1.0);
  EXPECT_EQ(LoraSetKey(loras), "style@1,ink@-0.300000012");  // the float the wire carries
  EXPECT_EQ(LoraSetKey({}), "");
  // ParseLoraChoice gives the same key as the wire's float.
  auto parsed = ParseLoraChoice("--lora", "ink:-0.3");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(LoraSetKey({*parsed}), "ink@-0.300000012");
  EXPECT_EQ(ParseLoraChoice("--lora", "style")->scale, 1.0);
  EXPECT_THAT(std::string(ParseLoraChoice("--lora", "style:x").status().message()),
              HasSubstr("scale 'x' is not a number"));
  EXPECT_EQ(ErrorField(ParseLoraChoice("--lora", "a b:1").status()), "--lora");
}

TEST(JobSpecTest, LimitsComeFromTheCaller) {
  SpecLimits tight;
  tight.max_steps = 8;
  tight.max_image_side = 256;
  tight.max_prompt_bytes = 4;
  auto spec = GoodSpec();
  EXPECT_EQ(ErrorField(ValidateJobSpec(spec, tight)), "spec.prompt");
  spec.set_prompt("ok");
  EXPECT_EQ(ErrorField(ValidateJobSpec(spec, tight)), "spec.height");
  spec.set_height(256);
  spec.set_steps(9);
  EXPECT_EQ(ErrorField(ValidateJobSpec(spec, tight)), "spec.steps");
  spec.set_steps(8);
  EXPECT_TRUE(ValidateJobSpec(spec, tight).ok());
}

TEST(JobSpecTest, SingleFieldChecksTakeTheCallersFieldName) {
  EXPECT_EQ(ValidateImageSide("height", 250).message(), "height: 250 is not a multiple of 16");
  EXPECT_EQ(ValidateImageSide("width", -16).message(), "width: -16 is negative");
  EXPECT_EQ(ErrorField(ValidateSteps("steps", 1001)), "steps");
  EXPECT_EQ(ErrorField(ValidateGuidance("guidance", std::nan(""))), "guidance");
  EXPECT_TRUE(ValidateGuidance("guidance", 100).ok());
  EXPECT_TRUE(ValidatePrompt("prompt", "caf\xC3\xA9").ok());
}

TEST(JobSpecTest, IdsAndModelNames) {
  EXPECT_TRUE(ValidateId("node_id", "gpu-0.host:1_a").ok());
  EXPECT_FALSE(ValidateId("node_id", "a/b").ok());
  EXPECT_TRUE(ValidateModelName("model", "black-forest-labs/FLUX.1-dev").ok());
  EXPECT_TRUE(ValidateId("id", std::string(kMaxIdChars, 'x')).ok());
  EXPECT_EQ(ErrorField(ValidateId("register_node.info.node_id", "")),
            "register_node.info.node_id");
}

TEST(PrecisionTest, KnownPrecisions) {
  for (const auto& p : kPrecisions) EXPECT_TRUE(IsPrecision(p)) << p;
  EXPECT_FALSE(IsPrecision(""));
  EXPECT_FALSE(IsPrecision("fp16"));
  EXPECT_TRUE(ValidatePrecision("spec.precision", "", /*allow_default=*/true).ok());
  const absl::Status s = ValidatePrecision("precision", "");
  EXPECT_EQ(ErrorField(s), "precision");
  EXPECT_THAT(std::string(s.message()), HasSubstr("fp32, bf16, fp8"));
}

TEST(PrecisionTest, Fp8NeedsCudaSm89) {
  EXPECT_EQ(NeedsOf("fp8").min_compute_capability, 89);
  EXPECT_TRUE(NeedsOf("fp8").cuda);
  EXPECT_FALSE(NeedsOf("bf16").cuda);

  const DeviceCaps cpu = CapsOfDevice("cpu");
  EXPECT_FALSE(cpu.cuda);
  const absl::Status on_cpu = CheckDeviceRuns("fp8", cpu);
  EXPECT_EQ(on_cpu.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(on_cpu.message(), "fp8 needs a cuda device");
  EXPECT_TRUE(CheckDeviceRuns("fp32", cpu).ok());
  EXPECT_TRUE(CheckDeviceRuns("bf16", cpu).ok());

  EXPECT_TRUE(CheckDeviceRuns("fp8", CapsOfDevice("cuda")).ok());    // capability unknown
  EXPECT_TRUE(CheckDeviceRuns("fp8", CapsOfDevice("cuda:1")).ok());  // device index, not sm
  EXPECT_TRUE(CheckDeviceRuns("fp8", CapsOfDevice("cuda:sm_90")).ok());
  EXPECT_TRUE(CheckDeviceRuns("fp8", CapsOfDevice("cuda:sm_89")).ok());
  const absl::Status ampere = CheckDeviceRuns("fp8", CapsOfDevice("cuda:sm_80"));
  EXPECT_EQ(ampere.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ampere.message(), "fp8 needs compute capability 8.9 or newer, not 8.0");
  EXPECT_TRUE(CheckDeviceRuns("bf16", CapsOfDevice("cuda:sm_80")).ok());
}

TEST(PrecisionTest, ComputeCapabilityAndDefaults) {
  EXPECT_EQ(ParseComputeCapability("8.9"), 89);
  EXPECT_EQ(ParseComputeCapability("9.0"), 90);
  EXPECT_EQ(ParseComputeCapability(""), -1);
  EXPECT_EQ(ParseComputeCapability("9"), -1);
  EXPECT_EQ(ParseComputeCapability("x.y"), -1);
  EXPECT_EQ(DefaultPrecisionFor(CapsOfDevice("cpu")), "fp32");
  EXPECT_EQ(DefaultPrecisionFor(CapsOfDevice("cuda:0")), "bf16");
}

}  // namespace
}  // namespace kiln
