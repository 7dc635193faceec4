#include "coordinator/coordinator_server.h"

#include <cerrno>
#include <cstring>
#include <chrono>
#include <exception>
#include <iterator>
#include <map>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/clock.h"
#include "common/curve_keys.h"
#include "common/log.h"
#include "common/wire.h"
#include "coordinator/client_connections.h"
#include "coordinator/validation.h"
#include "zmq.hpp"
#include "zmq_addon.hpp"

namespace kiln::coordinator {
namespace {

enum class Side { kClient, kNode };

const char* SideName(Side side) { return side == Side::kClient ? "client" : "node"; }

// How to answer a peer: its ROUTER identity, and whether it sent a REQ-style empty delimiter.
struct Route {
  std::string identity;
  bool delimiter = false;
};

// ReplyTo::peer for the Coordinator: the route packed into one opaque string.
std::string PackRoute(const Route& r) { return (r.delimiter ? "R" : "D") + r.identity; }
Route UnpackRoute(const std::string& peer) {
  if (peer.empty()) return {};
  return Route{peer.substr(1), peer[0] == 'R'};
}
// The route of a message as a ROUTER delivers it: [identity]([""])[payload...].
Route RouteOf(const std::vector<zmq::message_t>& parts) {
  return Route{parts[0].to_string(), parts.size() >= 3 && parts[1].size() == 0};
}

// The client socket's monitor (zmq_socket_monitor): connections accepted and closed, each with
// its file descriptor, which ClientConnections matches with the messages' ZMQ_SRCFD.
constexpr char kClientMonitorEndpoint[] = "inproc://kiln-client-monitor";
constexpr int kClientMonitorEvents = ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED;


// Who may send each client request (the role table). Ownership of a job is checked by the
// Coordinator (Caller); the table says whether a plain client may try at all.
enum class Access { kAnyClient, kOwnerOrAdmin, kAdmin };
Access AccessFor(kiln::v1::Envelope::BodyCase body) {
  using E = kiln::v1::Envelope;
  switch (body) {
    case E::kSubmit:
    case E::kListNodes:
      return Access::kAnyClient;
    case E::kStatus:
    case E::kWait:
    case E::kCancel:
      return Access::kOwnerOrAdmin;
    case E::kDrain:
    case E::kUncordon:
    case E::kRemoveNode:
    default:  // and any request added later, until it is given a row here
      return Access::kAdmin;
  }
}

std::string BodyName(const kiln::v1::Envelope& env) {
  const auto* field = env.GetDescriptor()->FindFieldByNumber(env.body_case());
  return field ? field->name() : absl::StrCat("field ", static_cast<int>(env.body_case()));
}

}  // namespace

struct CoordinatorServer::Sockets {
  zmq::context_t context{1};
  zmq::socket_t client{context, zmq::socket_type::router};
  zmq::socket_t node{context, zmq::socket_type::router};
  zmq::socket_t client_monitor{context, zmq::socket_type::pair};  // the client socket's events
  bool curve = false;                       // both sockets are CURVE servers
  std::unique_ptr<prometheus::Registry> private_registry;  // auth metrics when none is given
  std::unique_ptr<ZapAuthenticator> auth;   // declared after the sockets: stopped first
  // Rate limit for protocol-error log lines (they are always counted).
  int64_t last_error_log_ms = 0;
  int64_t errors_not_logged = 0;

  zmq::socket_t& socket(Side side) { return side == Side::kClient ? client : node; }
};

namespace {

// The per-message work of the poll thread: decode, call the coordinator, send.
class ServerLoop {
 public:
  ServerLoop(const CoordinatorServerOptions& options, Coordinator& coordinator,
             CoordinatorMetrics& metrics, const EventLog& log,
             CoordinatorServer::Sockets& sockets)
      : options_(options),
        coordinator_(coordinator),
        metrics_(metrics),
        log_(log),
        sockets_(sockets) {}

  // Reads up to max_batch messages from `side`, handling each.
  void Read(Side side) {
    zmq::socket_t& socket = sockets_.socket(side);
    for (int i = 0; i < options_.max_batch; ++i) {
      std::vector<zmq::message_t> parts;
      zmq::recv_result_t received;
      try {
        received = zmq::recv_multipart(socket, std::back_inserter(parts),
                                       zmq::recv_flags::dontwait);
        if (received) peer_ = PeerOf(side, parts.back());
      } catch (const zmq::error_t& e) {
        metrics_.internal_errors.Increment();
        Log(absl::StrCat("receive on the ", SideName(side), " socket failed: ", e.what()));
        break;
      }
      if (!received) break;  // nothing more for now
      // The connection this came in on; read the monitor's events first (ClientConnections
      // relies on seeing a connection's close before any later message on its descriptor).
      std::string gone_peer;
      if (side == Side::kClient && parts.size() >= 2) {
        ReadClientEvents();
        const std::string peer = PackRoute(RouteOf(parts));
        if (connections_.Seen(zmq_msg_get(parts.back().handle(), ZMQ_SRCFD), peer)) {
          gone_peer = peer;  // its connection closed before we read this
        }
      }
      try {
        Handle(side, parts);
        if (!gone_peer.empty()) DropWaitsOf(gone_peer);
      } catch (const std::exception& e) {
        // A bug or memory exhaustion while handling one message must not take the loop down.
        metrics_.internal_errors.Increment();
        Log(absl::StrCat("internal error handling a ", SideName(side), " message: ", e.what()));
      }
      Flush();
    }
    SubmitPending();
  }

  // Group commit: the Submits read in a row are written to the job store together
  // (Coordinator::SubmitBatch: one script and one fsync in Redis) and answered after that write.
  // Any other client message first submits those before it, so each client's requests are
  // answered in the order it sent them.
  void SubmitPending() {
    if (pending_.empty()) return;
    std::vector<const kiln::v1::SubmitRequest*> requests;
    requests.reserve(pending_.size());
    std::vector<Caller> callers;
    callers.reserve(pending_.size());
    for (const PendingSubmit& p : pending_) {
      requests.push_back(&p.envelope.submit());
      callers.push_back(p.caller);
    }
    size_t answered = 0;
    try {
      auto replies = coordinator_.SubmitBatch(requests, callers);
      for (; answered < pending_.size(); ++answered) {
        Answer(pending_[answered].route, pending_[answered].envelope.request_id(),
               std::move(replies[answered]), [](kiln::v1::Envelope& out, kiln::v1::JobReply r) {
                 *out.mutable_job() = std::move(r);
               });
      }
    } catch (const std::exception& e) {
      metrics_.internal_errors.Increment();
      Log(absl::StrCat("internal error handling ", pending_.size(), " submits: ", e.what()));
      // Whatever was stored is found again when the client resubmits (idempotent).
      for (; answered < pending_.size(); ++answered) {
        Answer(pending_[answered].route, pending_[answered].envelope.request_id(),
               absl::StatusOr<kiln::v1::JobReply>(absl::InternalError(absl::StrCat(
                   "internal error while submitting: ", e.what(), "; submit it again"))),
               [](kiln::v1::Envelope& out, kiln::v1::JobReply r) {
                 *out.mutable_job() = std::move(r);
               });
      }
    }
    pending_.clear();
    Flush();
  }

  // Handles the client socket's connection events: the pending waits of a connection that closed
  // are dropped (Coordinator::DropWaitsOf); nobody can receive their answers.
  void ReadClientEvents() {
    for (;;) {
      std::vector<zmq::message_t> event;
      try {
        if (!zmq::recv_multipart(sockets_.client_monitor, std::back_inserter(event),
                                 zmq::recv_flags::dontwait)) {
          return;
        }
      } catch (const zmq::error_t& e) {
        metrics_.internal_errors.Increment();
        Log(absl::StrCat("receive on the client socket's monitor failed: ", e.what()));
        return;
      }
      // Frame 1: event (uint16) and value (uint32: the descriptor), host order; frame 2: the
      // endpoint.
      if (event.empty() || event[0].size() < 6) continue;
      uint16_t id = 0;
      uint32_t value = 0;
      std::memcpy(&id, event[0].data(), sizeof(id));
      std::memcpy(&value, static_cast<const char*>(event[0].data()) + sizeof(id), sizeof(value));
      const int fd = static_cast<int>(value);
      const std::vector<std::string> gone = id == ZMQ_EVENT_ACCEPTED ? connections_.Accepted(fd)
                                            : id == ZMQ_EVENT_DISCONNECTED
                                                ? connections_.Disconnected(fd)
                                                : std::vector<std::string>{};
      for (const std::string& peer : gone) DropWaitsOf(peer);
    }
  }

  void Tick(const std::function<void(const Coordinator&)>& after_tick) {
    coordinator_.Tick();
    Flush();
    if (after_tick) after_tick(coordinator_);
  }

  // Sends everything the coordinator queued.
  void Flush() {
    for (Outgoing& out : coordinator_.TakeOutgoing()) {
      const std::string payload = kiln::Encode(std::move(out.envelope));
      if (out.socket == Outgoing::Socket::kNode) {
        Send(Side::kNode, Route{out.peer, false}, payload);
      } else {
        Send(Side::kClient, UnpackRoute(out.peer), payload);
      }
    }
  }

 private:
  void DropWaitsOf(const std::string& peer) {
    try {
      coordinator_.DropWaitsOf(peer);
    } catch (const std::exception& e) {
      metrics_.internal_errors.Increment();
      Log(absl::StrCat("internal error dropping the waits of a closed connection: ", e.what()));
    }
  }

  // The authenticated sender of `message` (ZAP User-Id); over plaintext, everyone is trusted.
  Peer PeerOf(Side side, zmq::message_t& message) const {
    if (!sockets_.curve) {
      return Peer{side == Side::kClient ? PeerRole::kAdmin : PeerRole::kNode, ""};
    }
    const char* user_id = zmq_msg_gets(message.handle(), "User-Id");
    return user_id == nullptr ? Peer{} : ParseUserId(user_id);
  }

  void Handle(Side side, std::vector<zmq::message_t>& parts) {
    if (parts.size() < 2) return;  // a ROUTER always adds the identity; nothing to answer
    const Route route = RouteOf(parts);
    const size_t expected = route.delimiter ? 3 : 2;
    if (parts.size() != expected) {
      ProtocolError(side, route, "frames",
                    absl::InvalidArgumentError(absl::StrCat(
                        "expected one message frame after the routing envelope, got ",
                        parts.size() - (route.delimiter ? 2 : 1), " frames")),
                    "");
      return;
    }
    const zmq::message_t& payload = parts[expected - 1];
    if (payload.size() == 0) {
      ProtocolError(side, route, "empty", absl::InvalidArgumentError("empty message frame"), "");
      return;
    }
    auto env = kiln::Decode(payload.to_string_view());
    if (!env.ok()) {
      // Say which way it was wrong, and echo request_id when the bytes parse at all.
      kiln::v1::Envelope probe;
      const bool parsed = probe.ParseFromArray(payload.data(), static_cast<int>(payload.size()));
      const char* reason = !parsed                                           ? "malformed"
                           : probe.protocol_version() != kiln::kProtocolVersion ? "version"
                                                                               : "no_body";
      ProtocolError(side, route, reason, env.status(), parsed ? probe.request_id() : "");
      return;
    }
    if (side == Side::kClient) {
      HandleClient(route, *env);
    } else {
      HandleNode(route, *env);
    }
  }

  void HandleClient(const Route& route, kiln::v1::Envelope& env) {
    using E = kiln::v1::Envelope;
    const std::string& rid = env.request_id();
    const bool admin = peer_.role == PeerRole::kAdmin;
    if (!admin && (peer_.role != PeerRole::kClient || AccessFor(env.body_case()) == Access::kAdmin)) {
      SubmitPending();
      return ProtocolError(Side::kClient, route, "forbidden",
                           absl::PermissionDeniedError(absl::StrCat(
                               BodyName(env), " needs an admin key; this connection's key (",
                               peer_.key.empty() ? "none" : peer_.key, ") is a ",
                               PeerRoleName(peer_.role), " key")),
                           rid);
    }
    const Caller caller{peer_.key, admin};
    if (env.body_case() == E::kSubmit) {
      // Group commit: stored together with the Submits that arrive in the same poll round.
      pending_.push_back(PendingSubmit{route, std::move(env), caller});
      return;
    }
    SubmitPending();
    switch (env.body_case()) {
      case E::kStatus:
        return Answer(route, rid, coordinator_.Status(env.status(), caller),
                      [](E& out, kiln::v1::JobReply r) { *out.mutable_job() = std::move(r); });
      case E::kWait: {
        auto reply = coordinator_.Wait(env.wait(), ReplyTo{PackRoute(route), rid}, caller);
        if (reply.ok() && !reply->has_value()) return;  // answered later
        return Answer(route, rid, reply, [](E& out, std::optional<kiln::v1::JobReply> r) {
          *out.mutable_job() = std::move(*r);
        });
      }
      case E::kCancel:
        return Answer(route, rid, coordinator_.Cancel(env.cancel(), caller),
                      [](E& out, kiln::v1::JobReply r) { *out.mutable_job() = std::move(r); });
      case E::kListNodes:
        return Answer(route, rid,
                      absl::StatusOr<kiln::v1::ListNodesReply>(coordinator_.ListNodes()),
                      [](E& out, kiln::v1::ListNodesReply r) {
                        *out.mutable_nodes() = std::move(r);
                      });
      case E::kDrain:
        return Answer(route, rid, coordinator_.Drain(env.drain()),
                      [](E& out, kiln::v1::DrainReply r) {
                        *out.mutable_drain_reply() = std::move(r);
                      });
      case E::kUncordon:
        return Answer(route, rid, coordinator_.Uncordon(env.uncordon()),
                      [](E& out, kiln::v1::UncordonReply r) {
                        *out.mutable_uncordon_reply() = std::move(r);
                      });
      case E::kRemoveNode:
        return Answer(route, rid, coordinator_.RemoveNode(env.remove_node()),
                      [](E& out, kiln::v1::RemoveNodeReply r) {
                        *out.mutable_remove_node_reply() = std::move(r);
                      });
      default:
        return ProtocolError(Side::kClient, route, "unexpected",
                             absl::UnimplementedError(absl::StrCat(
                                 "message type ", BodyName(env),
                                 " is not accepted on the client socket")),
                             rid);
    }
  }

  void HandleNode(const Route& route, const kiln::v1::Envelope& env) {
    const std::string& rid = env.request_id();
    const std::string& node_id = route.identity;
    using E = kiln::v1::Envelope;
    absl::Status status;
    // A node id belongs to the key that registered it while that node is live.
    if (sockets_.curve) {
      auto bound = node_keys_.find(node_id);
      const bool other_key = bound != node_keys_.end() && bound->second != peer_.key;
      if (peer_.role != PeerRole::kNode ||
          (other_key && (env.body_case() != E::kRegisterNode || coordinator_.NodeIsLive(node_id)))) {
        return ProtocolError(Side::kNode, route, "forbidden",
                             absl::PermissionDeniedError(absl::StrCat(
                                 "node id ", node_id,
                                 " is registered by another node key; this connection's key (",
                                 peer_.key.empty() ? "none" : peer_.key, ") may not speak for it")),
                             rid);
      }
    }
    switch (env.body_case()) {
      case E::kRegisterNode: {
        auto ack = coordinator_.RegisterNode(node_id, env.register_node());
        if (!ack.ok()) return NodeRefused(route, ack.status(), rid);
        if (sockets_.curve) {
          node_keys_[node_id] = peer_.key;
          if (node_keys_.size() > 4 * coordinator_.options().max_nodes) PruneNodeKeys();
        }
        kiln::v1::Envelope out;
        out.set_request_id(rid);
        *out.mutable_register_ack() = *ack;
        return Send(Side::kNode, route, kiln::Encode(std::move(out)));
      }
      case E::kHeartbeat:
        status = coordinator_.Heartbeat(node_id, env.heartbeat());
        break;
      case E::kProgress:
        status = coordinator_.Progress(node_id, env.progress());
        break;
      case E::kResult:
        status = coordinator_.Result(node_id, env.result());
        break;
      case E::kDeregister:
        status = coordinator_.Deregister(node_id, env.deregister());
        break;
      default:
        return ProtocolError(Side::kNode, route, "unexpected",
                             absl::UnimplementedError(absl::StrCat(
                                 "message type ", BodyName(env),
                                 " is not accepted on the node socket")),
                             rid);
    }
    if (!status.ok()) NodeRefused(route, status, rid);
  }

  // A node message the coordinator refused: answered and counted as a protocol error.
  void NodeRefused(const Route& route, const absl::Status& status, const std::string& rid) {
    ProtocolError(Side::kNode, route,
                  absl::IsFailedPrecondition(status) ? "unregistered" : "rejected", status, rid);
  }

  template <typename T, typename Set>
  void Answer(const Route& route, const std::string& rid, absl::StatusOr<T> result, Set set) {
    kiln::v1::Envelope out;
    if (result.ok()) {
      out.set_request_id(rid);
      set(out, std::move(*result));
    } else {
      out = kiln::ErrorEnvelope(result.status(), rid, ErrorField(result.status()));
    }
    Send(Side::kClient, route, kiln::Encode(std::move(out)));
  }

  void ProtocolError(Side side, const Route& route, const std::string& reason,
                     const absl::Status& status, const std::string& rid) {
    metrics_.CountProtocolError(SideName(side), reason);
    Send(side, route, kiln::Encode(kiln::ErrorEnvelope(status, rid, ErrorField(status))));
    const int64_t now = SteadyMs();
    if (now - sockets_.last_error_log_ms < 1000) {
      ++sockets_.errors_not_logged;
      return;
    }
    sockets_.last_error_log_ms = now;
    std::string more;
    if (sockets_.errors_not_logged > 0) {
      more = absl::StrCat(" (", sockets_.errors_not_logged, " more since the last such line)");
    }
    sockets_.errors_not_logged = 0;
    Log(absl::StrCat("protocol error on the ", SideName(side), " socket (", reason, "): ",
                     status.message(), more));
  }

  void Send(Side side, const Route& route, const std::string& payload) {
    zmq::socket_t& socket = sockets_.socket(side);
    try {
      // A ROUTER drops what it cannot route or queue instead of blocking (no ROUTER_MANDATORY).
      constexpr auto kMore = zmq::send_flags::sndmore | zmq::send_flags::dontwait;
      socket.send(zmq::buffer(route.identity), kMore);
      if (route.delimiter) socket.send(zmq::message_t(), kMore);
      socket.send(zmq::buffer(payload), zmq::send_flags::dontwait);
    } catch (const zmq::error_t& e) {
      metrics_.send_errors.Increment();
      Log(absl::StrCat("send on the ", SideName(side), " socket failed: ", e.what()));
    }
  }

  void Log(const std::string& line) {
    if (log_) log_(line);
  }

  struct PendingSubmit {
    Route route;
    kiln::v1::Envelope envelope;
    Caller caller;
  };

  // Forgets the keys of node ids that are not live (bounds node_keys_ under id churn).
  void PruneNodeKeys() {
    for (auto it = node_keys_.begin(); it != node_keys_.end();) {
      it = coordinator_.NodeIsLive(it->first) ? std::next(it) : node_keys_.erase(it);
    }
  }

  const CoordinatorServerOptions& options_;
  Coordinator& coordinator_;
  CoordinatorMetrics& metrics_;
  const EventLog& log_;
  CoordinatorServer::Sockets& sockets_;
  std::vector<PendingSubmit> pending_;  // Submits read but not yet stored (SubmitPending)
  Peer peer_;                                        // sender of the message being handled
  ClientConnections connections_;                    // client routes by connection
  std::map<std::string, std::string> node_keys_;     // node id → the key that registered it
};

}  // namespace

absl::Status CoordinatorServerOptions::Validate() const {
  if (client_endpoint.empty()) return InvalidField("client_endpoint", "must not be empty");
  if (node_endpoint.empty()) return InvalidField("node_endpoint", "must not be empty");
  if (client_endpoint == node_endpoint && !absl::EndsWith(client_endpoint, ":0") &&
      !absl::EndsWith(client_endpoint, ":*")) {
    return InvalidField("node_endpoint", "must differ from client_endpoint");
  }
  if (max_message_bytes < 1024) {
    return InvalidField("max_message_bytes", absl::StrCat(max_message_bytes, " is below 1024"));
  }
  if (tick_interval_ms < 1 || tick_interval_ms > 1000) {
    return InvalidField("tick_interval_ms", absl::StrCat(tick_interval_ms, " is not in 1..1000"));
  }
  if (max_batch < 1) return InvalidField("max_batch", "must be at least 1");
  if (!curve_secret_key.empty() && !IsCurveKey(curve_secret_key)) {
    return InvalidField("curve_secret_key", "not a 40-character Z85 CURVE key");
  }
  if (auth.check_interval_ms < 1) return InvalidField("auth.check_interval_ms", "must be >= 1");
  if (node_heartbeat_interval_ms < 1 || node_heartbeat_timeout_ms < node_heartbeat_interval_ms) {
    return InvalidField("node_heartbeat_timeout_ms",
                        "needs node_heartbeat_interval_ms >= 1 and a timeout at least as long");
  }
  if (send_high_water_mark < 0) {
    return InvalidField("send_high_water_mark", "must not be negative (0 = no limit)");
  }
  return absl::OkStatus();
}

std::string BindableEndpoint(const std::string& endpoint) {
  if (absl::StartsWith(endpoint, "tcp://") && absl::EndsWith(endpoint, ":0")) {
    return endpoint.substr(0, endpoint.size() - 1) + "*";
  }
  return endpoint;
}

std::string ConnectableEndpoint(const std::string& endpoint) {
  for (const char* any : {"tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"}) {
    if (absl::StartsWith(endpoint, any)) {
      return absl::StrCat("tcp://127.0.0.1:", endpoint.substr(std::string(any).size()));
    }
  }
  return endpoint;
}

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(
    const CoordinatorServerOptions& options, Coordinator& coordinator,
    CoordinatorMetrics& metrics, EventLog log) {
  if (auto s = options.Validate(); !s.ok()) return s;
  std::unique_ptr<CoordinatorServer> server(
      new CoordinatorServer(options, coordinator, metrics, std::move(log)));
  try {
    server->sockets_ = std::make_unique<Sockets>();
  } catch (const zmq::error_t& e) {
    return absl::InternalError(absl::StrCat("cannot create ZeroMQ sockets: ", e.what()));
  }
  Sockets& s = *server->sockets_;
  if (!options.curve_secret_key.empty()) {
    s.curve = true;
    prometheus::Registry* registry = options.auth_registry;
    if (registry == nullptr) {
      s.private_registry = std::make_unique<prometheus::Registry>();
      registry = s.private_registry.get();
    }
    auto auth = ZapAuthenticator::Start(s.context, options.auth, *registry, server->log_);
    if (!auth.ok()) return auth.status();
    s.auth = std::move(*auth);
  }
  // Before the client socket binds, so that no connection is missed.
  try {
    if (zmq_socket_monitor(s.client.handle(), kClientMonitorEndpoint, kClientMonitorEvents) != 0) {
      throw zmq::error_t();
    }
    s.client_monitor.set(zmq::sockopt::linger, 0);
    s.client_monitor.set(zmq::sockopt::rcvhwm, 0);  // no limit: an event lost would leak waits
    s.client_monitor.connect(kClientMonitorEndpoint);
  } catch (const zmq::error_t& e) {
    return absl::InternalError(absl::StrCat("cannot monitor the client socket: ", e.what()));
  }
  for (auto [side, endpoint, bound] :
       {std::make_tuple(Side::kClient, options.client_endpoint, &server->client_endpoint_),
        std::make_tuple(Side::kNode, options.node_endpoint, &server->node_endpoint_)}) {
    zmq::socket_t& socket = s.socket(side);
    try {
      socket.set(zmq::sockopt::linger, 0);
      socket.set(zmq::sockopt::maxmsgsize, options.max_message_bytes);
      socket.set(zmq::sockopt::sndhwm, options.send_high_water_mark);
      if (s.curve) {
        if (auto st = ApplyCurveServer(socket.handle(), options.curve_secret_key,
                                       SideName(side));
            !st.ok()) {
          return st;
        }
      }
      // No ROUTER_HANDOVER: a second connection with a live node's routing id must not take its
      // route. ZMTP heartbeats close a vanished node's connection so its id frees up.
      if (side == Side::kNode) {
        socket.set(zmq::sockopt::heartbeat_ivl, options.node_heartbeat_interval_ms);
        socket.set(zmq::sockopt::heartbeat_timeout, options.node_heartbeat_timeout_ms);
      }
    } catch (const zmq::error_t& e) {
      return absl::InternalError(absl::StrCat("socket options: ", e.what()));
    }
    try {
      socket.bind(BindableEndpoint(endpoint));
      *bound = socket.get(zmq::sockopt::last_endpoint);
    } catch (const zmq::error_t& e) {
      return absl::UnavailableError(absl::StrCat("cannot bind the ", SideName(side),
                                                 " socket to ", endpoint, ": ", e.what()));
    }
  }
  server->thread_ = std::thread(&CoordinatorServer::Loop, server.get());
  return server;
}

CoordinatorServer::CoordinatorServer(const CoordinatorServerOptions& options,
                                     Coordinator& coordinator, CoordinatorMetrics& metrics,
                                     EventLog log)
    : options_(options),
      coordinator_(coordinator),
      metrics_(metrics),
      log_(log ? std::move(log) : kiln::LineLogger("coordinator")) {}

CoordinatorServer::~CoordinatorServer() { Stop(); }

void CoordinatorServer::ReloadKeys() {
  if (sockets_ != nullptr && sockets_->auth != nullptr) sockets_->auth->RequestReload();
}

void CoordinatorServer::Stop() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  sockets_.reset();
}

void CoordinatorServer::Loop() {
  ServerLoop loop(options_, coordinator_, metrics_, log_, *sockets_);
  zmq_pollitem_t items[3] = {
      {sockets_->client.handle(), 0, ZMQ_POLLIN, 0},
      {sockets_->node.handle(), 0, ZMQ_POLLIN, 0},
      {sockets_->client_monitor.handle(), 0, ZMQ_POLLIN, 0},
  };
  int64_t next_tick_ms = 0;
  while (!stop_.load()) {
    try {
      zmq::poll(items, 3, std::chrono::milliseconds(options_.tick_interval_ms));
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;
      metrics_.internal_errors.Increment();
      if (log_) log_(absl::StrCat("poll failed: ", e.what()));
      std::this_thread::sleep_for(std::chrono::milliseconds(options_.tick_interval_ms));
      continue;
    }
    if (items[0].revents & ZMQ_POLLIN) loop.Read(Side::kClient);
    if (items[1].revents & ZMQ_POLLIN) loop.Read(Side::kNode);
    if (items[2].revents & ZMQ_POLLIN) loop.ReadClientEvents();
    const int64_t now = SteadyMs();
    if (now >= next_tick_ms) {
      next_tick_ms = now + options_.tick_interval_ms;
      try {
        loop.Tick(options_.after_tick);
      } catch (const std::exception& e) {
        metrics_.internal_errors.Increment();
        if (log_) log_(absl::StrCat("internal error in Tick: ", e.what()));
      }
    }
  }
}

}  // namespace kiln::coordinator
