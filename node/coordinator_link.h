// The node's view of its coordinator connection, as plain logic driven by an injected clock
// (no sockets): when to connect, when to heartbeat, when the coordinator counts as dead, and the
// reconnect backoff. NodeSession asks it and has the channel do the socket work.
//
//   kDisconnected --(connect due; the session connects, sends RegisterNode)--> kRegistering
//   kRegistering  --(RegisterAck)--> kRegistered
//   kRegistered   --(coordinator says "not registered"; RegisterNode sent again)--> kRegistering
//   kRegistering / kRegistered --(nothing heard for missed_heartbeats intervals)--> kDisconnected
//
// Reconnect delays double from backoff_initial_ms up to backoff_max_ms and start over once a
// registration succeeds. The first connection is immediate.
//
// Several coordinator endpoints (an active and its standbys): every disconnect moves on to the
// next endpoint, so a coordinator that stays silent (a standby binds nothing until it leads, a
// dead one answers nothing) is left for the next. Within one round of the endpoints the next one
// is tried after backoff_initial_ms; the delay doubles once per full round without a
// registration.
//
// Threads: thread-compatible; owned by the node's I/O thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/clock.h"

namespace kiln::node {

struct LinkOptions {
  int64_t heartbeat_interval_ms = 1000;  // until RegisterAck sets the coordinator's interval
  int missed_heartbeats = 3;             // silent intervals after which the coordinator is dead
  int64_t backoff_initial_ms = 100;      // first reconnect delay
  int64_t backoff_max_ms = 5000;         // reconnect delay cap

  absl::Status Validate() const;  // InvalidArgument naming the field
};

// "tcp://A:5556,tcp://B:5556" → its endpoints, in order, blanks dropped.
std::vector<std::string> SplitEndpoints(absl::string_view list);

class CoordinatorLink {
 public:
  enum class State { kDisconnected, kRegistering, kRegistered };

  // `endpoints` must not be empty: the coordinator endpoints, tried in turn from the first.
  CoordinatorLink(const LinkOptions& options, const Clock& clock,
                  std::vector<std::string> endpoints);

  State state() const { return state_; }
  bool registered() const { return state_ == State::kRegistered; }
  int64_t heartbeat_interval_ms() const { return interval_ms_; }
  // Delay the next reconnect will wait (for logs and tests).
  int64_t next_backoff_ms() const;
  // The endpoint to connect to next (while disconnected) or connected to now.
  const std::string& endpoint() const { return endpoints_[current_]; }
  const std::vector<std::string>& endpoints() const { return endpoints_; }

  // Disconnected and the backoff has passed.
  bool ShouldConnect() const;
  // RegisterNode was sent: on a fresh socket, or again on the open one because the coordinator
  // no longer knows the node (it answered FAILED_PRECONDITION "not registered").
  void OnRegisterSent();
  // Any frame from the coordinator, well-formed or not, shows it is alive.
  void OnHeard();
  // RegisterAck; `heartbeat_interval_ms` 0 keeps the current interval.
  void OnRegistered(uint32_t heartbeat_interval_ms);
  // Registered and an interval has passed since the last heartbeat sent.
  bool HeartbeatDue() const;
  void OnHeartbeatSent();
  // Connected (registering or registered) and silent for missed_heartbeats intervals.
  bool PeerDead() const;
  // The socket was closed (dead peer, refused registration): move on to the next endpoint and
  // schedule the connect.
  void OnDisconnected();
  // Milliseconds until one of the predicates above may change on its own (poll timeout), >= 0.
  int64_t MsUntilNextEvent() const;

 private:
  LinkOptions options_;
  const Clock& clock_;
  const std::vector<std::string> endpoints_;
  size_t current_ = 0;  // index into endpoints_
  State state_ = State::kDisconnected;
  int64_t interval_ms_;
  int64_t backoff_ms_;  // the delay after a full round of endpoints without a registration
  int64_t connect_at_ms_;  // kDisconnected: connect when NowMs() reaches this
  int64_t last_heard_ms_ = 0;
  int64_t last_heartbeat_ms_ = 0;
};

}  // namespace kiln::node
