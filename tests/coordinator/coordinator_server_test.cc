// CoordinatorServer in process: real ZeroMQ sockets on loopback with ephemeral ports, a real
// Coordinator behind it. Clients are DEALER and REQ sockets; a node is a DEALER with an identity.
#include "coordinator/coordinator_server.h"

#include <unistd.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/wire.h"
#include "coordinator/job_store.h"
#include "coordinator/process_support.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "prometheus/registry.h"
#include "zmq.hpp"
#include "zmq_addon.hpp"

namespace kiln::coordinator {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto c = Coordinator::Create(CoordinatorOptions{}, store_, clock_, metrics_);
    ASSERT_TRUE(c.ok());
    coordinator_ = std::move(*c);
    CoordinatorServerOptions o;
    o.client_endpoint = "tcp://127.0.0.1:0";
    o.node_endpoint = "tcp://127.0.0.1:0";
    o.max_message_bytes = 1 << 20;
    auto s = CoordinatorServer::Start(o, *coordinator_, metrics_);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
  }
  void TearDown() override { server_.reset(); }

  zmq::socket_t Connect(zmq::socket_type type, const std::string& endpoint,
                        const std::string& identity = "") {
    zmq::socket_t s(context_, type);
    s.set(zmq::sockopt::linger, 0);
    if (!identity.empty()) s.set(zmq::sockopt::routing_id, identity);
    s.connect(endpoint);
    return s;
  }

  // The next message's frames, or nullopt after `timeout_ms`.
  std::optional<std::vector<std::string>> Receive(zmq::socket_t& s, int timeout_ms = 3000) {
    zmq_pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, std::chrono::milliseconds(timeout_ms)) == 0) return std::nullopt;
    std::vector<zmq::message_t> parts;
    if (!zmq::recv_multipart(s, std::back_inserter(parts))) return std::nullopt;
    std::vector<std::string> out;
    for (auto& p : parts) out.push_back(p.to_string());
    return out;
  }
  // The Envelope in the last frame of the next message.
  kiln::v1::Envelope ReceiveEnvelope(zmq::socket_t& s) {
    auto frames = Receive(s);
    EXPECT_TRUE(frames.has_value()) << "no reply";
    if (!frames) return {};
    auto env = kiln::Decode(frames->back());
    EXPECT_TRUE(env.ok()) << env.status();
    return env.ok() ? *env : kiln::v1::Envelope();
  }
  void SendFrames(zmq::socket_t& s, const std::vector<std::string>& frames) {
    std::vector<zmq::const_buffer> bufs;
    for (const auto& f : frames) bufs.push_back(zmq::buffer(f));
    ASSERT_TRUE(zmq::send_multipart(s, bufs));
  }
  double ProtocolErrors(const std::string& socket, const std::string& reason) {
    return metrics_.protocol_errors.Add({{"socket", socket}, {"reason", reason}}).Value();
  }

  SystemClock clock_;
  InMemoryJobStore store_;
  prometheus::Registry registry_;
  CoordinatorMetrics metrics_{registry_};
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<CoordinatorServer> server_;
  zmq::context_t context_;
};

kiln::v1::Envelope ListNodes(const std::string& request_id) {
  kiln::v1::Envelope env;
  env.set_request_id(request_id);
  env.mutable_list_nodes();
  return env;
}

TEST_F(ServerTest, BindsEphemeralPortsAndAnswersDealerAndReqClients) {
  EXPECT_THAT(server_->client_endpoint(), StartsWith("tcp://127.0.0.1:"));
  EXPECT_NE(server_->client_endpoint(), "tcp://127.0.0.1:0");
  EXPECT_NE(server_->client_endpoint(), server_->node_endpoint());

  auto dealer = Connect(zmq::socket_type::dealer, server_->client_endpoint());
  SendFrames(dealer, {kiln::Encode(ListNodes("d1"))});
  auto frames = Receive(dealer);
  ASSERT_TRUE(frames);
  ASSERT_EQ(frames->size(), 1u);  // DEALER: no delimiter
  auto env = kiln::Decode(frames->front());
  ASSERT_TRUE(env.ok());
  EXPECT_EQ(env->request_id(), "d1");
  EXPECT_TRUE(env->has_nodes());

  auto req = Connect(zmq::socket_type::req, server_->client_endpoint());
  SendFrames(req, {kiln::Encode(ListNodes("r1"))});  // REQ adds the delimiter itself
  frames = Receive(req);
  ASSERT_TRUE(frames);
  ASSERT_EQ(frames->size(), 1u);  // ... and strips the echoed one
  EXPECT_EQ(kiln::Decode(frames->front())->request_id(), "r1");
}

TEST_F(ServerTest, BadFramesGetErrorRepliesAndCountersOnBothSockets) {
  auto client = Connect(zmq::socket_type::dealer, server_->client_endpoint());
  auto node = Connect(zmq::socket_type::dealer, server_->node_endpoint(), "node-x");

  kiln::v1::Envelope wrong_version = ListNodes("v9");
  std::string wrong_version_bytes = kiln::Encode(wrong_version);
  wrong_version.set_protocol_version(9);
  wrong_version_bytes = wrong_version.SerializeAsString();
  kiln::v1::Envelope no_body;
  no_body.set_protocol_version(kiln::kProtocolVersion);
  no_body.set_request_id("nb");
  const std::string truncated = kiln::Encode(ListNodes("0123456789")).substr(0, 6);

  struct Case {
    std::vector<std::string> frames;
    std::string reason;
    std::string code;
    std::string request_id;
  };
  const std::vector<Case> cases = {
      {{"\xff\xfe garbage \x01\x02"}, "malformed", "INVALID_ARGUMENT", ""},
      {{truncated}, "malformed", "INVALID_ARGUMENT", ""},
      {{wrong_version_bytes}, "version", "FAILED_PRECONDITION", "v9"},
      {{std::string()}, "empty", "INVALID_ARGUMENT", ""},
      {{no_body.SerializeAsString()}, "no_body", "INVALID_ARGUMENT", "nb"},
      {{"a", "b"}, "frames", "INVALID_ARGUMENT", ""},
  };
  for (auto* side : {"client", "node"}) {
    zmq::socket_t& s = std::string(side) == "client" ? client : node;
    for (const auto& c : cases) {
      const double before = ProtocolErrors(side, c.reason);
      SendFrames(s, c.frames);
      auto env = ReceiveEnvelope(s);
      ASSERT_TRUE(env.has_error()) << side << " " << c.reason;
      EXPECT_EQ(env.error().code(), c.code) << side << " " << c.reason;
      EXPECT_EQ(env.request_id(), c.request_id) << side << " " << c.reason;
      EXPECT_EQ(ProtocolErrors(side, c.reason), before + 1) << side << " " << c.reason;
    }
  }
  // A body meant for the other socket.
  kiln::v1::Envelope hb;
  hb.mutable_heartbeat();
  SendFrames(client, {kiln::Encode(hb)});
  auto env = ReceiveEnvelope(client);
  EXPECT_EQ(env.error().code(), "UNIMPLEMENTED");
  EXPECT_THAT(env.error().message(), HasSubstr("heartbeat is not accepted on the client socket"));
  SendFrames(node, {kiln::Encode(ListNodes("x"))});
  EXPECT_EQ(ReceiveEnvelope(node).error().code(), "UNIMPLEMENTED");
  // A node message before registering.
  SendFrames(node, {kiln::Encode(hb)});
  env = ReceiveEnvelope(node);
  EXPECT_EQ(env.error().code(), "FAILED_PRECONDITION");
  EXPECT_THAT(env.error().message(), HasSubstr("node-x is not registered"));
  EXPECT_EQ(ProtocolErrors("node", "unregistered"), 1);

  // A frame over max_message_bytes drops that connection; the server keeps serving.
  auto big = Connect(zmq::socket_type::dealer, server_->client_endpoint());
  SendFrames(big, {std::string(2 << 20, 'x')});
  SendFrames(client, {kiln::Encode(ListNodes("after"))});
  env = ReceiveEnvelope(client);
  EXPECT_EQ(env.request_id(), "after");
  EXPECT_TRUE(env.has_nodes());
}

TEST_F(ServerTest, InvalidSubmitNamesTheField) {
  auto client = Connect(zmq::socket_type::dealer, server_->client_endpoint());
  kiln::v1::Envelope env;
  env.set_request_id("s1");
  auto* spec = env.mutable_submit()->mutable_spec();
  spec->set_job_id("j1");
  spec->set_model("flux-tiny");
  spec->set_prompt("p");
  spec->set_width(300);
  SendFrames(client, {kiln::Encode(env)});
  auto reply = ReceiveEnvelope(client);
  EXPECT_EQ(reply.request_id(), "s1");
  EXPECT_EQ(reply.error().code(), "INVALID_ARGUMENT");
  EXPECT_EQ(reply.error().field(), "spec.width");
  EXPECT_EQ(reply.error().message(), "spec.width: 300 is not a multiple of 16");
}

TEST_F(ServerTest, JobEndToEndThroughANodeSocket) {
  auto node = Connect(zmq::socket_type::dealer, server_->node_endpoint(), "n1");
  kiln::v1::Envelope reg;
  reg.set_request_id("reg");
  auto* info = reg.mutable_register_node()->mutable_info();
  info->mutable_device()->set_kind("cpu");
  info->add_models("flux-tiny");
  info->set_can_compile(true);
  SendFrames(node, {kiln::Encode(reg)});
  auto ack = ReceiveEnvelope(node);
  ASSERT_TRUE(ack.has_register_ack()) << ack.DebugString();
  EXPECT_EQ(ack.request_id(), "reg");
  EXPECT_EQ(ack.register_ack().heartbeat_interval_ms(), 1000u);

  auto client = Connect(zmq::socket_type::dealer, server_->client_endpoint());
  kiln::v1::Envelope submit;
  submit.set_request_id("s");
  auto* spec = submit.mutable_submit()->mutable_spec();
  spec->set_job_id("job-1");
  spec->set_model("flux-tiny");
  spec->set_prompt("a cat");
  spec->set_width(64);
  spec->set_height(64);
  spec->set_steps(2);
  SendFrames(client, {kiln::Encode(submit)});
  auto submitted = ReceiveEnvelope(client);
  ASSERT_TRUE(submitted.has_job()) << submitted.DebugString();
  EXPECT_TRUE(submitted.job().created());

  kiln::v1::Envelope wait;
  wait.set_request_id("w");
  wait.mutable_wait()->set_job_id("job-1");
  wait.mutable_wait()->set_timeout_ms(10000);
  wait.mutable_wait()->set_include_png(true);
  SendFrames(client, {kiln::Encode(wait)});

  // The node sees its AssignJob (heartbeats may come first).
  kiln::v1::Envelope assigned;
  for (int i = 0; i < 5 && !assigned.has_assign(); ++i) assigned = ReceiveEnvelope(node);
  ASSERT_TRUE(assigned.has_assign());
  EXPECT_EQ(assigned.assign().spec().job_id(), "job-1");
  EXPECT_EQ(assigned.assign().attempt(), 1u);

  kiln::v1::Envelope result;
  result.mutable_result()->set_job_id("job-1");
  result.mutable_result()->set_ok(true);
  result.mutable_result()->set_attempt(1);
  result.mutable_result()->set_png("PNGDATA");
  SendFrames(node, {kiln::Encode(result)});

  auto done = ReceiveEnvelope(client);
  ASSERT_TRUE(done.has_job()) << done.DebugString();
  EXPECT_EQ(done.request_id(), "w");
  EXPECT_TRUE(done.job().final());
  EXPECT_EQ(done.job().job().state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(done.job().job().png(), "PNGDATA");
}

TEST_F(ServerTest, StopIsPromptAndIdempotent) {
  const auto start = std::chrono::steady_clock::now();
  server_->Stop();
  server_->Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(1));
}

TEST(ServerOptionsTest, EndpointsAndValidation) {
  EXPECT_EQ(BindableEndpoint("tcp://127.0.0.1:0"), "tcp://127.0.0.1:*");
  EXPECT_EQ(BindableEndpoint("tcp://127.0.0.1:7700"), "tcp://127.0.0.1:7700");
  EXPECT_EQ(BindableEndpoint("ipc:///tmp/x"), "ipc:///tmp/x");
  EXPECT_EQ(ConnectableEndpoint("tcp://0.0.0.0:5555"), "tcp://127.0.0.1:5555");
  EXPECT_EQ(ConnectableEndpoint("tcp://10.0.0.2:5555"), "tcp://10.0.0.2:5555");
  CoordinatorServerOptions o;
  o.node_endpoint = o.client_endpoint;
  EXPECT_EQ(ErrorField(o.Validate()), "node_endpoint");
  o = {};
  o.max_message_bytes = 10;
  EXPECT_EQ(ErrorField(o.Validate()), "max_message_bytes");
}

TEST(ServerStartTest, BindConflictIsUnavailable) {
  FakeClock clock;
  InMemoryJobStore store;
  prometheus::Registry registry;
  CoordinatorMetrics metrics(registry);
  auto c = Coordinator::Create(CoordinatorOptions{}, store, clock, metrics);
  ASSERT_TRUE(c.ok());
  CoordinatorServerOptions o;
  o.client_endpoint = "tcp://127.0.0.1:0";
  o.node_endpoint = "tcp://127.0.0.1:0";
  auto first = CoordinatorServer::Start(o, **c, metrics);
  ASSERT_TRUE(first.ok());
  o.client_endpoint = (*first)->client_endpoint();
  auto second = CoordinatorServer::Start(o, **c, metrics);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(second.status().message()), HasSubstr("cannot bind the client socket"));
}

TEST(EndpointsFileTest, WritesJsonAtomically) {
  const std::string dir = ::testing::TempDir();
  const std::string path = dir + "/endpoints-" + std::to_string(getpid()) + ".json";
  EndpointsFile e{"tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "http://127.0.0.1:3/metrics", 42};
  ASSERT_TRUE(WriteEndpointsFile(path, e).ok());
  std::ifstream in(path);
  auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["client_endpoint"], "tcp://127.0.0.1:1");
  EXPECT_EQ(j["node_endpoint"], "tcp://127.0.0.1:2");
  EXPECT_EQ(j["metrics_url"], "http://127.0.0.1:3/metrics");
  EXPECT_EQ(j["pid"], 42);
  EXPECT_EQ(WriteEndpointsFile("/nonexistent-dir/x.json", e).code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace kiln::coordinator
