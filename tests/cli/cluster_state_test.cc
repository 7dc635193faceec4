// cluster.json: round trip, atomic replacement, and errors that name the bad field.
#include "cli/cluster_state.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::cli {
namespace {

using ::testing::HasSubstr;

std::string TempDir() {
  std::string tmpl = ::testing::TempDir() + "/kiln_cli_state_XXXXXX";
  char* dir = mkdtemp(tmpl.data());
  EXPECT_NE(dir, nullptr);
  return tmpl;
}

ClusterState Sample(const std::string& dir) {
  ClusterState s;
  s.state_dir = dir;
  s.shared_cache = dir + "/shared-cache";
  s.models = {{"flux-tiny", "/models/flux-tiny"}};
  s.compile_options = R"({"mode":"default"})";
  s.coordinator = {123, "tcp://127.0.0.1:4000", "tcp://127.0.0.1:4001",
                   "http://127.0.0.1:4002/metrics", dir + "/logs/coordinator.log"};
  NodeProcess n;
  n.node_id = "node-1";
  n.pid = 124;
  n.metrics_url = "http://127.0.0.1:4003/metrics";
  n.package_dir = dir + "/nodes/node-1/packages";
  s.nodes.push_back(n);
  s.redis_url = "redis://127.0.0.1:4005/0";
  s.advertise = "10.0.0.2";
  s.redis = {125, 4005, dir + "/redis", dir + "/logs/redis.log"};
  return s;
}

TEST(ClusterState, RoundTripsThroughTheFile) {
  const std::string dir = TempDir();
  ClusterState s = Sample(dir);
  ASSERT_TRUE(SaveClusterState(s).ok());
  auto back = LoadClusterState(dir);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToJson(), s.ToJson());
  EXPECT_EQ(back->coordinator.client_endpoint, "tcp://127.0.0.1:4000");
  ASSERT_EQ(back->nodes.size(), 1u);
  EXPECT_EQ(back->nodes[0].pid, 124);
  EXPECT_EQ(back->compile_options, R"({"mode":"default"})");  // added nodes get the same
  EXPECT_EQ(back->redis_url, "redis://127.0.0.1:4005/0");
  EXPECT_EQ(back->advertise, "10.0.0.2");
  EXPECT_EQ(back->redis.pid, 125);
  EXPECT_EQ(back->redis.port, 4005);
  // Scripts read the client endpoint at the top level.
  EXPECT_EQ(s.ToJson()["client_endpoint"], "tcp://127.0.0.1:4000");
  // No temporary file is left behind.
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    (void)e;
    ++files;
  }
  EXPECT_EQ(files, 1);
}

TEST(ClusterState, MissingFileIsNotFound) {
  EXPECT_TRUE(absl::IsNotFound(LoadClusterState(TempDir()).status()));
}

TEST(ClusterState, ErrorsNameTheField) {
  const std::string dir = TempDir();
  auto j = Sample(dir).ToJson();
  j["nodes"][0]["pid"] = "not a number";
  std::ofstream(ClusterFilePath(dir)) << j.dump();
  auto s = LoadClusterState(dir);
  EXPECT_TRUE(absl::IsInvalidArgument(s.status()));
  EXPECT_THAT(s.status().message(), HasSubstr("nodes[0].pid"));

  j = Sample(dir).ToJson();
  j["redis"]["port"] = "six";
  std::ofstream(ClusterFilePath(dir)) << j.dump();
  EXPECT_THAT(LoadClusterState(dir).status().message(), HasSubstr("redis.port"));

  std::ofstream(ClusterFilePath(dir)) << "{ not json";
  EXPECT_THAT(LoadClusterState(dir).status().message(), HasSubstr("not JSON"));

  j = Sample(dir).ToJson();
  j["version"] = 99;
  std::ofstream(ClusterFilePath(dir)) << j.dump();
  EXPECT_THAT(LoadClusterState(dir).status().message(), HasSubstr("version: 99"));
}

TEST(WriteFileAtomically, ReplacesWholeFiles) {
  const std::string path = TempDir() + "/x.bin";
  ASSERT_TRUE(WriteFileAtomically(path, std::string(100000, 'a')).ok());
  ASSERT_TRUE(WriteFileAtomically(path, "short").ok());
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "short");
  EXPECT_FALSE(WriteFileAtomically("/nonexistent-dir/x", "y").ok());
}

TEST(StateLock, SecondHolderTimesOut) {
  const std::string dir = TempDir();
  auto first = StateLock::Acquire(dir);
  ASSERT_TRUE(first.ok());
  // flock locks belong to the open file description, so a second open in this process
  // contends like another process would.
  auto second = StateLock::Acquire(dir, 200);
  EXPECT_TRUE(absl::IsDeadlineExceeded(second.status()));
  first->reset();
  EXPECT_TRUE(StateLock::Acquire(dir, 200).ok());
}

}  // namespace
}  // namespace kiln::cli
