// A multi-GPU node (kiln-node --gpus; node/README.md "A multi-GPU node") whose rank group fails:
// two CPU ranks, threads of this process, with a group timeout of 1 s. Rank 0 stalls in its
// job's first "denoising" event (on its own thread, between the job's header and the loop) for
// longer than that, so the follower's wait at the loop's start times out and the group is
// broken, as when a rank dies. The node
// then says so in its heartbeats (naming the group and the failure) before it answers the
// running job UNAVAILABLE (the coordinator requeues it elsewhere:
// tests/coordinator/coordinator_test.cc AMultiGpuNodeWhoseGroupFailedGetsNoJobsAndItsJobMovesOn),
// refuses the next job the same way, counts the failure once and is no longer ready.
//
// Fixtures (scripts/test.sh): packages-regional and packages-sp, copied into one package
// directory (the ranks' transformer set of 2 and the other components).
#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "node/node_agent.h"
#include "node/node_factory.h"
#include "tests/node/coordinator_socket.h"
#include "tests/pipeline/test_support.h"

namespace kiln::node {
namespace {
namespace fs = std::filesystem;
using ::testing::EndsWith;
using ::testing::HasSubstr;

constexpr char kGroupFailed[] = "sequence parallel group '0' of 2 ranks (cpu, cpu) failed: ";

// The generator it wraps, except that the first "denoising" event of its first job sleeps for
// `stall` (on rank 0's thread, before the loop).
class StallOnce : public Generator {
 public:
  StallOnce(Generator& inner, std::chrono::milliseconds stall) : inner_(inner), stall_(stall) {}
  absl::StatusOr<pipeline::GenerateResult> Generate(
      const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) override {
    return inner_.Generate(request, [&](const std::string& phase, int step, int total) {
      if (phase == "denoising" && !stalled_.exchange(true)) std::this_thread::sleep_for(stall_);
      if (progress) progress(phase, step, total);
    });
  }
  std::vector<std::string> DigestsFor(int width, int height) const override {
    return inner_.DigestsFor(width, height);
  }
  std::vector<std::string> LoadedDigests() const override { return inner_.LoadedDigests(); }
  absl::Status Health() const override { return inner_.Health(); }

 private:
  Generator& inner_;
  const std::chrono::milliseconds stall_;
  std::atomic<bool> stalled_{false};
};

double CounterValue(prometheus::Registry& registry, const std::string& name,
                    const std::map<std::string, std::string>& labels) {
  double total = 0;
  for (const auto& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const auto& m : family.metric) {
      std::map<std::string, std::string> got;
      for (const auto& l : m.label) got[l.name] = l.value;
      if (got == labels) total += m.counter.value;
    }
  }
  return total;
}

class MultiGpuHealthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    data_ = kiln::testing::EnvOrEmpty("KILN_TESTDATA");
    if (data_.empty()) GTEST_SKIP() << "KILN_TESTDATA not set (ctest)";
    if (!fs::is_directory(data_ + "/packages-regional") ||
        !fs::is_directory(data_ + "/packages-sp")) {
      GTEST_SKIP() << "needs packages-regional and packages-sp in " << data_;
    }
    root_ = ::testing::TempDir() + "/multi_gpu_health_test";
    fs::remove_all(root_);
    fs::create_directories(root_ + "/packages");
    for (const char* fixture : {"packages-sp", "packages-regional"}) {
      for (const auto& entry : fs::directory_iterator(data_ + "/" + fixture)) {
        fs::copy(entry.path(), root_ + "/packages/" + entry.path().filename().string(),
                 fs::copy_options::recursive | fs::copy_options::skip_existing);
      }
    }
  }
  // A node over 2 CPU ranks whose group times out after 1 s.
  NodeOptions Options(const std::string& coordinator) {
    NodeOptions options;
    options.node_id = "node-sp";
    options.coordinator = coordinator;
    options.models = {{"flux-tiny", data_ + "/flux-tiny"}};
    options.resolutions = {{256, 256}};
    options.package_dir = root_ + "/node-packages";
    fs::create_directories(options.package_dir);
    options.allow_compile = false;
    options.gpus = {0, 1};
    // The name packages-sp's all-to-alls resolve (the node would name its group
    // "flux-tiny/fp32", a set no fixture holds: multi_gpu_node_test.cc).
    options.compile_options["process_group"] = "0";
    options.group_timeout_seconds = 1;
    options.link.heartbeat_interval_ms = 100;
    return options;
  }
  absl::StatusOr<std::unique_ptr<ModelCatalog>> Ranks(const NodeOptions& options) {
    cache::TieredProviderConfig config;
    config.local.root = root_ + "/packages";
    auto provider = cache::OpenTieredProvider(std::move(config), nullptr);
    if (!provider.ok()) return provider.status();
    return CreateNodeCatalog(options, *std::move(provider));
  }

  std::string data_, root_;
};

TEST_F(MultiGpuHealthTest, AFailedCollectiveMakesTheNodeUnhealthyAndHandsItsJobsBack) {
  testing::CoordinatorSocket coordinator("node-sp");
  const NodeOptions options = Options(coordinator.endpoint());
  auto ranks = Ranks(options);
  ASSERT_TRUE(ranks.ok()) << ranks.status();
  auto catalog = std::make_unique<ModelCatalog>("fp32", options.resolutions);
  catalog->Add("flux-tiny", "fp32",
               std::make_unique<StallOnce>(*(*ranks)->GeneratorsByKey().at("flux-tiny/fp32"),
                                           std::chrono::milliseconds(2500)));
  prometheus::Registry registry;
  auto agent = NodeAgent::Create(options, std::move(catalog), nullptr, registry);
  ASSERT_TRUE(agent.ok()) << agent.status();
  ASSERT_TRUE((*agent)->Start().ok());

  auto assign = [&](const std::string& id) {
    kiln::v1::Envelope env;
    auto* spec = env.mutable_assign()->mutable_spec();
    spec->set_job_id(id);
    spec->set_model("flux-tiny");
    spec->set_prompt("a lighthouse on a cliff at dusk");
    spec->set_width(256);
    spec->set_height(256);
    spec->set_steps(2);
    spec->set_seed(7);
    env.mutable_assign()->set_attempt(1);
    coordinator.Send(env);
  };

  ASSERT_TRUE(coordinator.Expect(kiln::v1::Envelope::kRegisterNode));
  coordinator.Ack();
  ASSERT_TRUE(coordinator.Expect(kiln::v1::Envelope::kHeartbeat));
  EXPECT_EQ(coordinator.unhealthy(), "");
  EXPECT_TRUE((*agent)->health_status().ok());

  // The running job: handed back UNAVAILABLE, after a heartbeat that says why.
  assign("j1");
  auto failed = coordinator.Expect(kiln::v1::Envelope::kResult, "j1");
  ASSERT_TRUE(failed);
  EXPECT_FALSE(failed->result().ok());
  EXPECT_EQ(failed->result().error_code(), "UNAVAILABLE");
  EXPECT_THAT(failed->result().error(),
              HasSubstr(std::string("node node-sp: model flux-tiny (fp32): ") + kGroupFailed));
  EXPECT_THAT(failed->result().error(), EndsWith("; the job moves to another node"));
  const std::string reason = coordinator.unhealthy();  // the heartbeat before the result
  EXPECT_THAT(reason, HasSubstr(std::string("model flux-tiny (fp32): ") + kGroupFailed));
  EXPECT_THAT(reason, HasSubstr("collective"));
  EXPECT_THAT(reason, EndsWith("; restart the node"));
  std::cout << "[multi-gpu health] heartbeat: " << reason << std::endl;

  // The next job is refused at once, the same way; the node is not ready; one failure counted.
  assign("j2");
  auto refused = coordinator.Expect(kiln::v1::Envelope::kResult, "j2");
  ASSERT_TRUE(refused);
  EXPECT_EQ(refused->result().error_code(), "UNAVAILABLE");
  EXPECT_THAT(refused->result().error(), HasSubstr(kGroupFailed));
  ASSERT_TRUE(coordinator.Expect(kiln::v1::Envelope::kHeartbeat));
  EXPECT_THAT(coordinator.unhealthy(), HasSubstr(kGroupFailed));
  EXPECT_EQ((*agent)->health_status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(CounterValue(registry, "kiln_node_rank_group_failures_total",
                         {{"model", "flux-tiny"}, {"precision", "fp32"}}),
            1);

  (*agent)->Stop();
  (*agent)->Wait();
  EXPECT_TRUE((*agent)->status().ok()) << (*agent)->status();
}

// The worker encodes the next job (EncodePrompt, on its encode thread with rank 0's pipeline)
// beside the current one's loop (DenoiseDecode, on rank 0's thread), which keeps the followers
// alive meanwhile: an encode longer than the group's timeout no longer breaks the group (when
// rank 0 encoded inside its job, the followers timed out waiting for its header), and two jobs
// overlapped this way make the images each makes alone.
TEST_F(MultiGpuHealthTest, TheNextJobIsEncodedBesideTheLoopAndMayOutlastTheTimeout) {
  const NodeOptions options = Options("tcp://127.0.0.1:1");
  auto ranks = Ranks(options);
  ASSERT_TRUE(ranks.ok()) << ranks.status();
  Generator& gen = *(*ranks)->GeneratorsByKey().at("flux-tiny/fp32");
  auto request = [&](uint64_t seed) {
    kiln::v1::JobSpec spec;
    spec.set_job_id("j");
    spec.set_model("flux-tiny");
    spec.set_prompt("a lighthouse on a cliff at dusk");
    spec.set_width(256);
    spec.set_height(256);
    spec.set_steps(2);
    spec.set_seed(seed);
    auto plan = (*ranks)->Plan(spec);
    EXPECT_TRUE(plan.ok()) << plan.status();
    return plan->request;
  };
  // An encode that takes 1.5 s more (its text-encoding event stalls), longer than the group's
  // timeout.
  const pipeline::ProgressFn slow = [](const std::string& phase, int, int) {
    if (phase == "text_encoding") std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  };
  auto encoded = gen.EncodePrompt(request(7), slow);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_TRUE(gen.Health().ok()) << gen.Health();
  auto want = gen.DenoiseDecode(*std::move(encoded), slow);
  ASSERT_TRUE(want.ok()) << want.status();

  // Job 8 encoded while job 7 denoises (the worker's two stages): each is its own image.
  auto want_eight = gen.Generate(request(8), nullptr);  // encoded on this thread, too
  ASSERT_TRUE(want_eight.ok()) << want_eight.status();
  ASSERT_NE(want_eight->rgb, want->rgb);
  auto seven_encoded = gen.EncodePrompt(request(7), nullptr);
  ASSERT_TRUE(seven_encoded.ok()) << seven_encoded.status();
  std::optional<absl::StatusOr<pipeline::GenerateResult>> seven;
  std::thread denoise([&] { seven = gen.DenoiseDecode(*std::move(seven_encoded), nullptr); });
  auto eight_encoded = gen.EncodePrompt(request(8), nullptr);
  denoise.join();
  ASSERT_TRUE(eight_encoded.ok()) << eight_encoded.status();
  auto eight = gen.DenoiseDecode(*std::move(eight_encoded), nullptr);
  ASSERT_TRUE(seven.has_value() && seven->ok());
  ASSERT_TRUE(eight.ok()) << eight.status();
  EXPECT_EQ((*seven)->rgb, want->rgb);
  EXPECT_EQ(eight->rgb, want_eight->rgb);
  EXPECT_TRUE(gen.Health().ok()) << gen.Health();
}

}  // namespace
}  // namespace kiln::node
