// Placement v1 as pure functions: package sets, warmth, capability, choice.
#include "coordinator/placement.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::coordinator {
namespace {

using ::testing::HasSubstr;

kiln::v1::NodeInfo Node(const std::string& id, const std::string& kind = "cpu") {
  kiln::v1::NodeInfo n;
  n.set_node_id(id);
  n.mutable_device()->set_kind(kind);
  n.add_models("flux-tiny");
  n.set_can_compile(true);
  return n;
}

kiln::v1::JobSpec Spec(const std::string& precision = "") {
  kiln::v1::JobSpec s;
  s.set_job_id("j");
  s.set_model("flux-tiny");
  s.set_width(512);
  s.set_height(256);
  s.set_precision(precision);
  return s;
}

TEST(PlacementTest, PackageSetKeyAndDefaults) {
  EXPECT_EQ(PackageSetKey("flux-tiny", "bf16", 512, 256), "flux-tiny/bf16/512x256");
  EXPECT_EQ(PackageSetKey("flux-tiny", "", 512, 256), "flux-tiny//512x256");
  EXPECT_EQ(DefaultPrecision(Node("a").device()), "fp32");
  EXPECT_EQ(DefaultPrecision(Node("a", "cuda").device()), "bf16");
}

TEST(PlacementTest, WarmthFromDeclaredSets) {
  auto n = Node("a", "cuda");
  EXPECT_EQ(WarmthFor(n, Spec("bf16")), Warmth::kCold);  // nothing declared
  auto& set = (*n.mutable_package_sets())["flux-tiny/bf16/512x256"];
  set.add_digests("t");
  set.add_digests("v");
  EXPECT_EQ(WarmthFor(n, Spec("bf16")), Warmth::kCold);  // declared, not held
  n.add_packages("t");
  EXPECT_EQ(WarmthFor(n, Spec("bf16")), Warmth::kCold);  // half held
  n.add_loaded_packages("v");
  EXPECT_EQ(WarmthFor(n, Spec("bf16")), Warmth::kLocalDisk);
  n.add_loaded_packages("t");
  EXPECT_EQ(WarmthFor(n, Spec("bf16")), Warmth::kLoaded);
  EXPECT_EQ(WarmthFor(n, Spec("")), Warmth::kLoaded);  // the only precision at that size
  EXPECT_EQ(WarmthFor(n, Spec("fp8")), Warmth::kCold);
  EXPECT_STREQ(WarmthName(Warmth::kLocalDisk), "local");
}

TEST(PlacementTest, ParsesKeysFromTheRight) {
  std::string model, precision, size;
  ASSERT_TRUE(ParsePackageSetKey("org/flux-dev/bf16/1024x1024", &model, &precision, &size));
  EXPECT_EQ(model, "org/flux-dev");
  EXPECT_EQ(precision, "bf16");
  EXPECT_EQ(size, "1024x1024");
  ASSERT_TRUE(ParsePackageSetKey("flux-tiny//256x256", &model, &precision, &size));
  EXPECT_EQ(precision, "");
  EXPECT_FALSE(ParsePackageSetKey("flux-tiny/256x256", &model, &precision, &size));
  EXPECT_FALSE(ParsePackageSetKey("/x/y", &model, &precision, &size));
}

TEST(PlacementTest, DeclaredSetsLimitSizesAndPrecisions) {
  auto n = Node("a", "cuda");
  EXPECT_TRUE(CheckCapable(n, Spec("bf16")).ok());  // declares nothing: anything goes
  (*n.mutable_package_sets())["flux-tiny/fp32/512x256"].add_digests("t");
  EXPECT_TRUE(CheckCapable(n, Spec("fp32")).ok());
  EXPECT_TRUE(CheckCapable(n, Spec("")).ok());
  EXPECT_THAT(std::string(CheckCapable(n, Spec("bf16")).message()),
              HasSubstr("a does not serve flux-tiny bf16 at 512x256 (it serves fp32 512x256)"));
  auto other_size = Spec("fp32");
  other_size.set_height(512);
  EXPECT_FALSE(CheckCapable(n, other_size).ok());
  // Sets for another model say nothing about this one.
  auto dev = Spec("bf16");
  dev.set_model("flux-dev");
  n.add_models("flux-dev");
  EXPECT_TRUE(CheckCapable(n, dev).ok());
}

TEST(PlacementTest, CapabilityReasons) {
  auto cpu = Node("c");
  EXPECT_TRUE(CheckCapable(cpu, Spec("fp32")).ok());
  EXPECT_THAT(std::string(CheckCapable(cpu, Spec("fp8")).message()), HasSubstr("cannot run fp8"));
  auto s = Spec();
  s.set_model("flux-dev");
  EXPECT_EQ(CheckCapable(cpu, s).code(), absl::StatusCode::kFailedPrecondition);
  cpu.set_can_compile(false);
  EXPECT_THAT(std::string(CheckCapable(cpu, Spec()).message()), HasSubstr("cannot compile"));
  auto gpu = Node("g", "cuda");  // compute capability unknown: fp8 allowed
  EXPECT_TRUE(CheckCapable(gpu, Spec("fp8")).ok());
  gpu.mutable_device()->set_compute_capability("8.9");
  EXPECT_TRUE(CheckCapable(gpu, Spec("fp8")).ok());
  gpu.mutable_device()->set_compute_capability("8.6");
  EXPECT_FALSE(CheckCapable(gpu, Spec("fp8")).ok());
}

TEST(PlacementTest, ChooseNodeOrder) {
  auto a = Node("a"), b = Node("b"), c = Node("c");
  c.clear_models();  // ineligible
  std::vector<Candidate> cands = {{&a, 1, 0}, {&b, 0, 0}, {&c, 0, 0}};
  EXPECT_EQ(ChooseNode(cands, Spec()), 1);  // least loaded
  cands[1].active_jobs = 1;
  cands[0].last_assigned_ms = 50;
  cands[1].last_assigned_ms = 10;
  EXPECT_EQ(ChooseNode(cands, Spec()), 1);  // idle longest
  cands[1].last_assigned_ms = 50;
  EXPECT_EQ(ChooseNode(cands, Spec()), 0);  // node id
  EXPECT_EQ(ChooseNode({{&c, 0, 0}}, Spec()), -1);
}

}  // namespace
}  // namespace kiln::coordinator
