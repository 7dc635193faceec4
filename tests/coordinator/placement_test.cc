// Placement: package sets, warmth, capability, choice; the cost model and the node index.
#include "coordinator/placement.h"

#include <array>
#include <functional>
#include <vector>

#include "common/status.h"

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

TEST(PlacementTest, BatchKeyIsKindStepsAndLoraSetNotPromptSeedOrGuidance) {
  kiln::v1::JobSpec a = Spec("bf16");
  a.set_steps(28);
  kiln::v1::JobSpec b = a;
  b.set_prompt("another");
  b.set_seed(99);
  b.set_guidance(5);
  EXPECT_EQ(BatchKey(a), BatchKey(b));
  EXPECT_EQ(BatchKey(a), "flux-tiny/bf16/512x256|28|");
  for (auto edit : std::vector<std::function<void(kiln::v1::JobSpec&)>>{
           [](kiln::v1::JobSpec& s) { s.set_steps(20); },
           [](kiln::v1::JobSpec& s) { s.set_precision("fp8"); },
           [](kiln::v1::JobSpec& s) { s.set_width(256); },
           [](kiln::v1::JobSpec& s) { s.add_loras()->set_name("style"); }}) {
    kiln::v1::JobSpec c = a;
    edit(c);
    EXPECT_NE(BatchKey(c), BatchKey(a)) << c.ShortDebugString();
  }
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

TEST(PlacementTest, DescribeServedMergesNodesAndOrdersSizesByPixels) {
  kiln::v1::NodeInfo a = Node("a");
  (*a.mutable_package_sets())["flux-tiny/fp32/1024x1024"].add_digests("d");
  (*a.mutable_package_sets())["flux-tiny/fp32/512x512"].add_digests("d");
  kiln::v1::NodeInfo b = Node("b", "cuda");
  (*b.mutable_package_sets())["flux-tiny/bf16/256x256"].add_digests("d");
  (*b.mutable_package_sets())["flux-tiny/fp32/512x512"].add_digests("d");
  b.add_models("flux-dev");  // no set declared: any size
  EXPECT_EQ(DescribeServed({&a, &b}),
            "flux-dev at any precision and size; flux-tiny bf16 at 256x256; flux-tiny fp32 at "
            "512x512, 1024x1024");
  EXPECT_EQ(DescribeServed({}), "nothing");
}

TEST(PlacementTest, CheckAnyServesNamesWhatIsMissing) {
  kiln::v1::NodeInfo a = Node("a");
  (*a.mutable_package_sets())["flux-tiny/fp32/512x256"].add_digests("d");
  EXPECT_TRUE(CheckAnyServes({&a}, Spec("fp32")).ok());
  EXPECT_TRUE(CheckAnyServes({&a}, Spec("")).ok());
  absl::Status s = CheckAnyServes({&a}, Spec("bf16"));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.message(),
            "no registered node serves precision bf16 at 512x256 for model flux-tiny; the "
            "cluster serves: flux-tiny fp32 at 512x256");
  EXPECT_EQ(CheckAnyServes({}, Spec("")).code(), absl::StatusCode::kFailedPrecondition);
  // Packages a node lacks and cannot compile may still arrive: it serves the job, though it
  // cannot run it now.
  kiln::v1::NodeInfo b = Node("b");
  b.set_can_compile(false);
  EXPECT_FALSE(CheckCapable(b, Spec("fp32")).ok());
  EXPECT_TRUE(CheckServes(b, Spec("fp32")).ok());
  EXPECT_TRUE(CheckAnyServes({&b}, Spec("fp32")).ok());
}

TEST(PlacementTest, CapabilityReasons) {
  auto cpu = Node("c");
  EXPECT_TRUE(CheckCapable(cpu, Spec("fp32")).ok());
  EXPECT_THAT(std::string(CheckCapable(cpu, Spec("fp8")).message()), HasSubstr("cannot run fp8"));
  auto s = Spec();
  s.set_model("flux-dev");
  EXPECT_EQ(CheckCapable(cpu, s).code(), absl::StatusCode::kFailedPrecondition);
  cpu.set_can_compile(false);
  // The message names the precision looked for: the job's "" is the node's default.
  EXPECT_EQ(CheckCapable(cpu, Spec()).message(),
            "c does not hold the packages for flux-tiny/fp32/512x256 and cannot compile or "
            "fetch them (no shared cache)");
  cpu.set_can_fetch(true);  // a shared tier it may fetch them from
  EXPECT_TRUE(CheckCapable(cpu, Spec()).ok());
  auto gpu = Node("g", "cuda");  // compute capability unknown: fp8 allowed
  EXPECT_TRUE(CheckCapable(gpu, Spec("fp8")).ok());
  gpu.mutable_device()->set_compute_capability("8.9");
  EXPECT_TRUE(CheckCapable(gpu, Spec("fp8")).ok());
  gpu.mutable_device()->set_compute_capability("8.6");
  EXPECT_FALSE(CheckCapable(gpu, Spec("fp8")).ok());
}

TEST(PlacementTest, ANodeThatCanFetchServesColdJobsWithoutCompiling) {
  // kiln up --no-compile with a shared cache: the node declares its fp32 set, holds nothing on
  // local disk, cannot compile, and can fetch. A job of precision "" is its to run.
  kiln::v1::NodeInfo n = Node("node-1");
  n.set_can_compile(false);
  auto& set = (*n.mutable_package_sets())["flux-tiny/fp32/512x256"];
  set.add_digests("d1");
  set.add_digests("d2");
  EXPECT_EQ(WarmthFor(n, Spec()), Warmth::kCold);
  EXPECT_EQ(NeededSetKey(n, Spec()), "flux-tiny/fp32/512x256");
  EXPECT_EQ(NeededSetKey(n, Spec("bf16")), "flux-tiny/bf16/512x256");
  absl::Status s = CheckCapable(n, Spec());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("for flux-tiny/fp32/512x256 and cannot"));
  n.set_can_fetch(true);
  EXPECT_TRUE(CheckCapable(n, Spec()).ok());
  EXPECT_TRUE(CheckCapable(n, Spec("fp32")).ok());
  EXPECT_EQ(ChooseNode({Candidate{&n}}, Spec()), 0);
  // Fetching does not widen what it serves: another size or precision is still refused.
  EXPECT_FALSE(CheckCapable(n, Spec("bf16")).ok());
  // The node index lists it for the kind, cold.
  NodeIndex index;
  index.Update(n);
  const auto& capable = index.Capable(PackageSetKey("flux-tiny", "", 512, 256), Spec());
  ASSERT_EQ(capable.size(), 1u);
  EXPECT_EQ(capable[0].warmth, Warmth::kCold);
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

// ---- Expected finish time

kiln::v1::JobResult Done(double run_seconds, double cold_seconds, const std::string& where) {
  kiln::v1::JobResult r;
  r.set_ok(true);
  r.set_run_seconds(run_seconds);
  r.mutable_cold_start()->set_total_seconds(cold_seconds);
  (*r.mutable_packages())["transformer"] = where;
  (*r.mutable_packages())["vae_decoder"] = "resident";
  return r;
}

kiln::v1::DeviceInfo Gpu(const std::string& name, uint32_t sms, const std::string& mig = "") {
  kiln::v1::DeviceInfo d;
  d.set_kind("cuda");
  d.set_name(name);
  d.set_sm_count(sms);
  d.set_mig_profile(mig);
  d.set_compute_capability("9.0");
  return d;
}

TEST(CostModelTest, TiersAndClasses) {
  EXPECT_EQ(ColdTierOfResult(Done(1, 0, "resident")), ColdTier::kResident);
  EXPECT_EQ(ColdTierOfResult(Done(1, 0, "shared")), ColdTier::kSharedStore);
  EXPECT_EQ(ColdTierOfResult(Done(1, 0, "compiled")), ColdTier::kCompile);
  EXPECT_STREQ(ColdTierName(ColdTier::kCompile), "compiled");
  EXPECT_EQ(DeviceClass(Gpu("H100", 132, "3g.40gb")), "H100 MIG 3g.40gb");
  EXPECT_EQ(DeviceClass(kiln::v1::DeviceInfo()), "cpu");
}

TEST(CostModelTest, PriorScalesWithPixelsStepsAndSms) {
  CostModelOptions o;
  o.prior_job_seconds = 0;
  CostModel costs(o);
  kiln::v1::JobSpec spec = Spec("bf16");
  spec.set_width(1000);
  spec.set_height(1000);
  spec.set_steps(10);
  const double full = costs.RunSeconds(Gpu("H100", 132), spec);
  EXPECT_NEAR(full, o.prior_step_seconds * 10, 1e-9);
  EXPECT_NEAR(costs.RunSeconds(Gpu("H100", 66, "3g.40gb"), spec), full * 132 / 66.0, 1e-9);
  spec.set_steps(20);
  EXPECT_NEAR(costs.RunSeconds(Gpu("H100", 132), spec), 2 * full, 1e-9);
  EXPECT_GT(costs.RunSeconds(kiln::v1::DeviceInfo(), spec), 100 * full);
}

// The placement scan's bound: no node's cold start of a tier is below MinColdStarts.
TEST(CostModelTest, MinColdStartsBoundsEveryNode) {
  CostModelOptions o;
  o.learning_rate = 1;
  CostModel costs(o);
  EXPECT_EQ(costs.MinColdStarts(), (std::array<double, 4>{0, o.prior_local_seconds,
                                                          o.prior_shared_seconds,
                                                          o.prior_compile_seconds}));
  kiln::v1::JobSpec spec = Spec("bf16");
  spec.set_steps(10);
  costs.Observe("n1", Gpu("H200", 132), spec, Done(12, 2, "shared"), 12);
  costs.Observe("n2", Gpu("H100", 132), spec, Done(400, 300, "compiled"), 400);
  const auto min = costs.MinColdStarts();
  EXPECT_EQ(min[static_cast<int>(ColdTier::kSharedStore)], 2);
  EXPECT_EQ(min[static_cast<int>(ColdTier::kCompile)], o.prior_compile_seconds);  // 300 > prior
  for (const char* node : {"n1", "n2", "n3"}) {
    for (const char* cls : {"H200", "H100", "cpu"}) {
      const auto cold = costs.ColdStarts(node, cls);
      for (int t = 0; t < 4; ++t) EXPECT_LE(min[t], cold[t]) << node << " " << cls << " " << t;
    }
  }
  costs.ForgetNode("n1");  // the class keeps its figure
  EXPECT_EQ(costs.MinColdStarts()[static_cast<int>(ColdTier::kSharedStore)], 2);
}

TEST(CostModelTest, LearnsRunTimePerStepAndColdStartPerNode) {
  CostModelOptions o;
  o.learning_rate = 0.5;
  CostModel costs(o);
  const auto h200 = Gpu("H200", 132);
  kiln::v1::JobSpec spec = Spec("bf16");
  spec.set_steps(10);
  // 12 s in all, 2 of them fetching from the shared store: 1 s per step once warm.
  costs.Observe("n1", h200, spec, Done(12, 2, "shared"), 12);
  EXPECT_NEAR(costs.RunSeconds(h200, spec), 10, 1e-9);
  spec.set_steps(20);
  EXPECT_NEAR(costs.RunSeconds(h200, spec), 20, 1e-9);
  costs.Observe("n1", h200, spec, Done(40, 0, "resident"), 40);  // 2 s per step: average 1.5
  EXPECT_NEAR(costs.RunSeconds(h200, spec), 30, 1e-9);
  EXPECT_NEAR(costs.ColdStartSeconds("n1", "H200", ColdTier::kSharedStore), 2, 1e-9);
  // Another node of the class: the class's figure; of another class: the prior.
  EXPECT_NEAR(costs.ColdStartSeconds("n2", "H200", ColdTier::kSharedStore), 2, 1e-9);
  EXPECT_NEAR(costs.ColdStartSeconds("n3", "H100", ColdTier::kSharedStore),
              o.prior_shared_seconds, 1e-9);
  EXPECT_EQ(costs.ColdStartSeconds("n1", "H200", ColdTier::kResident), 0);
  EXPECT_NEAR(costs.ColdStartSeconds("n1", "H200", ColdTier::kCompile), o.prior_compile_seconds,
              1e-9);
  const std::string key = PackageSetKey("flux-tiny", "bf16", 512, 256);
  EXPECT_TRUE(costs.InSharedStore(key));
  EXPECT_FALSE(costs.InSharedStore(PackageSetKey("flux-tiny", "fp8", 512, 256)));
  // A failed job teaches nothing.
  kiln::v1::JobResult failed = Done(1000, 0, "resident");
  failed.set_ok(false);
  costs.Observe("n1", h200, spec, failed, 1000);
  EXPECT_NEAR(costs.RunSeconds(h200, spec), 30, 1e-9);
}

TEST(CostModelTest, UnseenKindOnASeenClassIsCorrected) {
  CostModelOptions o;
  CostModel costs(o);
  const auto h100 = Gpu("H100", 132);
  kiln::v1::JobSpec a = Spec("bf16");
  a.set_steps(10);
  const double prior = costs.RunSeconds(h100, a);
  costs.Observe("n1", h100, a, Done(prior * 2, 0, "resident"), prior * 2);  // twice as slow
  kiln::v1::JobSpec b = a;
  b.set_width(1024);
  b.set_height(1024);
  CostModel fresh(o);
  EXPECT_NEAR(costs.RunSeconds(h100, b), 2 * fresh.RunSeconds(h100, b), 1e-6);
}

TEST(CostModelTest, OptionsNameTheBadField) {
  CostModelOptions o;
  o.learning_rate = 0;
  EXPECT_EQ(kiln::ErrorField(o.Validate()), "learning_rate");
  o = CostModelOptions();
  o.prior_compile_seconds = -1;
  EXPECT_EQ(kiln::ErrorField(o.Validate()), "prior_compile_seconds");
  EXPECT_TRUE(CostModelOptions().Validate().ok());
}

TEST(NodeIndexTest, KeepsCapableNodesPerKindAsNodesChange) {
  NodeIndex index;
  auto a = Node("a"), b = Node("b");
  b.set_can_compile(false);  // capable only where it holds the packages
  auto& set = (*b.mutable_package_sets())["flux-tiny/fp32/512x256"];
  set.add_digests("d1");
  index.Update(a);
  index.Update(b);
  const std::string key = PackageSetKey("flux-tiny", "fp32", 512, 256);
  auto ids = [&] {
    std::vector<std::string> out;
    for (const auto& e : index.Capable(key, Spec("fp32"))) {
      out.push_back(e.node_id + ":" + WarmthName(e.warmth));
    }
    return out;
  };
  EXPECT_THAT(ids(), ::testing::ElementsAre("a:cold"));
  b.add_loaded_packages("d1");
  index.Update(b);  // a kind already cached is kept up to date
  EXPECT_THAT(ids(), ::testing::ElementsAre("a:cold", "b:loaded"));
  a.clear_models();
  index.Update(a);
  EXPECT_THAT(ids(), ::testing::ElementsAre("b:loaded"));
  index.Remove("b");
  EXPECT_THAT(ids(), ::testing::IsEmpty());
  EXPECT_EQ(index.kinds(), 1u);
}

}  // namespace
}  // namespace kiln::coordinator
