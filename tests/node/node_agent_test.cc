// NodeAgent, the ZeroMQ adapter around NodeSession, in-process against a ROUTER socket played by
// the test, serving a fake generator: registration over the socket, a job's progress and result,
// an undecodable frame answered and counted, graceful stop with Deregister, and a stop with no
// coordinator listening. The protocol itself is tested without sockets in node_session_test.cc.
#include "node/node_agent.h"

#include <chrono>
#include <optional>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/wire.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/node/coordinator_socket.h"
#include "tests/node/node_test_support.h"

namespace kiln::node {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

class NodeAgentTest : public ::testing::Test {
 protected:
  ~NodeAgentTest() override { agent_.reset(); }

  void StartAgent() {
    NodeOptions o;
    o.node_id = "node-x";
    o.coordinator = coordinator_.endpoint();
    o.resolutions = {{64, 32}};
    o.package_dir = ::testing::TempDir() + "/node_agent_test_packages";
    o.metrics_url = "http://127.0.0.1:1/metrics";
    o.link.heartbeat_interval_ms = 100;
    o.device_info.set_kind("cpu");
    o.device_info.set_name("test cpu");
    auto catalog = std::make_unique<ModelCatalog>("fp32", o.resolutions);
    auto gen = std::make_unique<testing::FakeGenerator>();
    gen_ = gen.get();
    catalog->Add("tiny", "fp32", std::move(gen));
    auto agent = NodeAgent::Create(o, std::move(catalog), /*packages=*/nullptr, registry_);
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = *std::move(agent);
    ASSERT_TRUE(agent_->Start().ok());
  }

  // Next message from the node with body `body` (others are skipped; heartbeats are answered so
  // the node keeps the test's "coordinator" alive). nullopt after `timeout`.
  std::optional<kiln::v1::Envelope> Expect(kiln::v1::Envelope::BodyCase body,
                                           std::chrono::milliseconds timeout =
                                               std::chrono::seconds(10)) {
    return coordinator_.Expect(body, "", timeout);
  }
  void Send(const kiln::v1::Envelope& env) { coordinator_.Send(env); }
  void SendRaw(const std::string& bytes) { coordinator_.SendRaw(bytes); }
  void Ack() { coordinator_.Ack(); }

  void Assign(const std::string& id, int steps, const std::string& model = "tiny") {
    kiln::v1::Envelope env;
    auto* spec = env.mutable_assign()->mutable_spec();
    spec->set_job_id(id);
    spec->set_model(model);
    spec->set_prompt("p");
    spec->set_width(64);
    spec->set_height(32);
    spec->set_steps(steps);
    env.mutable_assign()->set_attempt(1);
    Send(env);
  }

  std::optional<kiln::v1::JobResult> Result(const std::string& id) {
    for (int i = 0; i < 100; ++i) {
      auto env = Expect(kiln::v1::Envelope::kResult);
      if (!env) return std::nullopt;
      if (env->result().job_id() == id) return env->result();
    }
    return std::nullopt;
  }

  testing::CoordinatorSocket coordinator_{"node-x"};
  prometheus::Registry registry_;
  testing::FakeGenerator* gen_ = nullptr;
  std::unique_ptr<NodeAgent> agent_;
};

TEST_F(NodeAgentTest, RegistersRunsAJobAnswersGarbageAndStopsGracefully) {
  StartAgent();
  auto reg = Expect(kiln::v1::Envelope::kRegisterNode);
  ASSERT_TRUE(reg);
  const auto& info = reg->register_node().info();
  EXPECT_EQ(info.node_id(), "node-x");
  EXPECT_EQ(info.device().name(), "test cpu");
  EXPECT_FALSE(info.hostname().empty());  // filled in by Create
  EXPECT_EQ(info.package_sets().count("tiny/fp32/64x32"), 1u);
  EXPECT_FALSE(agent_->registered_once());
  Ack();
  ASSERT_TRUE(Expect(kiln::v1::Envelope::kHeartbeat));
  EXPECT_TRUE(agent_->registered_once());

  // Not one decodable Envelope: answered over the socket and counted.
  SendRaw("\x01\x02garbage");
  auto err = Expect(kiln::v1::Envelope::kError);
  ASSERT_TRUE(err);
  EXPECT_EQ(err->error().code(), "INVALID_ARGUMENT");

  Assign("j1", 3);
  int denoising = 0;
  for (;;) {
    auto env = Expect(kiln::v1::Envelope::kProgress);
    ASSERT_TRUE(env);
    if (env->progress().phase() == "denoising") ++denoising;
    if (env->progress().phase() == "decoding") break;
  }
  EXPECT_EQ(denoising, 4);  // steps 0..3
  auto r = Result("j1");
  ASSERT_TRUE(r);
  EXPECT_TRUE(r->ok()) << r->error();
  EXPECT_EQ(r->png().substr(1, 3), "PNG");

  double errors = -1;
  for (const auto& f : registry_.Collect()) {
    if (f.name == "kiln_protocol_errors_total") errors = f.metric.at(0).counter.value;
  }
  EXPECT_EQ(errors, 1);

  agent_->Stop();
  ASSERT_TRUE(Expect(kiln::v1::Envelope::kDeregister));
  agent_->Wait();
  EXPECT_TRUE(agent_->done());
  EXPECT_TRUE(agent_->status().ok()) << agent_->status();
}

TEST_F(NodeAgentTest, StopWithoutACoordinatorEndsAtOnce) {
  coordinator_.Close();  // nobody listens
  StartAgent();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const auto t0 = std::chrono::steady_clock::now();
  agent_->Stop();
  agent_->Wait();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  EXPECT_TRUE(agent_->status().ok());
  EXPECT_FALSE(agent_->registered_once());
}

TEST_F(NodeAgentTest, CreateNeedsAModel) {
  NodeOptions o;
  o.node_id = "node-x";
  o.coordinator = coordinator_.endpoint();
  auto agent = NodeAgent::Create(o, std::make_unique<ModelCatalog>("fp32", o.resolutions),
                                 nullptr, registry_);
  EXPECT_EQ(agent.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(agent.status().message()), HasSubstr("models"));
}

}  // namespace
}  // namespace kiln::node
