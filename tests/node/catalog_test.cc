// JobSpec → GenerateRequest mapping and the field-specific errors a node answers bad jobs with.
#include "node/catalog.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/node/node_test_support.h"

namespace kiln::node {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

class CatalogTest : public ::testing::Test {
 protected:
  CatalogTest() : catalog_("fp32", {{256, 256}, {512, 512}, {768, 512}}) {
    auto fp32 = std::make_unique<testing::FakeGenerator>("tiny32");
    auto bf16 = std::make_unique<testing::FakeGenerator>("tiny16");
    tiny32_ = fp32.get();
    tiny16_ = bf16.get();
    catalog_.Add("flux-tiny", "fp32", std::move(fp32));
    catalog_.Add("flux-tiny", "bf16", std::move(bf16));
    catalog_.Add("flux-dev", "fp32", std::make_unique<testing::FakeGenerator>("dev"));
  }

  static kiln::v1::JobSpec Spec() {
    kiln::v1::JobSpec s;
    s.set_job_id("job-1");
    s.set_model("flux-tiny");
    s.set_prompt("a lighthouse");
    s.set_width(256);
    s.set_height(256);
    s.set_steps(4);
    s.set_seed(7);
    return s;
  }

  // The Plan() error for Spec() changed by `edit`.
  template <typename Edit>
  absl::Status Error(Edit edit) {
    auto s = Spec();
    edit(s);
    return catalog_.Plan(s).status();
  }

  ModelCatalog catalog_;
  testing::FakeGenerator* tiny32_;
  testing::FakeGenerator* tiny16_;
};

TEST_F(CatalogTest, MapsTheSpecAndAppliesDefaults) {
  auto spec = Spec();
  spec.set_guidance(0);  // 0 = the model default
  spec.set_seed(123456789012345ull);
  auto plan = catalog_.Plan(spec);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->generator, tiny32_);
  EXPECT_EQ(plan->model, "flux-tiny");
  EXPECT_EQ(plan->precision, "fp32");  // "" → the node default
  EXPECT_EQ(plan->request.prompt, "a lighthouse");
  EXPECT_EQ(plan->request.width, 256);
  EXPECT_EQ(plan->request.height, 256);
  EXPECT_EQ(plan->request.steps, 4);
  EXPECT_EQ(plan->request.seed, 123456789012345ull);
  EXPECT_DOUBLE_EQ(plan->request.guidance, 3.5);

  spec.set_guidance(7.25f);
  spec.set_precision("bf16");
  spec.set_width(768);
  spec.set_height(512);
  plan = catalog_.Plan(spec);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->generator, tiny16_);
  EXPECT_EQ(plan->precision, "bf16");
  EXPECT_DOUBLE_EQ(plan->request.guidance, 7.25);
  EXPECT_EQ(plan->request.width, 768);
}

TEST_F(CatalogTest, EveryBadFieldIsNamed) {
  struct Case {
    std::function<void(kiln::v1::JobSpec&)> edit;
    std::string field;
    std::string detail;
  };
  const std::vector<Case> cases = {
      {[](auto& s) { s.set_job_id(""); }, "spec.job_id", "1..128"},
      {[](auto& s) { s.set_job_id("has space"); }, "spec.job_id", "[A-Za-z0-9._:-]"},
      {[](auto& s) { s.set_job_id(std::string(129, 'x')); }, "spec.job_id", ""},
      {[](auto& s) { s.set_model("flux-pro"); }, "spec.model", "serves: flux-dev, flux-tiny"},
      {[](auto& s) { s.set_model("flux-dev"); s.set_precision("bf16"); }, "spec.precision",
       "serves: fp32"},
      {[](auto& s) { s.set_precision("fp64"); }, "spec.precision", "'fp64'"},
      {[](auto& s) { s.set_prompt(""); }, "spec.prompt", "empty"},
      {[](auto& s) { s.set_prompt(std::string(10001, 'a')); }, "spec.prompt", "10001 bytes"},
      {[](auto& s) { s.set_width(1024); s.set_height(1024); }, "spec.width", "256x256, 512x512"},
      {[](auto& s) { s.set_width(0); }, "spec.width", ""},
      {[](auto& s) { s.set_height(768); }, "spec.height", "256x768"},
      {[](auto& s) { s.set_steps(0); }, "spec.steps", "1..1000"},
      {[](auto& s) { s.set_steps(1001); }, "spec.steps", ""},
      {[](auto& s) { s.set_guidance(-0.5f); }, "spec.guidance", ""},
      {[](auto& s) { s.set_guidance(101); }, "spec.guidance", ""},
      {[](auto& s) { s.set_guidance(std::nanf("")); }, "spec.guidance", ""},
  };
  for (const auto& c : cases) {
    const absl::Status s = Error(c.edit);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(std::string(s.message()), StartsWith(c.field + ": "));
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.detail)) << s;
    EXPECT_EQ(ErrorField(s), c.field);
  }
}

TEST_F(CatalogTest, PackageSetsCoverEveryModelPrecisionAndResolution) {
  const auto sets = catalog_.PackageSets();
  EXPECT_EQ(sets.size(), 3u * 3u);
  ASSERT_TRUE(sets.count("flux-tiny/bf16/768x512"));
  EXPECT_EQ(sets.at("flux-tiny/bf16/768x512"),
            (std::vector<std::string>{"tiny16-te-768x512", "tiny16-dit-768x512"}));
  EXPECT_TRUE(sets.count("flux-dev/fp32/256x256"));
  EXPECT_FALSE(sets.count("flux-dev/bf16/256x256"));
  EXPECT_EQ(catalog_.models(), (std::vector<std::string>{"flux-dev", "flux-tiny"}));
  EXPECT_EQ(catalog_.generators().size(), 3u);
}

TEST(ErrorFieldTest, OnlyForSpecFieldErrors) {
  // The field travels as a payload of the status (kiln::FieldError), not parsed from the text.
  EXPECT_EQ(ErrorField(kiln::InvalidField("spec.width", "no")), "spec.width");
  EXPECT_EQ(ErrorField(absl::InvalidArgumentError("resolution 7x7: no")), "");
  EXPECT_EQ(ErrorField(absl::NotFoundError("spec.width: no")), "");
  EXPECT_EQ(ErrorField(absl::OkStatus()), "");
}

}  // namespace
}  // namespace kiln::node
