// `kiln up --gpus`: which nodes a GPU list makes and what each node process is started with
// (its CUDA_VISIBLE_DEVICES and --device), without starting processes; and the option checks.
#include "cli/local_cluster.h"

#include <stdlib.h>

#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::cli {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;

// Options that pass every check but the GPU ones: a directory that looks like a model.
UpOptions GpuOptions(std::vector<std::string> gpus) {
  static const std::string model = [] {
    std::string dir = ::testing::TempDir() + "/kiln_gpus_model_XXXXXX";
    EXPECT_NE(mkdtemp(dir.data()), nullptr);
    std::ofstream(dir + "/model_index.json") << "{}\n";
    return dir;
  }();
  UpOptions o;
  o.models = {{"flux", model}};
  o.device = "cuda";
  o.gpus = std::move(gpus);
  return o;
}

absl::Status ValidateGpus(const UpOptions& o) { return o.Validate(); }

TEST(NodeLaunchFor, AGpuNodeSeesOnlyItsGpu) {
  ClusterState state;
  state.device = "cuda";
  state.coordinator.node_endpoint = "tcp://127.0.0.1:7701";
  state.models = {{"flux", "/m/flux"}};
  NodeProcess node;
  node.node_id = "node-2";
  node.gpu = "1";
  NodeLaunch launch = NodeLaunchFor("/bin", state, node);
  EXPECT_EQ(launch.argv[0], "/bin/kiln-node");
  EXPECT_THAT(launch.argv, Contains("--device=cuda:0"));
  EXPECT_THAT(launch.argv, Contains("--node_id=node-2"));
  ASSERT_EQ(launch.env.count("CUDA_VISIBLE_DEVICES"), 1u);
  EXPECT_EQ(launch.env.at("CUDA_VISIBLE_DEVICES"), "1");

  node.gpu = "MIG-4f1c2d3e-0000-1111-2222-333344445555";
  launch = NodeLaunchFor("/bin", state, node);
  EXPECT_EQ(launch.env.at("CUDA_VISIBLE_DEVICES"), node.gpu);
  EXPECT_THAT(launch.argv, Contains("--device=cuda:0"));
}

TEST(NodeLaunchFor, NodesWaitPassivelyUnlessTheOperatorSaysOtherwise) {
  ClusterState state;
  NodeProcess node;
  node.node_id = "node-1";
  unsetenv("OMP_WAIT_POLICY");
  NodeLaunch launch = NodeLaunchFor("/bin", state, node);
  ASSERT_EQ(launch.env.count("OMP_WAIT_POLICY"), 1u);
  EXPECT_EQ(launch.env.at("OMP_WAIT_POLICY"), "PASSIVE");
  setenv("OMP_WAIT_POLICY", "ACTIVE", 1);
  launch = NodeLaunchFor("/bin", state, node);
  EXPECT_EQ(launch.env.count("OMP_WAIT_POLICY"), 0u);  // inherited as it is
  unsetenv("OMP_WAIT_POLICY");
}

TEST(NodeLaunchFor, AdvertiseBindsEveryInterfaceAndPassesTheHost) {
  ClusterState state;
  NodeProcess node;
  node.node_id = "node-1";
  NodeLaunch launch = NodeLaunchFor("/bin", state, node);
  EXPECT_THAT(launch.argv, Contains("--metrics=127.0.0.1:0"));
  EXPECT_THAT(launch.argv, Not(Contains(HasSubstr("--advertise"))));
  state.advertise = "10.0.0.2";
  launch = NodeLaunchFor("/bin", state, node);
  EXPECT_THAT(launch.argv, Contains("--metrics=0.0.0.0:0"));
  EXPECT_THAT(launch.argv, Contains("--advertise=10.0.0.2"));

  UpOptions o = GpuOptions({});
  o.device = "cpu";
  o.advertise = "10.0.0.2";
  EXPECT_TRUE(o.Validate().ok()) << o.Validate();
  o.advertise = "tcp://10.0.0.2:5";
  EXPECT_EQ(o.Validate().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(o.Validate().message()), HasSubstr("advertise"));
}

TEST(NodeLaunchFor, ANodeWithoutGpuKeepsTheClusterDevice) {
  ClusterState state;
  state.device = "cuda:1";
  NodeProcess node;
  node.node_id = "node-1";
  NodeLaunch launch = NodeLaunchFor("/bin", state, node);
  EXPECT_THAT(launch.argv, Contains("--device=cuda:1"));
  EXPECT_EQ(launch.env.count("CUDA_VISIBLE_DEVICES"), 0u);
}

TEST(NodeLaunchFor, BatchingFlagsReachEveryNodeAndSurviveTheStateFile) {
  ClusterState state;
  NodeProcess node;
  node.node_id = "node-1";
  NodeLaunch launch = NodeLaunchFor("/bin", state, node);
  EXPECT_THAT(launch.argv, Not(Contains(HasSubstr("--max_batch"))));  // default: none
  state.max_batch = 2;
  state.batch_wait_ms = 250;
  auto back = ClusterState::FromJson(state.ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  launch = NodeLaunchFor("/bin", *back, node);
  EXPECT_THAT(launch.argv, Contains("--max_batch=2"));
  EXPECT_THAT(launch.argv, Contains("--batch_wait_ms=250"));
}

TEST(NodeLaunchFor, APrecisionListIsServedWithTheFirstAsDefault) {
  ClusterState state;
  state.precision = "bf16,fp8";
  NodeProcess node;
  node.node_id = "node-1";
  NodeLaunch launch = NodeLaunchFor("/bin", state, node);
  EXPECT_THAT(launch.argv, Contains("--precision=bf16"));
  EXPECT_THAT(launch.argv, Contains("--precisions=bf16,fp8"));

  state.precision = "fp32";
  launch = NodeLaunchFor("/bin", state, node);
  EXPECT_THAT(launch.argv, Contains("--precision=fp32"));
  for (const std::string& a : launch.argv) EXPECT_EQ(a.rfind("--precisions", 0), std::string::npos) << a;
}

TEST(UpOptionsGpus, OneNodePerDistinctGpuOnCuda) {
  EXPECT_TRUE(ValidateGpus(GpuOptions({"0", "1", "MIG-abc", "GPU-def"})).ok());
  UpOptions cpu = GpuOptions({"0"});
  cpu.device = "cpu";
  EXPECT_THAT(std::string(ValidateGpus(cpu).message()), HasSubstr("gpus: needs device cuda"));
  EXPECT_THAT(std::string(ValidateGpus(GpuOptions({"0", "0"})).message()),
              HasSubstr("gpus: 0 twice"));
  EXPECT_THAT(std::string(ValidateGpus(GpuOptions({"cuda:1"})).message()),
              HasSubstr("gpus: 'cuda:1'"));
  UpOptions mismatch = GpuOptions({"0", "1"});
  mismatch.nodes = 3;
  EXPECT_THAT(std::string(ValidateGpus(mismatch).message()), HasSubstr("nodes: 3 nodes for 2"));
  mismatch.nodes = 2;
  EXPECT_TRUE(ValidateGpus(mismatch).ok());
}

// `--gpus-per-node N`: N consecutive entries of --gpus make one node; on the cpu, N ranks.
TEST(UpOptionsGpus, NodesOverSeveralGpus) {
  UpOptions four = GpuOptions({"0", "1", "2", "3"});
  four.gpus_per_node = 2;
  ASSERT_TRUE(four.Validate().ok()) << four.Validate();
  EXPECT_EQ(four.NodeCount(), 2);
  EXPECT_EQ(four.NodeGpus(0), "0,1");
  EXPECT_EQ(four.NodeGpus(1), "2,3");
  four.gpus_per_node = 4;
  EXPECT_EQ(four.NodeCount(), 1);
  EXPECT_EQ(four.NodeGpus(0), "0,1,2,3");
  four.nodes = 2;
  EXPECT_THAT(std::string(four.Validate().message()),
              HasSubstr("nodes: 2 nodes for 4 GPUs (--gpus starts one node per 4 GPUs)"));

  UpOptions odd = GpuOptions({"0", "1", "2"});
  odd.gpus_per_node = 2;
  EXPECT_EQ(odd.Validate().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(odd.Validate().message()),
              HasSubstr("gpus: 3 GPUs do not make whole nodes of 2 (--gpus-per-node)"));
  UpOptions mig = GpuOptions({"MIG-abc", "MIG-def"});
  mig.gpus_per_node = 2;
  EXPECT_THAT(std::string(mig.Validate().message()), HasSubstr("gpus: MIG-abc is a MIG slice"));
  mig.gpus_per_node = 1;  // one node per slice, as before
  EXPECT_TRUE(mig.Validate().ok()) << mig.Validate();
  UpOptions bounds = GpuOptions({});
  bounds.gpus_per_node = 17;
  EXPECT_THAT(std::string(bounds.Validate().message()),
              HasSubstr("gpus_per_node: 17 is outside 1..16"));
  bounds.gpus_per_node = 2;  // cuda without naming the GPUs
  EXPECT_THAT(std::string(bounds.Validate().message()),
              HasSubstr("gpus_per_node: 2 GPUs per node needs --gpus naming them"));

  UpOptions cpu = GpuOptions({});
  cpu.device = "cpu";
  cpu.gpus_per_node = 2;
  cpu.nodes = 3;
  ASSERT_TRUE(cpu.Validate().ok()) << cpu.Validate();
  EXPECT_EQ(cpu.NodeCount(), 3);
  EXPECT_EQ(cpu.NodeGpus(0), "");
}

TEST(NodeLaunchFor, AMultiGpuNodeSeesItsGpusAndSpreadsEachJobOverThem) {
  ClusterState state;
  state.device = "cuda";
  state.gpus_per_node = 2;
  auto back = ClusterState::FromJson(state.ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->gpus_per_node, 2);
  NodeProcess node;
  node.node_id = "node-2";
  node.gpu = "2,3";
  NodeLaunch launch = NodeLaunchFor("/bin", *back, node);
  EXPECT_EQ(launch.env.at("CUDA_VISIBLE_DEVICES"), "2,3");
  EXPECT_THAT(launch.argv, Contains("--device=cuda"));
  EXPECT_THAT(launch.argv, Contains("--gpus=0,1"));
  EXPECT_THAT(launch.argv, Not(Contains("--device=cuda:0")));

  // CPU ranks: no GPU to hide, the cluster's device.
  state.device = "cpu";
  state.gpus_per_node = 4;
  node.gpu = "";
  launch = NodeLaunchFor("/bin", state, node);
  EXPECT_THAT(launch.argv, Contains("--device=cpu"));
  EXPECT_THAT(launch.argv, Contains("--gpus=0,1,2,3"));
  EXPECT_EQ(launch.env.count("CUDA_VISIBLE_DEVICES"), 0u);

  // One GPU per node: no --gpus, as before (an older cluster.json has no gpus_per_node).
  nlohmann::json old = state.ToJson();
  old.erase("gpus_per_node");
  back = ClusterState::FromJson(old);
  ASSERT_TRUE(back.ok()) << back.status();
  launch = NodeLaunchFor("/bin", *back, node);
  EXPECT_THAT(launch.argv, Not(Contains(HasSubstr("--gpus"))));
}

// `kiln add-node` in a cluster of `kiln up --device cuda --gpus 0,1,2,3 --gpus-per-node 2`.
ClusterState TwoGpuNodes() {
  ClusterState state;
  state.state_dir = "/s";
  state.device = "cuda";
  state.gpus_per_node = 2;
  for (const char* gpu : {"0,1", "2,3"}) {
    NodeProcess n;
    n.node_id = absl::StrCat("node-", state.nodes.size() + 1);
    n.gpu = gpu;
    state.nodes.push_back(n);
  }
  return state;
}

TEST(AddNodeGpus, ANewNodeNamesItsOwnGpusInAGpuCluster) {
  const ClusterState state = TwoGpuNodes();
  auto all_running = [](const NodeProcess&) { return true; };
  auto gpus = AddNodeGpus(state, "node-3", {"4", "5"}, all_running);
  ASSERT_TRUE(gpus.ok()) << gpus.status();
  EXPECT_EQ(*gpus, "4,5");
  // What it is started with: only its GPUs, spread over as cuda:0 and cuda:1.
  NodeProcess node;
  node.node_id = "node-3";
  node.gpu = *gpus;
  NodeLaunch launch = NodeLaunchFor("/bin", state, node);
  EXPECT_EQ(launch.env.at("CUDA_VISIBLE_DEVICES"), "4,5");
  EXPECT_THAT(launch.argv, Contains("--device=cuda"));
  EXPECT_THAT(launch.argv, Contains("--gpus=0,1"));

  // None named: refused (it would sit on GPUs 0 and 1 beside node-1).
  gpus = AddNodeGpus(state, "node-3", {}, all_running);
  EXPECT_EQ(gpus.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gpus.status().message(),
            "gpus: the cluster in /s gives each node its GPUs (kiln up --gpus; in use: 0,1 "
            "(node-1), 2,3 (node-2)); name the new node's 2 GPUs with --gpus, or it would share "
            "GPU 0 with another node");
  // A GPU a running node has.
  gpus = AddNodeGpus(state, "node-3", {"3", "4"}, all_running);
  EXPECT_EQ(gpus.status().message(), "gpus: GPU 3 is already given to node-2, which is running");
  // ... is free once that node has stopped.
  auto only_node_1 = [](const NodeProcess& n) { return n.node_id == "node-1"; };
  gpus = AddNodeGpus(state, "node-3", {"3", "2"}, only_node_1);
  ASSERT_TRUE(gpus.ok()) << gpus.status();
  EXPECT_EQ(*gpus, "3,2");
  // Not the cluster's GPUs per node, twice the same, not a GPU.
  EXPECT_EQ(AddNodeGpus(state, "node-3", {"4"}, all_running).status().message(),
            "gpus: 1 GPUs named; each node of this cluster has 2 GPUs (kiln up --gpus-per-node "
            "2)");
  EXPECT_EQ(AddNodeGpus(state, "node-3", {"4", "4"}, all_running).status().message(),
            "gpus: 4 twice");
  EXPECT_THAT(std::string(AddNodeGpus(state, "node-3", {"4", "x"}, all_running)
                              .status()
                              .message()),
              HasSubstr("'x' is neither a GPU index nor a GPU-/MIG- UUID"));
}

TEST(AddNodeGpus, ARestartedNodeKeepsItsGpusAndOtherClustersAreAsBefore) {
  const ClusterState state = TwoGpuNodes();
  // node-2 died; re-added under its id without --gpus it gets 2,3 again.
  auto only_node_1 = [](const NodeProcess& n) { return n.node_id == "node-1"; };
  auto gpus = AddNodeGpus(state, "node-2", {}, only_node_1);
  ASSERT_TRUE(gpus.ok()) << gpus.status();
  EXPECT_EQ(*gpus, "2,3");

  // A cluster without --gpus: none needed, as before; a cpu one takes none.
  ClusterState cpu;
  cpu.state_dir = "/c";
  NodeProcess n;
  n.node_id = "node-1";
  cpu.nodes.push_back(n);
  gpus = AddNodeGpus(cpu, "node-2", {}, only_node_1);
  ASSERT_TRUE(gpus.ok()) << gpus.status();
  EXPECT_EQ(*gpus, "");
  EXPECT_EQ(AddNodeGpus(cpu, "node-2", {"0"}, only_node_1).status().message(),
            "gpus: the cluster in /c runs on device cpu; --gpus needs a cuda cluster (kiln up "
            "--device cuda)");
  ClusterState cuda = cpu;  // kiln up --device cuda, no --gpus: a GPU may be named
  cuda.device = "cuda";
  gpus = AddNodeGpus(cuda, "node-2", {"1"}, only_node_1);
  ASSERT_TRUE(gpus.ok()) << gpus.status();
  EXPECT_EQ(*gpus, "1");
}

TEST(ClusterStateGpu, SurvivesTheStateFile) {
  ClusterState state;
  NodeProcess node;
  node.node_id = "node-1";
  node.gpu = "MIG-abc";
  state.nodes.push_back(node);
  auto back = ClusterState::FromJson(state.ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->nodes.size(), 1u);
  EXPECT_EQ(back->nodes[0].gpu, "MIG-abc");
}

}  // namespace
}  // namespace kiln::cli
