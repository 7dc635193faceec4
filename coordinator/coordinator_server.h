// CoordinatorServer: the ZeroMQ adapter around a Coordinator. It binds a ROUTER for clients and a
// ROUTER for nodes and runs one poll thread that owns both sockets: it receives frames, decodes
// them (kiln::Decode), calls the Coordinator, and sends its replies and Outgoing messages; every
// few tens of ms it calls Coordinator::Tick (heartbeats, deaths, deadlines, wait timeouts).
//
// Frames: a client may be a DEALER ([identity][payload]) or a REQ ([identity][""][payload]); the
// reply echoes the delimiter. Nodes are DEALERs whose routing identity is the node id. Anything
// that is not one well-formed Envelope with a body accepted on that socket (garbage, truncated
// protobuf, another protocol_version, an empty frame, no body, the wrong number of frames, a node
// message on the client socket...) is answered with an ErrorReply and counted in
// kiln_protocol_errors_total{socket,reason}; the server keeps serving. Messages larger than
// max_message_bytes make libzmq drop that peer's connection (ZMQ_MAXMSGSIZE) before they are
// read. Sends never block the loop: a peer that does not read loses messages past the socket's
// high-water mark (ROUTER semantics).
//
// Authentication (docs/security.md): with curve_secret_key set, both sockets are CURVE servers
// and a ZapAuthenticator (coordinator/zap_authenticator.h) lets in only allowlisted keys. Each
// message's sender is its authenticated key (ZAP User-Id), not its routing id:
//   - client requests are checked against a table by request type (AccessFor): any client may
//     submit and list nodes; status, wait and cancel need the job's owner or an admin key; every
//     other request (drain, and any added later) needs an admin key. Refusals are
//     PERMISSION_DENIED, counted as protocol errors with reason "forbidden".
//   - a node id is bound to the key that registered it while the node is live: a message about
//     it from another key is refused ("forbidden"), and so is a RegisterNode for a live node id
//     from another key. ROUTER_HANDOVER is off, so a second connection with a live node's routing
//     id is not attached at all (libzmq ignores a duplicate routing id); ZMTP heartbeats on the
//     node socket close a dead node's connection within node_heartbeat_timeout_ms so it can
//     come back.
// Without a key (plaintext, development only) everyone is an admin and node ids are not bound.
//
// Clients that go away: a socket monitor on the client ROUTER (connections accepted and closed,
// by file descriptor) and each message's ZMQ_SRCFD tell the poll loop which reply routes a closed
// connection used (ClientConnections); their pending Waits are dropped unanswered
// (Coordinator::DropWaitsOf), so they stop holding the client key's caps.
//
// Threads: Start() creates the sockets and the poll thread; after that only the poll thread
// touches the sockets and the Coordinator, until Stop() (or the destructor) joins it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/coordinator.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/zap_authenticator.h"

namespace kiln::coordinator {

struct CoordinatorServerOptions {
  // ZeroMQ endpoints to bind. Port 0 ("tcp://127.0.0.1:0") or "*" picks a free port; the bound
  // endpoints are reported by client_endpoint() / node_endpoint().
  std::string client_endpoint = "tcp://127.0.0.1:7700";
  std::string node_endpoint = "tcp://127.0.0.1:7701";
  int64_t max_message_bytes = 64 << 20;  // bytes; larger inbound messages drop the connection
  int tick_interval_ms = 20;             // ms between Coordinator::Tick calls (poll timeout)
  int max_batch = 256;                   // messages read per socket per loop turn (fairness)
  int send_high_water_mark = 10000;      // messages queued per peer before sends are dropped
  // Called on the poll thread after every Coordinator::Tick, with the coordinator (read-only);
  // e.g. the status page's snapshot (coordinator/status_board.h). Null: none.
  std::function<void(const Coordinator&)> after_tick;
  // CURVE: the coordinator's secret key (Z85). Empty: plaintext, no authentication.
  std::string curve_secret_key;
  ZapAuthenticatorOptions auth;              // allowlists (with curve_secret_key)
  prometheus::Registry* auth_registry = nullptr;  // ZAP metrics go here; null: not exported
  int node_heartbeat_interval_ms = 1000;    // ms between ZMTP pings on node connections
  int node_heartbeat_timeout_ms = 5000;     // ms without traffic after which one is closed

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;
};

// "tcp://HOST:0" → "tcp://HOST:*" (ZeroMQ's spelling of "any free port"); others unchanged.
std::string BindableEndpoint(const std::string& endpoint);
// A bound endpoint a local peer can connect to: "tcp://0.0.0.0:P" / "tcp://*:P" →
// "tcp://127.0.0.1:P"; others unchanged.
std::string ConnectableEndpoint(const std::string& endpoint);

class CoordinatorServer {
 public:
  // Binds both sockets and starts the poll thread. `coordinator`, `metrics` and `log` must
  // outlive the server; the coordinator must not be used by anyone else while it runs.
  // InvalidArgument for bad options; Unavailable when an endpoint cannot be bound.
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(
      const CoordinatorServerOptions& options, Coordinator& coordinator,
      CoordinatorMetrics& metrics, EventLog log = nullptr);
  ~CoordinatorServer();  // Stop()
  CoordinatorServer(const CoordinatorServer&) = delete;
  CoordinatorServer& operator=(const CoordinatorServer&) = delete;

  // Stops the poll thread (within tick_interval_ms) and closes the sockets. Idempotent; call
  // from any thread but the poll thread.
  void Stop();

  // The endpoints actually bound, e.g. "tcp://127.0.0.1:41234".
  const std::string& client_endpoint() const { return client_endpoint_; }
  const std::string& node_endpoint() const { return node_endpoint_; }
  // Re-read the allowlists now (SIGHUP). Nothing over plaintext. Thread-safe.
  void ReloadKeys();

  struct Sockets;  // opaque: the ZeroMQ context and sockets (kept out of this header)

 private:
  CoordinatorServer(const CoordinatorServerOptions& options, Coordinator& coordinator,
                    CoordinatorMetrics& metrics, EventLog log);
  void Loop();

  const CoordinatorServerOptions options_;
  Coordinator& coordinator_;
  CoordinatorMetrics& metrics_;
  EventLog log_;
  std::unique_ptr<Sockets> sockets_;  // used only by thread_ once it runs
  std::string client_endpoint_;
  std::string node_endpoint_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace kiln::coordinator
