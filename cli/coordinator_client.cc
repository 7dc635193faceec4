#include "cli/coordinator_client.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/clock.h"
#include "common/wire.h"
#include "zmq.hpp"

namespace kiln::cli {
namespace {

constexpr char kCodePayload[] = "type.kiln.dev/ErrorReply.code";

absl::Status UnexpectedReply(const kiln::v1::Envelope& env, const char* wanted) {
  return absl::InternalError(absl::StrCat("coordinator sent an unexpected reply (body case ",
                                          static_cast<int>(env.body_case()), ", wanted ", wanted,
                                          ")"));
}

}  // namespace

// One DEALER connected to one endpoint, and a monitor that reports the connection closing (the
// coordinator died or restarted) so a pending request is retried at once instead of timing out.
struct CoordinatorClient::Socket {
  zmq::context_t context{1};
  zmq::socket_t socket{context, zmq::socket_type::dealer};
  zmq::socket_t monitor{context, zmq::socket_type::pair};
  bool handshake_refused = false;  // CURVE: the coordinator refused our key (or we its)

  // True when the monitor reported the connection closed (drains every queued event).
  bool Disconnected() {
    bool closed = false;
    while (true) {
      zmq::message_t event, address;
      if (!monitor.recv(event, zmq::recv_flags::dontwait)) return closed;
      if (event.more()) (void)monitor.recv(address, zmq::recv_flags::dontwait);
      uint16_t id = 0;
      if (event.size() >= sizeof(id)) std::memcpy(&id, event.data(), sizeof(id));
      if (id == ZMQ_EVENT_DISCONNECTED) closed = true;
      if (id == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH || id == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) {
        handshake_refused = true;
      }
    }
  }
};

absl::Status ClientOptions::Validate() const {
  const std::vector<std::string> endpoints = SplitEndpointList(endpoint);
  if (endpoints.empty()) return absl::InvalidArgumentError("endpoint: empty");
  for (const std::string& e : endpoints) {
    if (e.find("://") == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "endpoint: '", e, "' is not a ZeroMQ endpoint (e.g. tcp://127.0.0.1:5555)"));
    }
  }
  if (request_timeout_ms <= 0) {
    return absl::InvalidArgumentError("request_timeout_ms: must be positive");
  }
  if (connect_timeout_ms <= 0) {
    return absl::InvalidArgumentError("connect_timeout_ms: must be positive");
  }
  return failover.Validate();
}

bool FromCoordinator(const absl::Status& status) {
  return status.GetPayload(kCodePayload).has_value();
}

absl::Status StatusFromErrorReply(const kiln::v1::ErrorReply& error) {
  absl::StatusCode code = StatusCodeFromName(error.code());
  if (code == absl::StatusCode::kOk) code = absl::StatusCode::kUnknown;
  absl::Status status(code, error.message().empty() ? error.code() : error.message());
  status.SetPayload(kCodePayload, absl::Cord(error.code()));
  return WithField(std::move(status), error.field());
}

bool Retryable(const absl::Status& status) {
  if (FromCoordinator(status)) return absl::IsUnavailable(status);
  return absl::IsDeadlineExceeded(status) || absl::IsUnavailable(status);
}

absl::StatusOr<std::unique_ptr<CoordinatorClient>> CoordinatorClient::Connect(
    const ClientOptions& options) {
  if (auto s = options.Validate(); !s.ok()) return s;
  std::unique_ptr<CoordinatorClient> client(new CoordinatorClient(options));
  if (auto s = client->Reconnect(); !s.ok()) return s;
  return client;
}

CoordinatorClient::CoordinatorClient(const ClientOptions& options)
    : options_(options),
      failover_(SplitEndpointList(options.endpoint), options.failover, clock_) {}

CoordinatorClient::~CoordinatorClient() = default;

absl::Status CoordinatorClient::Reconnect() {
  static std::atomic<uint64_t> monitors{0};
  socket_.reset();  // linger 0: whatever the old connection still queued is dropped
  const std::string& endpoint = failover_.endpoint();
  try {
    auto socket = std::make_unique<Socket>();
    socket->socket.set(zmq::sockopt::linger, 0);
    // Queue nothing for a peer that is not connected: POLLOUT then means "someone listens".
    socket->socket.set(zmq::sockopt::immediate, 1);
    const std::string monitor_address =
        absl::StrCat("inproc://kiln-client-monitor-", getpid(), "-", monitors++);
    if (zmq_socket_monitor(socket->socket.handle(), monitor_address.c_str(),
                           ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                               ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) != 0) {
      throw zmq::error_t();
    }
    socket->monitor.set(zmq::sockopt::linger, 0);
    socket->monitor.connect(monitor_address);
    if (auto s = ApplyCurveClient(socket->socket.handle(), options_.curve); !s.ok()) return s;
    socket->socket.connect(endpoint);
    socket_ = std::move(socket);
  } catch (const zmq::error_t& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot connect to coordinator at ", endpoint, ": ", e.what()));
  }
  return absl::OkStatus();
}

absl::StatusOr<kiln::v1::Envelope> CoordinatorClient::Call(
    const kiln::v1::Envelope& request, int64_t extra_ms,
    const std::function<bool(const kiln::v1::Envelope&)>& is_final,
    const std::function<void(const kiln::v1::Envelope&)>& on_partial) {
  while (true) {
    auto reply = CallOnce(request, extra_ms, is_final, on_partial);
    if (reply.ok() || !Retryable(reply.status())) {
      // An answer, even an error, means this endpoint's coordinator is serving.
      if (reply.ok() || FromCoordinator(reply.status())) failover_.OnSuccess();
      return reply;
    }
    const std::optional<int64_t> delay = failover_.OnFailure();
    if (!delay.has_value()) {
      if (failover_.failures() <= 1) return reply;
      return absl::Status(reply.status().code(),
                          absl::StrFormat("%s (gave up after %d tries over %.0fs)",
                                          reply.status().message(), failover_.failures(),
                                          options_.failover.retry_for_ms / 1000.0));
    }
    if (options_.on_retry) options_.on_retry(reply.status(), failover_.endpoint(), *delay);
    std::this_thread::sleep_for(std::chrono::milliseconds(*delay));
    if (auto s = Reconnect(); !s.ok()) return s;
  }
}

absl::StatusOr<kiln::v1::Envelope> CoordinatorClient::CallOnce(
    kiln::v1::Envelope request, int64_t extra_ms,
    const std::function<bool(const kiln::v1::Envelope&)>& is_final,
    const std::function<void(const kiln::v1::Envelope&)>& on_partial) {
  const std::string& endpoint = failover_.endpoint();
  const std::string request_id = absl::StrCat(getpid(), "-", next_request_++);
  request.set_request_id(request_id);
  const std::string frame = Encode(std::move(request));
  const int64_t budget_ms = options_.request_timeout_ms + extra_ms;
  const int64_t start = SteadyMs();
  const int64_t deadline = start + budget_ms;
  auto timed_out = [&] {
    return absl::DeadlineExceededError(
        absl::StrFormat("coordinator at %s did not answer within %.0fs (is it running?)",
                        endpoint, budget_ms / 1000.0));
  };
  try {
    zmq::pollitem_t out_item{socket_->socket.handle(), 0, ZMQ_POLLOUT, 0};
    // With ZMQ_IMMEDIATE a DEALER is writable only once a peer is connected; a coordinator that
    // binds nothing (a standby, one that is down) is left after connect_timeout_ms.
    const int64_t connect_deadline =
        std::min<int64_t>(deadline, start + options_.connect_timeout_ms);
    while (true) {
      const int64_t left = connect_deadline - SteadyMs();
      if (left <= 0) {
        return absl::UnavailableError(
            absl::StrFormat("no coordinator is listening at %s (nothing connected within %.1fs)",
                            endpoint, options_.connect_timeout_ms / 1000.0));
      }
      zmq::poll(&out_item, 1, std::chrono::milliseconds(std::min<int64_t>(left, 100)));
      if (out_item.revents & ZMQ_POLLOUT) break;
      (void)socket_->Disconnected();
      if (socket_->handshake_refused) {
        return absl::PermissionDeniedError(absl::StrCat(
            "the coordinator at ", endpoint,
            " refused this client's CURVE handshake: its key is not in the coordinator's "
            "allowlists, or --server-key is not the coordinator's public key",
            options_.curve.enabled() ? "" : " (this client has no key: pass --key)"));
      }
    }
    if (!socket_->socket.send(zmq::buffer(frame), zmq::send_flags::dontwait)) return timed_out();
    zmq::pollitem_t in_items[] = {{socket_->socket.handle(), 0, ZMQ_POLLIN, 0},
                                  {socket_->monitor.handle(), 0, ZMQ_POLLIN, 0}};
    while (true) {
      const int64_t left = deadline - SteadyMs();
      if (left <= 0) return timed_out();
      zmq::poll(in_items, 2, std::chrono::milliseconds(left));
      if ((in_items[1].revents & ZMQ_POLLIN) && socket_->Disconnected()) {
        return absl::UnavailableError(
            absl::StrCat("coordinator at ", endpoint, " closed the connection"));
      }
      if (!(in_items[0].revents & ZMQ_POLLIN)) continue;
      zmq::message_t msg;
      if (!socket_->socket.recv(msg, zmq::recv_flags::dontwait)) continue;
      // A REQ-style empty delimiter is not expected on a DEALER, but tolerate one.
      while (msg.size() == 0 && msg.more()) {
        if (!socket_->socket.recv(msg, zmq::recv_flags::dontwait)) break;
      }
      const bool more = msg.more();
      auto env = Decode(std::string_view(static_cast<const char*>(msg.data()), msg.size()));
      // Drain any further frames of this message; the protocol sends exactly one.
      while (more) {
        zmq::message_t rest;
        if (!socket_->socket.recv(rest, zmq::recv_flags::dontwait) || !rest.more()) break;
      }
      if (!env.ok()) {
        return absl::InternalError(absl::StrCat("coordinator at ", endpoint,
                                                " sent a message kiln cannot read: ",
                                                env.status().message()));
      }
      const bool ours =
          env->request_id() == request_id || (env->request_id().empty() && env->has_error());
      if (!ours) continue;  // a late reply to an earlier request that timed out
      if (env->has_error()) return StatusFromErrorReply(env->error());
      if (is_final(*env)) return *std::move(env);
      if (on_partial) on_partial(*env);
    }
  } catch (const zmq::error_t& e) {
    return absl::UnavailableError(
        absl::StrCat("talking to coordinator at ", endpoint, ": ", e.what()));
  }
}

absl::StatusOr<kiln::v1::JobReply> CoordinatorClient::Submit(const kiln::v1::JobSpec& spec) {
  kiln::v1::Envelope req;
  *req.mutable_submit()->mutable_spec() = spec;
  auto env = Call(
      std::move(req), 0, [](const auto&) { return true; }, nullptr);
  if (!env.ok()) return env.status();
  if (!env->has_job()) return UnexpectedReply(*env, "JobReply");
  return env->job();
}

absl::StatusOr<kiln::v1::JobInfo> CoordinatorClient::Status(const std::string& job_id,
                                                            bool include_png) {
  kiln::v1::Envelope req;
  req.mutable_status()->set_job_id(job_id);
  req.mutable_status()->set_include_png(include_png);
  auto env = Call(
      std::move(req), 0, [](const auto&) { return true; }, nullptr);
  if (!env.ok()) return env.status();
  if (!env->has_job()) return UnexpectedReply(*env, "JobReply");
  return env->job().job();
}

absl::StatusOr<kiln::v1::JobInfo> CoordinatorClient::Wait(const std::string& job_id,
                                                          uint32_t timeout_ms, bool include_png,
                                                          const ProgressFn& on_progress) {
  const bool stream = on_progress != nullptr;
  kiln::v1::Envelope req;
  auto* wait = req.mutable_wait();
  wait->set_job_id(job_id);
  wait->set_timeout_ms(timeout_ms);
  wait->set_include_png(include_png);
  wait->set_stream_progress(stream);
  auto is_final = [&](const kiln::v1::Envelope& env) {
    if (!env.has_job() || !stream || env.job().final()) return true;
    // A finished job ends the wait even if a coordinator forgot to mark the reply final.
    const auto& job = env.job().job();
    return IsTerminal(job.state()) &&
           (!include_png || job.state() != kiln::v1::JOB_STATE_SUCCEEDED || !job.png().empty());
  };
  auto on_partial = [&](const kiln::v1::Envelope& env) {
    if (env.has_job()) on_progress(env.job().job());
  };
  auto env = Call(std::move(req), timeout_ms, is_final, on_partial);
  if (!env.ok()) return env.status();
  if (!env->has_job()) return UnexpectedReply(*env, "JobReply");
  return env->job().job();
}

absl::StatusOr<kiln::v1::JobInfo> CoordinatorClient::Cancel(const std::string& job_id) {
  kiln::v1::Envelope req;
  req.mutable_cancel()->set_job_id(job_id);
  auto env = Call(
      std::move(req), 0, [](const auto&) { return true; }, nullptr);
  if (!env.ok()) return env.status();
  if (!env->has_job()) return UnexpectedReply(*env, "JobReply");
  return env->job().job();
}

absl::StatusOr<kiln::v1::ListNodesReply> CoordinatorClient::ListNodes() {
  kiln::v1::Envelope req;
  req.mutable_list_nodes();
  auto env = Call(
      std::move(req), 0, [](const auto&) { return true; }, nullptr);
  if (!env.ok()) return env.status();
  if (!env->has_nodes()) return UnexpectedReply(*env, "ListNodesReply");
  return env->nodes();
}

absl::StatusOr<kiln::v1::NodeStatus> CoordinatorClient::Drain(const std::string& node_id) {
  kiln::v1::Envelope req;
  req.mutable_drain()->set_node_id(node_id);
  auto env = Call(
      std::move(req), 0, [](const auto&) { return true; }, nullptr);
  if (!env.ok()) return env.status();
  if (!env->has_drain_reply()) return UnexpectedReply(*env, "DrainReply");
  return env->drain_reply().node();
}

absl::StatusOr<kiln::v1::NodeStatus> CoordinatorClient::Uncordon(const std::string& node_id) {
  kiln::v1::Envelope req;
  req.mutable_uncordon()->set_node_id(node_id);
  auto env = Call(
      std::move(req), 0, [](const auto&) { return true; }, nullptr);
  if (!env.ok()) return env.status();
  if (!env->has_uncordon_reply()) return UnexpectedReply(*env, "UncordonReply");
  return env->uncordon_reply().node();
}

absl::StatusOr<kiln::v1::RemoveNodeReply> CoordinatorClient::RemoveNode(const std::string& node_id,
                                                                        bool force) {
  kiln::v1::Envelope req;
  req.mutable_remove_node()->set_node_id(node_id);
  req.mutable_remove_node()->set_force(force);
  auto env = Call(
      std::move(req), 0, [](const auto&) { return true; }, nullptr);
  if (!env.ok()) return env.status();
  if (!env->has_remove_node_reply()) return UnexpectedReply(*env, "RemoveNodeReply");
  return env->remove_node_reply();
}

}  // namespace kiln::cli
