// `kiln up`'s CURVE keys: what ProvisionClusterKeys / ProvisionNodeKey make under STATE/keys, that
// they are kept across restarts, what a node is started with, and the admin client side.
#include <stdlib.h>
#include <sys/stat.h>

#include <string>

#include "cli/local_cluster.h"
#include "common/curve_keys.h"
#include "common/files.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::cli {
namespace {

using ::testing::Contains;
using ::testing::Not;

std::string TempDir() {
  std::string dir = ::testing::TempDir() + "/kiln_keys_XXXXXX";
  EXPECT_NE(mkdtemp(dir.data()), nullptr);
  return dir;
}

int Mode(const std::string& path) {
  struct stat st;
  EXPECT_EQ(stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 0777;
}

TEST(ClusterKeys, ProvisionMakesPrivateKeysAndKeepsThem) {
  const std::string state_dir = TempDir();
  const KeyFiles keys(state_dir + "/keys");
  ASSERT_TRUE(ProvisionClusterKeys(keys).ok());
  ASSERT_TRUE(ProvisionNodeKey(keys, "node-1").ok());
  EXPECT_EQ(Mode(keys.dir), 0700);
  EXPECT_EQ(Mode(keys.coordinator_key()), 0600);
  EXPECT_EQ(Mode(keys.admin_key()), 0600);
  EXPECT_EQ(Mode(keys.node_key("node-1")), 0600);
  auto nodes = ReadCurveKeyList(keys.node_dir());
  ASSERT_TRUE(nodes.ok()) << nodes.status();
  EXPECT_EQ(nodes->size(), 1u);
  EXPECT_TRUE(ReadCurveKeyList(keys.client_dir())->empty());

  const std::string coordinator = ReadCurveKeyPair(keys.coordinator_key())->public_key;
  ASSERT_TRUE(ProvisionClusterKeys(keys).ok());  // a restart keeps the keys
  ASSERT_TRUE(ProvisionNodeKey(keys, "node-1").ok());
  EXPECT_EQ(ReadCurveKeyPair(keys.coordinator_key())->public_key, coordinator);
  EXPECT_EQ(ReadCurveKeyList(keys.node_dir())->size(), 1u);
  (void)RemoveTree(state_dir);
}

TEST(ClusterKeys, NodesAndClientsOfASecureClusterUseTheirKeys) {
  const std::string state_dir = TempDir();
  ClusterState state;
  state.state_dir = state_dir;
  state.keys_dir = state_dir + "/keys";
  state.coordinator.node_endpoint = "tcp://127.0.0.1:7701";
  state.models = {{"flux", "/m/flux"}};
  const KeyFiles keys(state.keys_dir);
  ASSERT_TRUE(ProvisionClusterKeys(keys).ok());
  NodeProcess node;
  node.node_id = "node-3";
  NodeLaunch launch = NodeLaunchFor("/bin", state, node);
  EXPECT_THAT(launch.argv, Contains("--key=" + keys.node_key("node-3")));
  EXPECT_THAT(launch.argv, Contains("--coordinator_key=" + keys.coordinator_pub()));
  EXPECT_THAT(launch.argv, Not(Contains("--insecure_plaintext")));
  auto admin = AdminCurveClient(state);
  ASSERT_TRUE(admin.ok()) << admin.status();
  EXPECT_TRUE(admin->enabled());
  EXPECT_EQ(admin->server_public_key, ReadCurvePublicKey(keys.coordinator_pub()).value());

  state.keys_dir.clear();  // kiln up --insecure-plaintext
  launch = NodeLaunchFor("/bin", state, node);
  EXPECT_THAT(launch.argv, Contains("--insecure_plaintext"));
  EXPECT_FALSE(AdminCurveClient(state)->enabled());
  (void)RemoveTree(state_dir);
}

}  // namespace
}  // namespace kiln::cli
