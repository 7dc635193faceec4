// ScalingSignal::Compute: which nodes serve a (model, precision), busy and idle, and the wait
// estimate from the run times of finished jobs. Plain protos, no coordinator.
#include "coordinator/scaling_signal.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kiln::coordinator {
namespace {

kiln::v1::NodeStatus Node(const std::string& id, const std::vector<std::string>& sets,
                          bool busy, kiln::v1::NodeState state = kiln::v1::NODE_STATE_READY) {
  kiln::v1::NodeStatus n;
  n.set_state(state);
  n.mutable_info()->set_node_id(id);
  n.mutable_info()->add_models("flux");
  for (const auto& key : sets) (*n.mutable_info()->mutable_package_sets())[key];
  if (busy) n.add_running_jobs("running-" + id);
  return n;
}

kiln::v1::JobSpec Job(const std::string& precision) {
  kiln::v1::JobSpec s;
  s.set_model("flux");
  s.set_precision(precision);
  return s;
}

const ScalingRow* Find(const std::vector<ScalingRow>& rows, const std::string& precision) {
  for (const auto& r : rows) {
    if (r.model == "flux" && r.precision == precision) return &r;
  }
  return nullptr;
}

TEST(ScalingSignalTest, CountsNodesThatServeEachPrecision) {
  kiln::v1::ListNodesReply nodes;
  *nodes.add_nodes() = Node("a", {"flux/bf16/1024x1024"}, /*busy=*/true);
  *nodes.add_nodes() = Node("b", {"flux/bf16/1024x1024", "flux/fp8/1024x1024"}, false);
  *nodes.add_nodes() = Node("c", {"flux/fp8/1024x1024"}, false, kiln::v1::NODE_STATE_DRAINING);
  ScalingSignal signal;
  const auto rows = signal.Compute(nodes, {Job("bf16"), Job("fp8"), Job("fp8"), Job("")});
  const ScalingRow* bf16 = Find(rows, "bf16");
  ASSERT_NE(bf16, nullptr);
  EXPECT_EQ(bf16->queued, 1);
  EXPECT_EQ(bf16->nodes_ready, 2);
  EXPECT_EQ(bf16->nodes_busy, 1);
  const ScalingRow* fp8 = Find(rows, "fp8");
  ASSERT_NE(fp8, nullptr);
  EXPECT_EQ(fp8->queued, 2);
  EXPECT_EQ(fp8->nodes_ready, 1);  // c drains: it takes no new job
  const ScalingRow* any = Find(rows, "default");
  ASSERT_NE(any, nullptr);
  EXPECT_EQ(any->queued, 1);
  EXPECT_EQ(any->nodes_ready, 2);
  EXPECT_EQ(Find(rows, "fp32"), nullptr);
}

TEST(ScalingSignalTest, WaitIsRoundsOfTheMeanRunTime) {
  kiln::v1::ListNodesReply nodes;
  *nodes.add_nodes() = Node("a", {"flux/fp32/256x256"}, true);
  *nodes.add_nodes() = Node("b", {"flux/fp32/256x256"}, false);
  ScalingSignal signal;
  // No run time known yet: 0.
  EXPECT_EQ(Find(signal.Compute(nodes, {Job("fp32")}), "fp32")->wait_seconds, 0);
  kiln::v1::JobInfo done;
  *done.mutable_spec() = Job("fp32");
  done.set_state(kiln::v1::JOB_STATE_SUCCEEDED);
  done.set_run_seconds(10);
  signal.ObserveFinished(done);
  done.set_run_seconds(20);
  signal.ObserveFinished(done);  // mean 10 + 0.2 × (20 − 10) = 12
  done.set_state(kiln::v1::JOB_STATE_FAILED);
  done.set_run_seconds(1000);
  signal.ObserveFinished(done);  // failures do not count
  // Nothing queued and b is idle: the next job starts at once.
  EXPECT_EQ(Find(signal.Compute(nodes, {}), "fp32")->wait_seconds, 0);
  // One queued takes b; the next waits a round: 1 + (1 − 1) / 2 = 1 round.
  EXPECT_DOUBLE_EQ(Find(signal.Compute(nodes, {Job("fp32")}), "fp32")->wait_seconds, 12);
  // Five queued, one idle: 1 + (5 − 1) / 2 = 3 rounds.
  std::vector<kiln::v1::JobSpec> five(5, Job("fp32"));
  EXPECT_DOUBLE_EQ(Find(signal.Compute(nodes, five), "fp32")->wait_seconds, 36);
  // No ready node: as if one came, 1 + 5 rounds.
  EXPECT_DOUBLE_EQ(Find(signal.Compute({}, five), "fp32")->wait_seconds, 72);
}

}  // namespace
}  // namespace kiln::coordinator
