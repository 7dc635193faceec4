// NodeAgent in-process against a ROUTER socket played by the test, serving a fake generator:
// registration contents, a job's progress and result, rejections, protocol errors answered and
// counted, re-registration when the coordinator says it does not know the node, graceful stop.
#include "node/node_agent.h"

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/wire.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "common/files.h"
#include "tests/node/node_test_support.h"

namespace kiln::node {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

class NodeAgentTest : public ::testing::Test {
 protected:
  NodeAgentTest() : router_(context_, zmq::socket_type::router) {
    router_.set(zmq::sockopt::router_handover, 1);
    router_.set(zmq::sockopt::linger, 0);
    router_.bind("tcp://127.0.0.1:*");
    endpoint_ = router_.get(zmq::sockopt::last_endpoint);
  }
  ~NodeAgentTest() override { agent_.reset(); }

  void StartAgent() {
    NodeOptions o;
    o.node_id = "node-x";
    o.coordinator = endpoint_;
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
    auto agent = NodeAgent::CreateWithCatalog(o, std::move(catalog), registry_);
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = *std::move(agent);
    ASSERT_TRUE(agent_->Start().ok());
  }

  // Next message from the node with body `body` (others are skipped; heartbeats are answered so
  // the node keeps the test's "coordinator" alive). nullopt after `timeout`.
  std::optional<kiln::v1::Envelope> Expect(kiln::v1::Envelope::BodyCase body,
                                           std::chrono::milliseconds timeout =
                                               std::chrono::seconds(10)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      zmq::pollitem_t item{router_.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, std::chrono::milliseconds(20));
      if (!(item.revents & ZMQ_POLLIN)) continue;
      std::vector<zmq::message_t> frames;
      (void)zmq::recv_multipart(router_, std::back_inserter(frames));
      EXPECT_EQ(frames.size(), 2u);
      EXPECT_EQ(frames[0].to_string(), "node-x");
      auto env = Decode(frames.back().to_string_view());
      EXPECT_TRUE(env.ok()) << env.status();
      if (!env.ok()) continue;
      if (env->has_heartbeat()) {
        kiln::v1::Envelope hb;
        hb.mutable_heartbeat();
        Send(hb);
      }
      if (env->body_case() == body) return *env;
    }
    return std::nullopt;
  }

  void Send(const kiln::v1::Envelope& env) { SendRaw(Encode(env)); }
  void SendRaw(const std::string& bytes) {
    router_.send(zmq::buffer(std::string("node-x")), zmq::send_flags::sndmore);
    router_.send(zmq::buffer(bytes));
  }

  void Ack() {
    kiln::v1::Envelope ack;
    ack.mutable_register_ack()->set_heartbeat_interval_ms(100);
    Send(ack);
  }

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

  zmq::context_t context_;
  zmq::socket_t router_;
  std::string endpoint_;
  prometheus::Registry registry_;
  testing::FakeGenerator* gen_ = nullptr;
  std::unique_ptr<NodeAgent> agent_;
};

TEST_F(NodeAgentTest, RegistersRunsJobsAndStopsGracefully) {
  StartAgent();
  auto reg = Expect(kiln::v1::Envelope::kRegisterNode);
  ASSERT_TRUE(reg);
  const auto& info = reg->register_node().info();
  EXPECT_EQ(info.node_id(), "node-x");
  EXPECT_EQ(info.device().name(), "test cpu");
  EXPECT_THAT(info.models(), ElementsAre("tiny"));
  EXPECT_TRUE(info.can_compile());
  EXPECT_EQ(info.metrics_url(), "http://127.0.0.1:1/metrics");
  EXPECT_GT(info.pid(), 0u);
  EXPECT_FALSE(info.hostname().empty());
  ASSERT_EQ(info.package_sets().count("tiny/fp32/64x32"), 1u);
  EXPECT_THAT(info.package_sets().at("tiny/fp32/64x32").digests(),
              ElementsAre("m-te-64x32", "m-dit-64x32"));
  EXPECT_FALSE(agent_->registered_once());
  Ack();
  ASSERT_TRUE(Expect(kiln::v1::Envelope::kHeartbeat));
  EXPECT_TRUE(agent_->registered_once());

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

  Assign("j2", 2, "nope");
  r = Result("j2");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error_code(), "INVALID_ARGUMENT");
  EXPECT_THAT(r->error(), HasSubstr("spec.model"));

  // A heartbeat after the job reports what is loaded.
  for (;;) {
    auto hb = Expect(kiln::v1::Envelope::kHeartbeat);
    ASSERT_TRUE(hb);
    if (hb->heartbeat().loaded_packages_size() == 1) break;
  }

  agent_->Stop();
  ASSERT_TRUE(Expect(kiln::v1::Envelope::kDeregister));
  agent_->Wait();
  EXPECT_TRUE(agent_->done());
  EXPECT_TRUE(agent_->status().ok()) << agent_->status();
}

TEST_F(NodeAgentTest, ProtocolErrorsAreAnsweredCountedAndSurvived) {
  StartAgent();
  ASSERT_TRUE(Expect(kiln::v1::Envelope::kRegisterNode));
  Ack();
  SendRaw("\x01\x02garbage");
  auto err = Expect(kiln::v1::Envelope::kError);
  ASSERT_TRUE(err);
  EXPECT_EQ(err->error().code(), "INVALID_ARGUMENT");
  kiln::v1::Envelope status;
  status.set_request_id("r-7");
  status.mutable_status()->set_job_id("x");
  Send(status);
  err = Expect(kiln::v1::Envelope::kError);
  ASSERT_TRUE(err);
  EXPECT_EQ(err->request_id(), "r-7");
  EXPECT_THAT(err->error().message(), HasSubstr("unexpected message 'status'"));
  // An ErrorReply from the coordinator is logged, never answered.
  Send(ErrorEnvelope(absl::InvalidArgumentError("whatever"), ""));
  EXPECT_FALSE(Expect(kiln::v1::Envelope::kError, std::chrono::milliseconds(300)));

  Assign("after", 1);
  auto r = Result("after");
  ASSERT_TRUE(r);
  EXPECT_TRUE(r->ok());
  const auto families = registry_.Collect();
  double errors = -1;
  for (const auto& f : families) {
    if (f.name == "kiln_protocol_errors_total") errors = f.metric.at(0).counter.value;
  }
  EXPECT_EQ(errors, 2);
}

TEST_F(NodeAgentTest, RegistersAgainWhenTheCoordinatorForgotIt) {
  StartAgent();
  ASSERT_TRUE(Expect(kiln::v1::Envelope::kRegisterNode));
  Ack();
  ASSERT_TRUE(Expect(kiln::v1::Envelope::kHeartbeat));
  Send(ErrorEnvelope(absl::FailedPreconditionError("node node-x is not registered; send "
                                                   "RegisterNode"),
                     ""));
  ASSERT_TRUE(Expect(kiln::v1::Envelope::kRegisterNode));
  Ack();
  ASSERT_TRUE(Expect(kiln::v1::Envelope::kHeartbeat));
}

TEST_F(NodeAgentTest, StopWithoutACoordinatorEndsAtOnce) {
  router_.close();  // nobody listens
  StartAgent();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const auto t0 = std::chrono::steady_clock::now();
  agent_->Stop();
  agent_->Wait();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  EXPECT_TRUE(agent_->status().ok());
  EXPECT_FALSE(agent_->registered_once());
}

TEST(NodeOptionsTest, ValidateNamesTheField) {
  NodeOptions o;
  o.node_id = "n";
  o.coordinator = "tcp://127.0.0.1:1";
  EXPECT_TRUE(o.Validate().ok()) << o.Validate();
  auto bad = [&](auto edit, const std::string& field) {
    NodeOptions c = o;
    edit(c);
    const auto s = c.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(std::string(s.message()), HasSubstr(field));
  };
  bad([](NodeOptions& c) { c.node_id = "bad id"; }, "node_id");
  bad([](NodeOptions& c) { c.coordinator = "127.0.0.1:7701"; }, "coordinator");
  bad([](NodeOptions& c) { c.device = "tpu"; }, "device");
  bad([](NodeOptions& c) { c.precision = "fp16"; }, "precision");
  bad([](NodeOptions& c) { c.precision = "fp8"; }, "fp8");
  bad([](NodeOptions& c) { c.precisions = {"bf16"}; }, "precision");
  bad([](NodeOptions& c) { c.resolutions.clear(); }, "resolutions");
  bad([](NodeOptions& c) { c.link.heartbeat_interval_ms = 0; }, "link.heartbeat_interval_ms");
  bad([](NodeOptions& c) { c.models["a/b"] = "/x"; }, "models");
}

TEST(ListPackageDigestsTest, OnlyPublishedPackages) {
  const std::string root = ::testing::TempDir() + "/list_digests";
  (void)kiln::RemoveTree(root);
  const std::string a(64, 'a'), b(64, 'b');
  std::filesystem::create_directories(root + "/" + a);
  std::ofstream(root + "/" + a + "/manifest.json") << "{}";
  std::filesystem::create_directories(root + "/" + b);  // no manifest: not a package
  std::filesystem::create_directories(root + "/.tmp-aaaaaaaaaaaa-1");
  std::filesystem::create_directories(root + "/quarantine");
  EXPECT_THAT(ListPackageDigests(root), ElementsAre(a));
  EXPECT_TRUE(ListPackageDigests(root + "/missing").empty());
}

}  // namespace
}  // namespace kiln::node
