// StatusBoard and the job metrics, socket-free: a real Coordinator with a FakeClock, an
// InMemoryJobStore (or a store that fails) and a private registry. Checks the service-discovery
// JSON, the status JSON and images, readiness (starting, ready, poll loop stuck, store down), the
// per-node busy gauges, and the labelled job histograms with their bounded label sets.
#include "coordinator/status_board.h"

#include <memory>
#include <optional>
#include <string>

#include "common/clock.h"
#include "coordinator/coordinator.h"
#include "coordinator/job_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "prometheus/registry.h"

namespace kiln::coordinator {
namespace {

using ::testing::HasSubstr;
using nlohmann::json;

// The in-memory store, whose reads can be made to fail (Redis down, say).
class FlakyStore : public InMemoryJobStore {
 public:
  absl::StatusOr<std::vector<kiln::v1::JobInfo>> List(kiln::v1::JobState state) const override {
    if (down) return absl::UnavailableError("connection refused");
    return InMemoryJobStore::List(state);
  }
  bool down = false;
};

std::optional<double> Value(prometheus::Registry& registry, const std::string& name,
                            const std::map<std::string, std::string>& want) {
  for (const auto& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const auto& m : family.metric) {
      std::map<std::string, std::string> have;
      for (const auto& l : m.label) have[l.name] = l.value;
      bool match = true;
      for (const auto& [k, v] : want) match = match && have.count(k) && have[k] == v;
      if (!match) continue;
      switch (family.type) {
        case prometheus::MetricType::Counter:
          return m.counter.value;
        case prometheus::MetricType::Histogram:
          return static_cast<double>(m.histogram.sample_count);
        default:
          return m.gauge.value;
      }
    }
  }
  return std::nullopt;
}

class StatusBoardTest : public ::testing::Test {
 protected:
  StatusBoardTest() : metrics_(registry_), board_(StatusBoardOptions{}, clock_, metrics_) {
    auto c = Coordinator::Create(CoordinatorOptions{}, store_, clock_, metrics_);
    EXPECT_TRUE(c.ok());
    coordinator_ = std::move(*c);
  }

  void Register(const std::string& id, const std::string& kind, const std::string& url,
                const std::string& mig = "") {
    kiln::v1::RegisterNode m;
    kiln::v1::NodeInfo& info = *m.mutable_info();
    info.set_node_id(id);
    info.mutable_device()->set_kind(kind);
    info.mutable_device()->set_name(kind == "cuda" ? "NVIDIA H100 80GB HBM3" : "Some CPU");
    info.mutable_device()->set_mig_profile(mig);
    info.mutable_device()->set_uuid(kind == "cuda" ? "MIG-1234" : "");
    if (kind == "cuda") info.mutable_device()->set_compute_capability("9.0");
    info.add_models("flux-tiny");
    info.set_can_compile(true);
    info.set_metrics_url(url);
    ASSERT_TRUE(coordinator_->RegisterNode(id, m).ok());
  }

  void Submit(const std::string& id, uint32_t side = 256, const std::string& precision = "",
              int32_t priority = 0) {
    kiln::v1::SubmitRequest r;
    kiln::v1::JobSpec& s = *r.mutable_spec();
    s.set_job_id(id);
    s.set_model("flux-tiny");
    s.set_prompt("a lighthouse");
    s.set_width(side);
    s.set_height(side);
    s.set_steps(4);
    s.set_precision(precision);
    s.set_priority(priority);
    ASSERT_TRUE(coordinator_->Submit(r).ok());
    coordinator_->TakeOutgoing();
  }

  void Finish(const std::string& node, const std::string& job, bool ok,
              const std::string& code = "INVALID_ARGUMENT") {
    kiln::v1::JobResult r;
    r.set_job_id(job);
    r.set_ok(ok);
    if (ok) {
      r.set_png(std::string("\x89PNG fake", 9));
      (*r.mutable_packages())["transformer"] = "compiled";
      (*r.mutable_packages())["vae_decoder"] = "shared";
      r.mutable_cold_start()->set_compile_seconds(2);
      r.mutable_cold_start()->set_total_seconds(3);
    } else {
      r.set_error_code(code);
      r.set_error("bad");
    }
    ASSERT_TRUE(coordinator_->Result(node, r).ok());
    coordinator_->TakeOutgoing();
  }

  json StatusJson() {
    auto r = board_.Status("/status/api");
    EXPECT_EQ(r.status, 200);
    return json::parse(r.body);
  }

  FakeClock clock_;
  prometheus::Registry registry_;
  CoordinatorMetrics metrics_;
  FlakyStore store_;
  std::unique_ptr<Coordinator> coordinator_;
  StatusBoard board_;
};

TEST_F(StatusBoardTest, ServiceDiscoveryListsLiveNodesWithTheirLabels) {
  Register("gpu-a", "cuda", "http://10.0.0.5:9401/metrics", "3g.40gb");
  Register("cpu-b", "cpu", "http://127.0.0.1:9402/metrics");
  Register("gone", "cpu", "http://127.0.0.1:9403/metrics");
  ASSERT_TRUE(coordinator_->Deregister("gone", {}).ok());
  board_.Refresh(*coordinator_, store_);
  auto r = board_.ServiceDiscovery();
  EXPECT_EQ(r.content_type, "application/json");
  json sd = json::parse(r.body);
  ASSERT_EQ(sd.size(), 2u) << r.body;
  EXPECT_EQ(sd[0]["targets"], json::array({"127.0.0.1:9402"}));  // nodes in id order
  EXPECT_EQ(sd[1]["targets"], json::array({"10.0.0.5:9401"}));
  EXPECT_EQ(sd[1]["labels"]["node"], "gpu-a");
  EXPECT_EQ(sd[1]["labels"]["device"], "NVIDIA H100 80GB HBM3");
  EXPECT_EQ(sd[1]["labels"]["device_kind"], "cuda");
  EXPECT_EQ(sd[1]["labels"]["mig_profile"], "3g.40gb");
  EXPECT_EQ(sd[1]["labels"]["gpu_uuid"], "MIG-1234");
  EXPECT_EQ(sd[1]["labels"]["__metrics_path__"], "/metrics");
}

TEST_F(StatusBoardTest, StatusJsonShowsNodesQueueAndRecentJobsWithImages) {
  Register("n1", "cpu", "http://127.0.0.1:9402/metrics");
  Submit("j1");
  Submit("j2");  // waits: n1 runs one job at a time
  board_.Refresh(*coordinator_, store_);
  json s = StatusJson();
  ASSERT_EQ(s["nodes"].size(), 1u);
  EXPECT_EQ(s["nodes"][0]["state"], "ready");
  EXPECT_EQ(s["nodes"][0]["running_jobs"], json::array({"j1"}));
  EXPECT_EQ(s["queue"]["depth"], 1);
  EXPECT_EQ(s["queue"]["jobs"][0]["job_id"], "j2");
  EXPECT_EQ(s["running"][0]["job_id"], "j1");
  EXPECT_EQ(s["running"][0]["state"], "running");
  EXPECT_EQ(*Value(registry_, "kiln_node_busy", {{"node", "n1"}}), 1);

  clock_.AdvanceMs(1500);
  Finish("n1", "j1", true);
  board_.Refresh(*coordinator_, store_);
  s = StatusJson();
  ASSERT_EQ(s["recent"].size(), 1u);
  EXPECT_EQ(s["recent"][0]["state"], "succeeded");
  EXPECT_EQ(s["recent"][0]["thumbnail"], "/status/jobs/j1.png");
  EXPECT_DOUBLE_EQ(s["recent"][0]["run_seconds"].get<double>(), 1.5);
  auto png = board_.Status("/status/jobs/j1.png");
  EXPECT_EQ(png.status, 200);
  EXPECT_EQ(png.content_type, "image/png");
  EXPECT_EQ(png.body, std::string("\x89PNG fake", 9));
  EXPECT_EQ(board_.Status("/status/jobs/nope.png").status, 404);
  auto page = board_.Status("/status/");
  EXPECT_EQ(page.content_type, "text/html; charset=utf-8");
  EXPECT_THAT(page.body, HasSubstr("/status/api"));
}

TEST_F(StatusBoardTest, ReadinessStartingReadyStuckAndStoreDown) {
  EXPECT_THAT(std::string(board_.Ready().message()), HasSubstr("starting"));
  board_.MaybeRefresh(*coordinator_, store_);
  EXPECT_TRUE(board_.Ready().ok());
  // The poll loop stops calling: after stale_after_ms the coordinator is not ready.
  clock_.AdvanceMs(StatusBoardOptions{}.stale_after_ms + 1);
  EXPECT_EQ(board_.Ready().code(), absl::StatusCode::kUnavailable);
  board_.MaybeRefresh(*coordinator_, store_);
  EXPECT_TRUE(board_.Ready().ok());
  // Refreshes are spaced by refresh_ms.
  store_.down = true;
  board_.MaybeRefresh(*coordinator_, store_);
  EXPECT_TRUE(board_.Ready().ok());
  clock_.AdvanceMs(StatusBoardOptions{}.refresh_ms);
  board_.MaybeRefresh(*coordinator_, store_);
  absl::Status s = board_.Ready();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(s.message()), HasSubstr("job store unreachable: connection refused"));
  EXPECT_EQ(StatusJson()["store"], "connection refused");
  store_.down = false;
  clock_.AdvanceMs(StatusBoardOptions{}.refresh_ms);
  board_.MaybeRefresh(*coordinator_, store_);
  EXPECT_TRUE(board_.Ready().ok());
}

TEST_F(StatusBoardTest, BusyGaugesFollowLiveNodes) {
  Register("n1", "cpu", "http://127.0.0.1:1/metrics");
  Register("n2", "cpu", "http://127.0.0.1:2/metrics");
  Submit("j1");
  board_.Refresh(*coordinator_, store_);
  const double busy1 = *Value(registry_, "kiln_node_busy", {{"node", "n1"}});
  const double busy2 = *Value(registry_, "kiln_node_busy", {{"node", "n2"}});
  EXPECT_EQ(busy1 + busy2, 1);
  ASSERT_TRUE(coordinator_->Deregister("n2", {}).ok());
  coordinator_->TakeOutgoing();
  board_.Refresh(*coordinator_, store_);
  EXPECT_FALSE(Value(registry_, "kiln_node_busy", {{"node", "n2"}}));
  EXPECT_TRUE(Value(registry_, "kiln_node_busy", {{"node", "n1"}}));
}

TEST_F(StatusBoardTest, ScalingSignalPerModelAndPrecision) {
  // Nothing registered: no series at all.
  board_.Refresh(*coordinator_, store_);
  EXPECT_FALSE(Value(registry_, "kiln_scaling_queued_jobs", {{"model", "flux-tiny"}}));

  Register("n1", "cpu", "http://127.0.0.1:1/metrics");
  const std::map<std::string, std::string> tiny = {{"model", "flux-tiny"},
                                                   {"precision", "default"}};
  auto with = [&](const std::string& state) {
    auto labels = tiny;
    labels["state"] = state;
    return labels;
  };
  board_.Refresh(*coordinator_, store_);
  EXPECT_EQ(*Value(registry_, "kiln_scaling_queued_jobs", tiny), 0);
  EXPECT_EQ(*Value(registry_, "kiln_scaling_nodes", with("ready")), 1);
  EXPECT_EQ(*Value(registry_, "kiln_scaling_nodes", with("busy")), 0);
  EXPECT_EQ(*Value(registry_, "kiln_scaling_wait_seconds", tiny), 0);

  // One job runs 2 s: the estimate of a queued job's wait follows the run time.
  Submit("j1");
  clock_.AdvanceMs(2000);
  Finish("n1", "j1", true);
  Submit("j2");  // runs on n1
  Submit("j3");  // queued
  Submit("j4");  // queued
  board_.Refresh(*coordinator_, store_);
  EXPECT_EQ(*Value(registry_, "kiln_scaling_queued_jobs", tiny), 2);
  EXPECT_EQ(*Value(registry_, "kiln_scaling_nodes", with("ready")), 1);
  EXPECT_EQ(*Value(registry_, "kiln_scaling_nodes", with("busy")), 1);
  // The next job waits for the running one and the two queued: 3 rounds of 2 s on one node.
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_scaling_wait_seconds", tiny), 6.0);

  // The node leaves: the model's series stay (jobs still queue) with no ready node.
  ASSERT_TRUE(coordinator_->Deregister("n1", {}).ok());
  coordinator_->TakeOutgoing();
  board_.Refresh(*coordinator_, store_);
  EXPECT_EQ(*Value(registry_, "kiln_scaling_queued_jobs", tiny), 3);  // j2 requeued
  EXPECT_EQ(*Value(registry_, "kiln_scaling_nodes", with("ready")), 0);
}

TEST_F(StatusBoardTest, JobMetricsCarryBoundedLabels) {
  Register("n1", "cuda", "http://127.0.0.1:1/metrics");
  Submit("big", 1008, "bf16", 5);
  clock_.AdvanceMs(2000);
  Finish("n1", "big", true);
  Submit("bad", 256, "", -1);
  Finish("n1", "bad", false, "INVALID_ARGUMENT");
  const std::map<std::string, std::string> labels = {
      {"model", "flux-tiny"}, {"precision", "bf16"}, {"resolution", "1024"}};
  EXPECT_EQ(*Value(registry_, "kiln_job_latency_seconds", labels), 1);
  EXPECT_EQ(*Value(registry_, "kiln_job_run_seconds", labels), 1);
  EXPECT_EQ(*Value(registry_, "kiln_job_queue_wait_seconds", {{"priority", "high"}}), 1);
  EXPECT_EQ(*Value(registry_, "kiln_job_queue_wait_seconds", {{"priority", "low"}}), 1);
  EXPECT_EQ(*Value(registry_, "kiln_job_failures_total", {{"reason", "INVALID_ARGUMENT"}}), 1);
  EXPECT_EQ(*Value(registry_, "kiln_job_cold_start_seconds", {{"phase", "compile"}}), 1);
  EXPECT_EQ(*Value(registry_, "kiln_job_packages_total", {{"source", "compiled"}}), 1);
  EXPECT_EQ(*Value(registry_, "kiln_job_packages_total", {{"source", "shared"}}), 1);

  EXPECT_EQ(CoordinatorMetrics::ResolutionBucket(256, 256), "256");
  EXPECT_EQ(CoordinatorMetrics::ResolutionBucket(1024, 768), "1024");
  EXPECT_EQ(CoordinatorMetrics::ResolutionBucket(1040, 16), "1536");
  EXPECT_EQ(CoordinatorMetrics::ResolutionBucket(4096, 4096), "4096");
  EXPECT_EQ(CoordinatorMetrics::PrecisionLabel(""), "default");
  EXPECT_EQ(CoordinatorMetrics::PriorityLabel(0), "normal");
  EXPECT_EQ(CoordinatorMetrics::FailureReason("DEADLINE_EXCEEDED: too late"), "DEADLINE_EXCEEDED");
  EXPECT_EQ(CoordinatorMetrics::FailureReason("garbage"), "OTHER");
}

TEST_F(StatusBoardTest, ModelLabelsAreCapped) {
  kiln::v1::JobInfo job;
  job.set_state(kiln::v1::JOB_STATE_SUCCEEDED);
  job.mutable_spec()->set_width(256);
  job.mutable_spec()->set_height(256);
  for (size_t i = 0; i < CoordinatorMetrics::kMaxModelLabels + 5; ++i) {
    job.mutable_spec()->set_model("model-" + std::to_string(i));
    metrics_.ObserveFinished(job);
  }
  EXPECT_EQ(*Value(registry_, "kiln_job_latency_seconds", {{"model", "other"}}), 5);
  EXPECT_TRUE(Value(registry_, "kiln_job_latency_seconds", {{"model", "model-0"}}));
}

}  // namespace
}  // namespace kiln::coordinator
