// A hand-written fake coordinator for the CLI tests: a ZeroMQ ROUTER on an ephemeral loopback
// port, served by one thread that answers each request with whatever the test's handler returns
// (zero or more envelopes, sent in order; request_id is filled in). Header-only.
#pragma once

#include <atomic>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/proto/kiln.pb.h"
#include "common/wire.h"
#include "zmq.hpp"

namespace kiln::cli::testing {

class FakeCoordinator {
 public:
  using Handler = std::function<std::vector<kiln::v1::Envelope>(const kiln::v1::Envelope&)>;

  explicit FakeCoordinator(Handler handler) : handler_(std::move(handler)) {
    socket_.set(zmq::sockopt::linger, 0);
    socket_.bind("tcp://127.0.0.1:*");
    endpoint_ = socket_.get(zmq::sockopt::last_endpoint);
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeCoordinator() {
    stop_ = true;
    thread_.join();
  }

  const std::string& endpoint() const { return endpoint_; }
  // Every request received so far.
  std::vector<kiln::v1::Envelope> requests() {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_;
  }

 private:
  void Serve() {
    zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
    while (!stop_) {
      zmq::poll(&item, 1, std::chrono::milliseconds(50));
      if (!(item.revents & ZMQ_POLLIN)) continue;
      zmq::message_t identity, frame;
      if (!socket_.recv(identity, zmq::recv_flags::dontwait)) continue;
      if (!socket_.recv(frame, zmq::recv_flags::dontwait)) continue;
      auto request =
          kiln::Decode(std::string_view(static_cast<const char*>(frame.data()), frame.size()));
      if (!request.ok()) continue;
      {
        std::lock_guard<std::mutex> lock(mu_);
        requests_.push_back(*request);
      }
      for (auto reply : handler_(*request)) {
        reply.set_request_id(request->request_id());
        socket_.send(zmq::buffer(identity.to_string()), zmq::send_flags::sndmore);
        socket_.send(zmq::buffer(kiln::Encode(reply)), zmq::send_flags::none);
      }
    }
  }

  Handler handler_;
  zmq::context_t context_{1};
  zmq::socket_t socket_{context_, zmq::socket_type::router};
  std::string endpoint_;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::vector<kiln::v1::Envelope> requests_;
  std::thread thread_;
};

// Envelope helpers for handlers.
inline kiln::v1::Envelope JobEnvelope(kiln::v1::JobInfo job, bool final = true,
                                      bool created = true) {
  kiln::v1::Envelope env;
  *env.mutable_job()->mutable_job() = std::move(job);
  env.mutable_job()->set_final(final);
  env.mutable_job()->set_created(created);
  return env;
}

inline kiln::v1::Envelope ErrorEnvelope(const std::string& code, const std::string& field,
                                        const std::string& message) {
  kiln::v1::Envelope env;
  env.mutable_error()->set_code(code);
  env.mutable_error()->set_field(field);
  env.mutable_error()->set_message(message);
  return env;
}

}  // namespace kiln::cli::testing
