// ZapAuthenticator: the coordinator's ZeroMQ ZAP handler (RFC 27) for CURVE. Its thread binds
// inproc://zeromq.zap.01 in the server's context and answers every handshake on the two CURVE
// server sockets: a peer is let in only when its public key is in the allowlist for the socket's
// ZAP domain —
//   domain "node":   the node keys                       → User-Id "node:<Z85 key>"
//   domain "client": the client keys and the admin keys  → User-Id "client:<key>" / "admin:<key>"
// The server reads User-Id from each message (zmq_msg_gets) to learn who sent it (ParseUserId).
//
// Allowlists (common/curve_keys.h formats) are re-read without a restart: when their files change
// (checked every check_interval_ms) and when RequestReload() is called (kiln-coordinator calls it
// on SIGHUP). A reload that fails keeps the previous lists (logged, counted). A reload affects new
// handshakes only: a connection already authenticated stays open until it closes.
//
// KeyAllowlist is the logic (which key gets which role), tested without sockets.
// Threads: Start() binds on the caller's thread and starts the ZAP thread, which alone uses the
// ZAP socket; Stop() (or the destructor) joins it. RequestReload() is thread-safe.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/curve_keys.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "zmq.hpp"

namespace kiln::coordinator {

enum class PeerRole { kNone, kNode, kClient, kAdmin };
const char* PeerRoleName(PeerRole role);

// Who sent a message, as the server learns it from ZAP's User-Id. Plaintext (no ZAP): role kAdmin
// with an empty key for clients (development mode trusts everyone), kNode for nodes.
struct Peer {
  PeerRole role = PeerRole::kNone;
  std::string key;  // Z85 public key; "" in plaintext mode
};
// "admin:KEY" → {kAdmin, KEY}; anything else → role kNone.
Peer ParseUserId(absl::string_view user_id);
std::string MakeUserId(PeerRole role, const std::string& key);

struct KeyAllowlistPaths {
  std::string node_keys;    // key list file or directory of *.pub: who may be a node
  std::string client_keys;  // who may be a client (sees and cancels its own jobs)
  std::string admin_keys;   // clients with every right (all jobs, cancel any, drain nodes)
};

// The three lists, loaded together.
class KeyAllowlist {
 public:
  // NotFound / InvalidArgument naming the file of the first list that cannot be read.
  static absl::StatusOr<KeyAllowlist> Load(const KeyAllowlistPaths& paths);
  // The role `public_key` (Z85) has on the socket with ZAP domain `domain` ("node" or "client");
  // kNone when it is not allowed there.
  PeerRole RoleOf(absl::string_view domain, const std::string& public_key) const;
  // The allowlist's name for a key ("" if unknown), for log lines.
  std::string NameOf(const std::string& public_key) const;
  size_t node_keys() const { return node_.size(); }
  size_t client_keys() const { return client_.size(); }
  size_t admin_keys() const { return admin_.size(); }

 private:
  CurveKeyList node_, client_, admin_;
};

struct ZapAuthenticatorOptions {
  KeyAllowlistPaths allowlists;
  int check_interval_ms = 1000;  // ms between checks of the allowlist files for changes
};

class ZapAuthenticator {
 public:
  // Loads the allowlists (their errors returned as is), binds the ZAP endpoint in `context`
  // (Internal if another handler is bound there) and starts the thread. `registry` gets
  // kiln_auth_handshakes_total{domain,result} and kiln_auth_reloads_total{result} and
  // kiln_auth_keys{list}; `log` receives refusals (rate-limited) and reloads. Both outlive it.
  static absl::StatusOr<std::unique_ptr<ZapAuthenticator>> Start(
      zmq::context_t& context, const ZapAuthenticatorOptions& options,
      prometheus::Registry& registry, std::function<void(const std::string&)> log);
  ~ZapAuthenticator();  // Stop()
  void Stop();
  // Re-read the allowlists at the thread's next turn (within ~100 ms).
  void RequestReload() { reload_requested_.store(true); }

 private:
  ZapAuthenticator(const ZapAuthenticatorOptions& options, KeyAllowlist lists,
                   prometheus::Registry& registry, std::function<void(const std::string&)> log);
  void Loop();
  void Handle(std::vector<zmq::message_t>& request);
  void MaybeReload(bool force);
  void Log(const std::string& line);

  const ZapAuthenticatorOptions options_;
  KeyAllowlist lists_;  // used by the thread only
  std::string fingerprint_;
  std::function<void(const std::string&)> log_;
  std::unique_ptr<zmq::socket_t> socket_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> reload_requested_{false};
  int64_t last_refusal_log_ms_ = 0;
  int64_t refusals_not_logged_ = 0;
  prometheus::Family<prometheus::Counter>& handshakes_;
  prometheus::Family<prometheus::Counter>& reloads_;
  prometheus::Family<prometheus::Gauge>& keys_;
  std::thread thread_;
};

}  // namespace kiln::coordinator
