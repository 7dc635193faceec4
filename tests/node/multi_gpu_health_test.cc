// A multi-GPU node (kiln-node --gpus; node/README.md "A multi-GPU node") whose rank group fails:
// two CPU ranks, threads of this process, with a group timeout of 1 s. Rank 0 stalls in its
// job's first progress event (before the job's header goes out) for longer than that, so the
// follower's wait for the header times out and the group is broken, as when a rank dies. The node
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

// The generator it wraps, except that the first progress event of its first job sleeps for
// `stall` (on rank 0's thread, inside the job).
class StallOnce : public Generator {
 public:
  StallOnce(Generator& inner, std::chrono::milliseconds stall) : inner_(inner), stall_(stall) {}
  absl::StatusOr<pipeline::GenerateResult> Generate(
      const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) override {
    return inner_.Generate(request, [&](const std::string& phase, int step, int total) {
      if (!stalled_.exchange(true)) std::this_thread::sleep_for(stall_);
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

TEST(MultiGpuHealthTest, AFailedCollectiveMakesTheNodeUnhealthyAndHandsItsJobsBack) {
  const std::string data = kiln::testing::EnvOrEmpty("KILN_TESTDATA");
  if (data.empty()) GTEST_SKIP() << "KILN_TESTDATA not set (ctest)";
  if (!fs::is_directory(data + "/packages-regional") || !fs::is_directory(data + "/packages-sp")) {
    GTEST_SKIP() << "needs packages-regional and packages-sp in " << data;
  }
  const std::string root = ::testing::TempDir() + "/multi_gpu_health_test";
  fs::remove_all(root);
  fs::create_directories(root + "/packages");
  for (const char* fixture : {"packages-sp", "packages-regional"}) {
    for (const auto& entry : fs::directory_iterator(data + "/" + fixture)) {
      fs::copy(entry.path(), root + "/packages/" + entry.path().filename().string(),
               fs::copy_options::recursive | fs::copy_options::skip_existing);
    }
  }
  cache::TieredProviderConfig config;
  config.local.root = root + "/packages";
  auto provider = cache::OpenTieredProvider(std::move(config), nullptr);
  ASSERT_TRUE(provider.ok()) << provider.status();

  testing::CoordinatorSocket coordinator("node-sp");
  NodeOptions options;
  options.node_id = "node-sp";
  options.coordinator = coordinator.endpoint();
  options.models = {{"flux-tiny", data + "/flux-tiny"}};
  options.resolutions = {{256, 256}};
  options.package_dir = root + "/node-packages";
  fs::create_directories(options.package_dir);
  options.allow_compile = false;
  options.gpus = {0, 1};
  options.group_timeout_seconds = 1;
  options.link.heartbeat_interval_ms = 100;

  auto ranks = CreateNodeCatalog(options, *std::move(provider));
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

}  // namespace
}  // namespace kiln::node
