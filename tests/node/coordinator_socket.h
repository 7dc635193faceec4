// The coordinator's end of a node test: a ROUTER bound on an ephemeral loopback port that a
// NodeAgent connects to (endpoint()), with what the tests do with it: wait for a message of one
// kind (answering heartbeats on the way, so the node keeps it alive, and remembering the last
// heartbeat's `unhealthy`), send, acknowledge a registration.
//
// Threads: the test's thread only.
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <vector>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/wire.h"
#include "gtest/gtest.h"

namespace kiln::node::testing {

class CoordinatorSocket {
 public:
  // `node_id`: the routing id the node connects with (NodeOptions::node_id).
  explicit CoordinatorSocket(std::string node_id)
      : node_id_(std::move(node_id)), router_(context_, zmq::socket_type::router) {
    router_.set(zmq::sockopt::router_handover, 1);
    router_.set(zmq::sockopt::linger, 0);
    router_.bind("tcp://127.0.0.1:*");
    endpoint_ = router_.get(zmq::sockopt::last_endpoint);
  }

  const std::string& endpoint() const { return endpoint_; }
  // Closes the socket: nothing listens at endpoint() any more.
  void Close() { router_.close(); }

  // The next message from the node with body `body` (and, for results, `job` unless empty);
  // others are skipped. nullopt after `timeout`.
  std::optional<kiln::v1::Envelope> Expect(
      kiln::v1::Envelope::BodyCase body, const std::string& job = "",
      std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      zmq::pollitem_t item{router_.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, std::chrono::milliseconds(20));
      if (!(item.revents & ZMQ_POLLIN)) continue;
      std::vector<zmq::message_t> frames;
      (void)zmq::recv_multipart(router_, std::back_inserter(frames));
      EXPECT_EQ(frames.size(), 2u);
      EXPECT_EQ(frames[0].to_string(), node_id_);
      auto env = Decode(frames.back().to_string_view());
      EXPECT_TRUE(env.ok()) << env.status();
      if (!env.ok()) continue;
      if (env->has_heartbeat()) {
        unhealthy_ = env->heartbeat().unhealthy();
        kiln::v1::Envelope hb;
        hb.mutable_heartbeat();
        Send(hb);
      }
      if (env->body_case() != body) continue;
      if (!job.empty() && env->has_result() && env->result().job_id() != job) continue;
      return *env;
    }
    return std::nullopt;
  }

  void Send(const kiln::v1::Envelope& env) { SendRaw(Encode(env)); }
  void SendRaw(const std::string& bytes) {
    router_.send(zmq::buffer(node_id_), zmq::send_flags::sndmore);
    router_.send(zmq::buffer(bytes));
  }
  // RegisterAck with a heartbeat every `heartbeat_ms`.
  void Ack(int heartbeat_ms = 100) {
    kiln::v1::Envelope ack;
    ack.mutable_register_ack()->set_heartbeat_interval_ms(heartbeat_ms);
    Send(ack);
  }

  // Heartbeat.unhealthy of the last heartbeat Expect saw ("" before any).
  const std::string& unhealthy() const { return unhealthy_; }

 private:
  const std::string node_id_;
  zmq::context_t context_;
  zmq::socket_t router_;
  std::string endpoint_;
  std::string unhealthy_;
};

}  // namespace kiln::node::testing
