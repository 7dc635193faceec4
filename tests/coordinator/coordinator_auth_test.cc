// CoordinatorServer with CURVE and its ZAP handler, in process over loopback: real ZeroMQ
// sockets with real key pairs, allowlists in a temp directory. Covers issue 12's transport
// findings: an impostor node (unknown key) and an unknown client are refused at the handshake;
// a DEALER borrowing a live node's routing id is not attached and, once the route is free,
// refused by key; a client cannot read, wait for or cancel another client's job nor drain, an
// admin can; allowlists are re-read without a restart (key rotation). And the pending waits of a
// client connection that closes are dropped (they no longer hold its key's caps), while a client
// that comes back with the same routing id keeps its new connection's waits.
#include <stdlib.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "common/curve_keys.h"
#include "common/files.h"
#include "common/wire.h"
#include "coordinator/coordinator_server.h"
#include "coordinator/job_store.h"
#include "coordinator/zap_authenticator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "zmq.hpp"
#include "zmq_addon.hpp"

namespace kiln::coordinator {
namespace {

using ::testing::HasSubstr;

CurveKeyPair NewPair() {
  auto p = NewCurveKeyPair();
  EXPECT_TRUE(p.ok());
  return *p;
}

kiln::v1::Envelope Request(const std::string& rid) {
  kiln::v1::Envelope env;
  env.set_request_id(rid);
  return env;
}

class AuthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kiln-auth-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    server_keys_ = NewPair();
    for (auto* k : {&node1_, &node2_, &alice_, &bob_, &admin_, &stranger_}) *k = NewPair();
    WriteList("nodes", {node1_, node2_});
    WriteList("clients", {alice_, bob_});
    WriteList("admins", {admin_});
    auto c = Coordinator::Create(options_, store_, clock_, metrics_);
    ASSERT_TRUE(c.ok());
    coordinator_ = std::move(*c);
    CoordinatorServerOptions o;
    o.client_endpoint = "tcp://127.0.0.1:0";
    o.node_endpoint = "tcp://127.0.0.1:0";
    o.curve_secret_key = server_keys_.secret_key;
    o.auth.allowlists = {dir_ + "/nodes", dir_ + "/clients", dir_ + "/admins"};
    o.auth.check_interval_ms = 100;
    o.auth_registry = &registry_;
    auto s = CoordinatorServer::Start(o, *coordinator_, metrics_);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
  }
  void TearDown() override {
    server_.reset();
    (void)RemoveTree(dir_);
  }

  // A list file "Z85 name" per key, replaced atomically (a rename, as an editor or a Secret
  // update does).
  void WriteList(const std::string& name, const std::vector<CurveKeyPair>& keys) {
    std::string text;
    for (const auto& k : keys) text += k.public_key + "\n";
    ASSERT_TRUE(WriteFileAtomically(dir_ + "/" + name, text).ok());
  }

  zmq::socket_t Connect(const std::string& endpoint, const CurveKeyPair& keys,
                        const std::string& identity = "") {
    zmq::socket_t s(context_, zmq::socket_type::dealer);
    s.set(zmq::sockopt::linger, 0);
    if (!identity.empty()) s.set(zmq::sockopt::routing_id, identity);
    CurveClient curve{keys, server_keys_.public_key};
    EXPECT_TRUE(ApplyCurveClient(s.handle(), curve).ok());
    s.connect(endpoint);
    return s;
  }
  zmq::socket_t Client(const CurveKeyPair& keys) {
    return Connect(server_->client_endpoint(), keys);
  }
  zmq::socket_t NodeSocket(const CurveKeyPair& keys, const std::string& id) {
    return Connect(server_->node_endpoint(), keys, id);
  }

  void Send(zmq::socket_t& s, const kiln::v1::Envelope& env) {
    const std::string bytes = kiln::Encode(env);
    ASSERT_TRUE(s.send(zmq::buffer(bytes), zmq::send_flags::dontwait).has_value());
  }
  std::optional<kiln::v1::Envelope> Receive(zmq::socket_t& s, int timeout_ms = 3000) {
    zmq_pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, std::chrono::milliseconds(timeout_ms)) == 0) return std::nullopt;
    zmq::message_t msg;
    if (!s.recv(msg)) return std::nullopt;
    auto env = kiln::Decode(msg.to_string_view());
    EXPECT_TRUE(env.ok()) << env.status();
    return env.ok() ? std::optional(*env) : std::nullopt;
  }
  std::optional<kiln::v1::Envelope> Call(zmq::socket_t& s, const kiln::v1::Envelope& env,
                                         int timeout_ms = 3000) {
    Send(s, env);
    return Receive(s, timeout_ms);
  }

  void RegisterNode(zmq::socket_t& s, const std::string& id) {
    auto env = Request("reg");
    auto* info = env.mutable_register_node()->mutable_info();
    info->set_node_id(id);
    info->mutable_device()->set_kind("cpu");
    info->add_models("flux-tiny");
    info->set_can_compile(true);
    auto reply = Call(s, env);
    ASSERT_TRUE(reply.has_value()) << "no RegisterAck";
    ASSERT_TRUE(reply->has_register_ack()) << reply->DebugString();
  }
  kiln::v1::Envelope Submit(const std::string& job_id) {
    auto env = Request("sub");
    auto* spec = env.mutable_submit()->mutable_spec();
    spec->set_job_id(job_id);
    spec->set_model("flux-tiny");
    spec->set_prompt("a secret prompt");
    spec->set_width(256);
    spec->set_height(256);
    spec->set_steps(4);
    return env;
  }
  double Handshakes(const std::string& domain, const std::string& result) {
    for (const auto& family : registry_.Collect()) {
      if (family.name != "kiln_auth_handshakes_total") continue;
      for (const auto& m : family.metric) {
        std::map<std::string, std::string> labels;
        for (const auto& l : m.label) labels[l.name] = l.value;
        if (labels["domain"] == domain && labels["result"] == result) return m.counter.value;
      }
    }
    return 0;
  }
  double ProtocolErrors(const std::string& socket, const std::string& reason) {
    return metrics_.protocol_errors.Add({{"socket", socket}, {"reason", reason}}).Value();
  }
  std::string ErrorCode(const std::optional<kiln::v1::Envelope>& env) {
    if (!env.has_value()) return "no reply";
    return env->has_error() ? env->error().code() : "OK";
  }

  CoordinatorOptions options_;  // what SetUp creates the coordinator with
  std::string dir_;
  CurveKeyPair server_keys_, node1_, node2_, alice_, bob_, admin_, stranger_;
  SystemClock clock_;
  InMemoryJobStore store_;
  prometheus::Registry registry_;
  CoordinatorMetrics metrics_{registry_};
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<CoordinatorServer> server_;
  zmq::context_t context_;
};

TEST_F(AuthTest, AnImpostorNodeWithAnUnknownKeyIsRefusedAtTheHandshake) {
  auto impostor = NodeSocket(stranger_, "fake-node");
  auto env = Request("reg");
  auto* info = env.mutable_register_node()->mutable_info();
  info->set_node_id("fake-node");
  info->mutable_device()->set_kind("cpu");
  info->add_models("flux-tiny");
  EXPECT_EQ(Call(impostor, env, 1000), std::nullopt);
  EXPECT_EQ(coordinator_->ListNodes().nodes_size(), 0);
  EXPECT_GE(Handshakes("node", "refused"), 1);
  // A client key is no node key either, and a node key is no client key.
  auto client_as_node = NodeSocket(alice_, "fake-node");
  EXPECT_EQ(Call(client_as_node, env, 1000), std::nullopt);
  auto node_as_client = Client(node1_);
  auto list = Request("ls");
  list.mutable_list_nodes();
  EXPECT_EQ(Call(node_as_client, list, 1000), std::nullopt);
  EXPECT_EQ(coordinator_->ListNodes().nodes_size(), 0);
}

TEST_F(AuthTest, AClientWithoutAnAllowedKeyGetsNothing) {
  auto stranger = Client(stranger_);
  auto list = Request("ls");
  list.mutable_list_nodes();
  EXPECT_EQ(Call(stranger, list, 1000), std::nullopt);
  EXPECT_GE(Handshakes("client", "refused"), 1);
  auto alice = Client(alice_);
  EXPECT_EQ(ErrorCode(Call(alice, list)), "OK");
  EXPECT_GE(Handshakes("client", "accepted"), 1);
}

TEST_F(AuthTest, AClientCannotReadOrCancelAnotherClientsJobButAnAdminCan) {
  auto node = NodeSocket(node1_, "n1");
  RegisterNode(node, "n1");
  auto alice = Client(alice_);
  auto bob = Client(bob_);
  auto admin = Client(admin_);
  auto submitted = Call(alice, Submit("alice-job"));
  ASSERT_EQ(ErrorCode(submitted), "OK");
  EXPECT_EQ(submitted->job().job().owner(), alice_.public_key);

  auto status = Request("st");
  status.mutable_status()->set_job_id("alice-job");
  auto cancel = Request("cx");
  cancel.mutable_cancel()->set_job_id("alice-job");
  auto wait = Request("wt");
  wait.mutable_wait()->set_job_id("alice-job");
  wait.mutable_wait()->set_timeout_ms(0);
  auto drain = Request("dr");
  drain.mutable_drain()->set_node_id("n1");

  EXPECT_EQ(ErrorCode(Call(bob, status)), "PERMISSION_DENIED");
  EXPECT_EQ(ErrorCode(Call(bob, wait)), "PERMISSION_DENIED");
  EXPECT_EQ(ErrorCode(Call(bob, cancel)), "PERMISSION_DENIED");
  EXPECT_EQ(ErrorCode(Call(bob, Submit("alice-job"))), "PERMISSION_DENIED");
  auto bob_drain = Call(bob, drain);
  EXPECT_EQ(ErrorCode(bob_drain), "PERMISSION_DENIED");
  EXPECT_THAT(bob_drain->error().message(), HasSubstr("admin"));
  auto uncordon = Request("un");
  uncordon.mutable_uncordon()->set_node_id("n1");
  auto remove = Request("rm");
  remove.mutable_remove_node()->set_node_id("n1");
  remove.mutable_remove_node()->set_force(true);
  EXPECT_EQ(ErrorCode(Call(bob, uncordon)), "PERMISSION_DENIED");
  EXPECT_EQ(ErrorCode(Call(alice, remove)), "PERMISSION_DENIED");
  EXPECT_GE(ProtocolErrors("client", "forbidden"), 3);
  EXPECT_EQ(store_.Get("alice-job")->state(), kiln::v1::JOB_STATE_RUNNING);

  EXPECT_EQ(ErrorCode(Call(alice, status)), "OK");
  auto admin_status = Call(admin, status);
  ASSERT_EQ(ErrorCode(admin_status), "OK");
  EXPECT_EQ(admin_status->job().job().spec().prompt(), "a secret prompt");
  auto admin_cancel = Call(admin, cancel);
  ASSERT_EQ(ErrorCode(admin_cancel), "OK");
  EXPECT_EQ(admin_cancel->job().job().state(), kiln::v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(ErrorCode(Call(admin, drain)), "OK");
  EXPECT_EQ(ErrorCode(Call(admin, uncordon)), "OK");
}

TEST_F(AuthTest, ADealerBorrowingALiveNodesRoutingIdIsRefused) {
  auto node = NodeSocket(node1_, "n1");
  RegisterNode(node, "n1");
  auto alice = Client(alice_);
  ASSERT_EQ(ErrorCode(Call(alice, Submit("victim"))), "OK");
  ASSERT_EQ(store_.Get("victim")->node_id(), "n1");

  // Another allowed node key, claiming n1's routing id, sends a forged result.
  auto thief = NodeSocket(node2_, "n1");
  auto forged = Request("forge");
  forged.mutable_result()->set_job_id("victim");
  forged.mutable_result()->set_ok(true);
  forged.mutable_result()->set_png("forged");
  forged.mutable_result()->set_attempt(1);
  Send(thief, forged);
  EXPECT_EQ(Receive(thief, 1000), std::nullopt);  // libzmq did not attach the duplicate id
  EXPECT_EQ(store_.Get("victim")->state(), kiln::v1::JOB_STATE_RUNNING);

  // The real node still reaches the coordinator (its route was not moved).
  auto hb = Request("hb");
  hb.mutable_heartbeat()->add_running_jobs("victim");
  Send(node, hb);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(store_.Get("victim")->state(), kiln::v1::JOB_STATE_RUNNING);

  // Once the real node's connection is gone (the node is still live in the table), the id's
  // route is free, but the key bound to n1 is node1's: the thief is refused by key.
  node.close();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto thief2 = NodeSocket(node2_, "n1");
  auto refused = Call(thief2, forged);
  EXPECT_EQ(ErrorCode(refused), "PERMISSION_DENIED");
  auto reregister = Request("reg");
  auto* info = reregister.mutable_register_node()->mutable_info();
  info->set_node_id("n1");
  info->mutable_device()->set_kind("cpu");
  info->add_models("flux-tiny");
  EXPECT_EQ(ErrorCode(Call(thief2, reregister)), "PERMISSION_DENIED");
  EXPECT_EQ(store_.Get("victim")->state(), kiln::v1::JOB_STATE_RUNNING);
  EXPECT_GE(ProtocolErrors("node", "forbidden"), 2);

  // The real node comes back with its own key and is accepted.
  thief2.close();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto back = NodeSocket(node1_, "n1");
  RegisterNode(back, "n1");
}

TEST_F(AuthTest, AllowlistsAreReloadedWithoutARestart) {
  auto carol = NewPair();
  auto list = Request("ls");
  list.mutable_list_nodes();
  {
    auto before = Client(carol);
    EXPECT_EQ(Call(before, list, 500), std::nullopt);
  }
  // Rotation: carol replaces alice.
  WriteList("clients", {carol, bob_});
  std::this_thread::sleep_for(std::chrono::milliseconds(400));  // > check_interval_ms
  auto after = Client(carol);
  EXPECT_EQ(ErrorCode(Call(after, list)), "OK");
  auto old = Client(alice_);
  EXPECT_EQ(Call(old, list, 500), std::nullopt);
  // A list that no longer parses keeps the previous keys.
  std::ofstream(dir_ + "/clients.tmp") << "garbage\n";
  ASSERT_EQ(rename((dir_ + "/clients.tmp").c_str(), (dir_ + "/clients").c_str()), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  auto still = Client(carol);
  EXPECT_EQ(ErrorCode(Call(still, list)), "OK");
  // ReloadKeys (SIGHUP in kiln-coordinator) re-reads at once.
  WriteList("clients", {alice_});
  server_->ReloadKeys();
  std::this_thread::sleep_for(std::chrono::milliseconds(250));
  auto alice = Client(alice_);
  EXPECT_EQ(ErrorCode(Call(alice, list)), "OK");
}

}  // namespace
}  // namespace kiln::coordinator

namespace kiln::coordinator {
namespace {

// Caps small enough that a client's waits left behind would lock its key out.
class ClientGoneTest : public AuthTest {
 protected:
  ClientGoneTest() {
    options_.max_pending_waits = 3;
    options_.max_waits_per_client = 3;
  }
  // A Wait with stream_progress: an accepted wait is answered at once (final = false).
  kiln::v1::Envelope StreamingWait(const std::string& rid, const std::string& job_id) {
    auto env = Request(rid);
    env.mutable_wait()->set_job_id(job_id);
    env.mutable_wait()->set_timeout_ms(600000);
    env.mutable_wait()->set_stream_progress(true);
    return env;
  }
  void OpenWaits(zmq::socket_t& s, const std::string& job_id, int n) {
    for (int i = 0; i < n; ++i) {
      auto reply = Call(s, StreamingWait("w" + std::to_string(i), job_id));
      ASSERT_EQ(ErrorCode(reply), "OK") << i << ": " << reply->DebugString();
      ASSERT_FALSE(reply->job().final());
    }
  }
  // Polls kiln_coordinator_waits_pending (the server thread sets it) until it is `n`.
  bool PendingWaitsReach(double n, int timeout_ms = 5000) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (metrics_.waits_pending.Value() != n) {
      if (std::chrono::steady_clock::now() > until) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return true;
  }
};

TEST_F(ClientGoneTest, WaitsOfAClosedConnectionAreDroppedAndFreeTheCaps) {
  auto alice = Client(alice_);
  ASSERT_EQ(ErrorCode(Call(alice, Submit("j"))), "OK");  // no node: the job stays queued
  OpenWaits(alice, "j", 3);
  EXPECT_EQ(metrics_.waits_pending.Value(), 3);
  alice.close();
  EXPECT_TRUE(PendingWaitsReach(0)) << metrics_.waits_pending.Value() << " waits still pending";
  EXPECT_EQ(metrics_.waits_dropped_client_gone.Value(), 3);

  // The same key on a new connection is not refused (max_pending_waits is 3), and its waits are
  // answered there.
  auto again = Client(alice_);
  OpenWaits(again, "j", 3);
  auto cancel = Request("cx");
  cancel.mutable_cancel()->set_job_id("j");
  Send(again, cancel);
  int finals = 0;
  for (int i = 0; i < 4; ++i) {
    auto reply = Receive(again);
    ASSERT_EQ(ErrorCode(reply), "OK");
    EXPECT_EQ(reply->job().job().state(), kiln::v1::JOB_STATE_CANCELLED);
    if (reply->request_id() != "cx") ++finals;
  }
  EXPECT_EQ(finals, 3);
  EXPECT_TRUE(PendingWaitsReach(0));
  EXPECT_EQ(metrics_.waits_dropped_client_gone.Value(), 3);
}

TEST_F(ClientGoneTest, OtherConnectionsOfTheKeyAndAReconnectWithTheSameRoutingIdKeepTheirWaits) {
  auto first = Connect(server_->client_endpoint(), alice_, "alice-cli");
  ASSERT_EQ(ErrorCode(Call(first, Submit("j"))), "OK");
  OpenWaits(first, "j", 2);
  auto other = Client(alice_);  // the same key on another connection
  OpenWaits(other, "j", 1);
  first.close();
  EXPECT_TRUE(PendingWaitsReach(1)) << metrics_.waits_pending.Value() << " waits pending";
  EXPECT_EQ(metrics_.waits_dropped_client_gone.Value(), 2);

  // Back with the same routing id, likely on the descriptor the old connection had. libzmq
  // attaches it only once the old connection's route is released (no ROUTER_HANDOVER; a
  // connection that comes too early is never attached), so try until one is answered.
  zmq::socket_t back;
  std::optional<kiln::v1::Envelope> reply;
  for (int attempt = 0; attempt < 20 && !reply.has_value(); ++attempt) {
    back = Connect(server_->client_endpoint(), alice_, "alice-cli");
    reply = Call(back, StreamingWait("again", "j"), 250);
  }
  ASSERT_EQ(ErrorCode(reply), "OK");
  ASSERT_FALSE(reply->job().final());
  EXPECT_TRUE(PendingWaitsReach(2));

  // Both live connections' waits are answered when the job ends; nothing more was dropped.
  auto cancel = Request("cx");
  cancel.mutable_cancel()->set_job_id("j");
  Send(other, cancel);
  for (zmq::socket_t* s : {&other, &back}) {
    bool final_seen = false;
    for (int i = 0; i < (s == &other ? 2 : 1); ++i) {
      auto r = Receive(*s);
      ASSERT_EQ(ErrorCode(r), "OK");
      EXPECT_EQ(r->job().job().state(), kiln::v1::JOB_STATE_CANCELLED);
      if (r->request_id() != "cx") final_seen = r->job().final();
    }
    EXPECT_TRUE(final_seen) << (s == &other ? "other" : "back") << "'s wait was not answered";
  }
  EXPECT_TRUE(PendingWaitsReach(0));
  EXPECT_EQ(metrics_.waits_dropped_client_gone.Value(), 2);
}

}  // namespace
}  // namespace kiln::coordinator
