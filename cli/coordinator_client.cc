#include "cli/coordinator_client.h"

#include <unistd.h>

#include <chrono>
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

struct CoordinatorClient::Socket {
  zmq::context_t context{1};
  zmq::socket_t socket{context, zmq::socket_type::dealer};
};

absl::Status ClientOptions::Validate() const {
  if (endpoint.empty()) return absl::InvalidArgumentError("endpoint: empty");
  if (endpoint.find("://") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "endpoint: '", endpoint, "' is not a ZeroMQ endpoint (e.g. tcp://127.0.0.1:5555)"));
  }
  if (request_timeout_ms <= 0) {
    return absl::InvalidArgumentError("request_timeout_ms: must be positive");
  }
  return absl::OkStatus();
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

absl::StatusOr<std::unique_ptr<CoordinatorClient>> CoordinatorClient::Connect(
    const ClientOptions& options) {
  if (auto s = options.Validate(); !s.ok()) return s;
  auto socket = std::make_unique<Socket>();
  try {
    socket->socket.set(zmq::sockopt::linger, 0);
    socket->socket.connect(options.endpoint);
  } catch (const zmq::error_t& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot connect to coordinator at ", options.endpoint, ": ", e.what()));
  }
  return std::unique_ptr<CoordinatorClient>(new CoordinatorClient(options, std::move(socket)));
}

CoordinatorClient::CoordinatorClient(const ClientOptions& options, std::unique_ptr<Socket> socket)
    : options_(options), socket_(std::move(socket)) {}

CoordinatorClient::~CoordinatorClient() = default;

absl::StatusOr<kiln::v1::Envelope> CoordinatorClient::Call(
    kiln::v1::Envelope request, int64_t extra_ms,
    const std::function<bool(const kiln::v1::Envelope&)>& is_final,
    const std::function<void(const kiln::v1::Envelope&)>& on_partial) {
  const std::string request_id = absl::StrCat(getpid(), "-", next_request_++);
  request.set_request_id(request_id);
  const std::string frame = Encode(std::move(request));
  const int64_t budget_ms = options_.request_timeout_ms + extra_ms;
  const int64_t deadline = SteadyMs() + budget_ms;
  auto timed_out = [&] {
    return absl::DeadlineExceededError(
        absl::StrFormat("coordinator at %s did not answer within %.0fs (is it running?)",
                        options_.endpoint, budget_ms / 1000.0));
  };
  try {
    zmq::pollitem_t out_item{socket_->socket.handle(), 0, ZMQ_POLLOUT, 0};
    // A DEALER with no connected peer blocks on send; wait for the connection up to the deadline.
    while (true) {
      const int64_t left = deadline - SteadyMs();
      if (left <= 0) return timed_out();
      zmq::poll(&out_item, 1, std::chrono::milliseconds(std::min<int64_t>(left, 100)));
      if (out_item.revents & ZMQ_POLLOUT) break;
    }
    if (!socket_->socket.send(zmq::buffer(frame), zmq::send_flags::dontwait)) return timed_out();
    zmq::pollitem_t in_item{socket_->socket.handle(), 0, ZMQ_POLLIN, 0};
    while (true) {
      const int64_t left = deadline - SteadyMs();
      if (left <= 0) return timed_out();
      zmq::poll(&in_item, 1, std::chrono::milliseconds(left));
      if (!(in_item.revents & ZMQ_POLLIN)) continue;
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
        return absl::InternalError(
            absl::StrCat("coordinator at ", options_.endpoint,
                         " sent a message kiln cannot read: ", env.status().message()));
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
        absl::StrCat("talking to coordinator at ", options_.endpoint, ": ", e.what()));
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

}  // namespace kiln::cli
