// The node factory over the flux-tiny fixture ($KILN_TESTDATA/flux-tiny, made by scripts/test.sh;
// skipped without it): compile options reach the artifact keys the node advertises, and errors
// name the field or the model.
#include "node/node_factory.h"

#include <cstdlib>
#include <filesystem>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::node {
namespace {

using ::testing::HasSubstr;

class NodeFactoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* testdata = std::getenv("KILN_TESTDATA");
    model_ = testdata ? std::string(testdata) + "/flux-tiny" : "";
    if (model_.empty() || !std::filesystem::exists(model_ + "/model_index.json")) {
      GTEST_SKIP() << "needs the flux-tiny fixture in $KILN_TESTDATA (scripts/test.sh)";
    }
  }

  NodeOptions Options(const std::string& name) {
    NodeOptions o;
    o.node_id = "node-f";
    o.coordinator = "tcp://127.0.0.1:1";
    o.models = {{"flux-tiny", model_}};
    o.resolutions = {{256, 256}};
    o.package_dir = ::testing::TempDir() + "/node_factory_test_" + name;
    o.allow_compile = false;
    return o;
  }

  std::vector<std::string> Digests(NodeOptions o) {
    prometheus::Registry registry;
    auto agent = CreateNodeAgent(std::move(o), registry);
    EXPECT_TRUE(agent.ok()) << agent.status();
    if (!agent.ok()) return {};
    const auto& sets = (*agent)->package_sets();
    auto it = sets.find("flux-tiny/fp32/256x256");
    EXPECT_NE(it, sets.end());
    return it == sets.end() ? std::vector<std::string>{} : it->second;
  }

  std::string model_;
};

TEST_F(NodeFactoryTest, CompileOptionsArePartOfTheAdvertisedKeys) {
  const auto plain = Digests(Options("plain"));
  ASSERT_EQ(plain.size(), 4u);
  NodeOptions same = Options("same");
  same.compile_options = cache::DefaultCompileOptions();
  EXPECT_EQ(Digests(same), plain);
  NodeOptions other = Options("other");
  other.compile_options["max_autotune"] = true;
  const auto changed = Digests(other);
  ASSERT_EQ(changed.size(), 4u);
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_NE(changed[i], plain[i]) << i;
}

TEST_F(NodeFactoryTest, ErrorsNameTheFieldOrTheModel) {
  prometheus::Registry registry;
  NodeOptions none = Options("none");
  none.models.clear();
  auto agent = CreateNodeAgent(none, registry);
  EXPECT_EQ(agent.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(agent.status().message()), HasSubstr("models"));

  NodeOptions bad = Options("bad");
  bad.compile_options = "fast";
  agent = CreateNodeAgent(bad, registry);
  EXPECT_EQ(agent.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(agent.status().message()), HasSubstr("compile_options"));

  NodeOptions missing = Options("missing");
  missing.models = {{"ghost", ::testing::TempDir() + "/no_such_model"}};
  agent = CreateNodeAgent(missing, registry);
  EXPECT_FALSE(agent.ok());
  EXPECT_THAT(std::string(agent.status().message()), HasSubstr("model ghost"));
}

}  // namespace
}  // namespace kiln::node
