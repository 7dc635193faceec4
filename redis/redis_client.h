// RedisClient: kiln's one connection type to Redis, used by the Redis adapters (RedisJobStore and
// LeaderLease in coordinator/, RedisArtifactStore in cache/). hiredis stays inside redis_client.cc:
// the redisContext and every redisReply are owned by RAII handles from the moment hiredis returns
// them, and replies are decoded into plain `Reply` values.
//
// Connection trouble is a Status, never an exception or a crash: the client connects lazily with
// connect_timeout_ms, every command has command_timeout_ms, and a command that fails on the wire
// (refused, reset, timed out) drops the connection and returns UNAVAILABLE. The next command
// reconnects at once; if that fails, further commands return UNAVAILABLE without touching the
// network until a backoff (reconnect_initial_ms, doubling up to reconnect_max_ms) has passed, so a
// poll loop that calls the client during an outage stays fast.
//
// Error replies become Statuses: a reply starting with a canonical absl code name
// ("FAILED_PRECONDITION fenced: ...", which kiln's Lua scripts use via redis.error_reply) gets that
// code; WRONGTYPE (garbage under a key) is DATA_LOSS; LOADING/BUSY/READONLY/MASTERDOWN/TRYAGAIN
// are UNAVAILABLE; OOM is RESOURCE_EXHAUSTED; anything else INTERNAL.
//
// Thread-safe: one mutex serializes commands on the connection (blocking I/O happens under it).
// Callers that must not wait behind another thread's command use their own client.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"

namespace kiln::redis {

struct RedisOptions {
  std::string host = "127.0.0.1";
  int port = 6379;
  int db = 0;                          // SELECTed on every (re)connection
  int64_t connect_timeout_ms = 1000;   // ms per connection attempt
  int64_t command_timeout_ms = 2000;   // ms per command (send + reply)
  int64_t reconnect_initial_ms = 100;  // ms to wait after a failed connection attempt; doubles
  int64_t reconnect_max_ms = 2000;     // ms, the backoff's ceiling
  std::string client_name = "kiln";    // CLIENT SETNAME and the metrics' `client` label

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;
  // "redis://HOST:PORT/DB", for messages.
  std::string Url() const;
};

// True if `spec` is a redis:// URL (as opposed to, e.g., a directory).
bool IsRedisUrl(absl::string_view spec);
// Parses "redis://HOST[:PORT][/DB]" (port 6379 and db 0 by default) into options with the other
// fields at their defaults. InvalidArgument naming what is wrong.
absl::StatusOr<RedisOptions> ParseRedisUrl(absl::string_view url);

// A decoded reply (RESP2). Error replies never appear here: they are returned as a Status.
struct Reply {
  enum class Type { kNil, kString, kInteger, kArray, kStatus };
  Type type = Type::kNil;
  std::string str;             // kString (bulk, binary-safe) and kStatus ("OK")
  int64_t integer = 0;         // kInteger
  std::vector<Reply> elements;  // kArray

  bool is_nil() const { return type == Type::kNil; }
  bool is_string() const { return type == Type::kString || type == Type::kStatus; }
};

// A Lua script run with EVALSHA, falling back to EVAL when the server does not know it (a fresh
// or restarted Redis). Its sha is learned with SCRIPT LOAD on first use. Thread-safe.
class Script {
 public:
  explicit Script(std::string source) : source_(std::move(source)) {}
  const std::string& source() const { return source_; }

 private:
  friend class RedisClient;
  const std::string source_;
  mutable absl::Mutex mu_;
  mutable std::string sha_ ABSL_GUARDED_BY(mu_);  // "" until loaded
};

// The Script of a source text held in constants (`constexpr char kSource[] = R"lua(...)lua";`):
// redis::ScriptFor<kSource>() creates it on first use and keeps it for the process's lifetime
// (never destroyed, so any thread may use it until exit). Several constants are joined in order
// into one script, so that scripts can share a prologue: ScriptFor<kPrologue, kSource>().
// Thread-safe.
template <const char*... kParts>
const Script& ScriptFor() {
  static const Script* script = new Script(absl::StrCat(kParts...));
  return *script;
}

class RedisClient {
 public:
  // Validates `options`; does not connect (the first command does). Metrics go to `registry`
  // (null: a private one), labelled client=options.client_name:
  //   kiln_redis_commands_total{client,result="ok|error|unavailable"}  commands (scripts count
  //     once) by outcome: error = Redis answered with an error, unavailable = no answer
  //   kiln_redis_connects_total{client,result="ok|failed"}  connection attempts
  //   kiln_redis_connected{client}  1 while a connection is up
  static absl::StatusOr<std::unique_ptr<RedisClient>> Create(
      const RedisOptions& options, prometheus::Registry* registry = nullptr);
  ~RedisClient();
  RedisClient(const RedisClient&) = delete;
  RedisClient& operator=(const RedisClient&) = delete;

  // Sends one command (binary-safe arguments) and returns its reply. Unavailable when Redis
  // cannot be reached or does not answer within command_timeout_ms; see the file comment for
  // error replies.
  absl::StatusOr<Reply> Command(const std::vector<std::string>& argv);
  // Runs `script` with KEYS and ARGV (EVALSHA, EVAL after NOSCRIPT).
  absl::StatusOr<Reply> Eval(const Script& script, const std::vector<std::string>& keys,
                             const std::vector<std::string>& args);
  // Connects now if not connected (ignoring the backoff) and PINGs. Unavailable if it cannot.
  absl::Status Ping();

  bool connected() const;
  const RedisOptions& options() const { return options_; }

  struct Context;  // the owned redisContext (kept out of this header)

 private:
  RedisClient(const RedisOptions& options, prometheus::Registry& registry);
  // Makes sure a connection is up. `force` ignores the backoff.
  absl::Status EnsureConnected(bool force) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Reply> CommandLocked(const std::vector<std::string>& argv)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Disconnect() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const RedisOptions options_;
  std::shared_ptr<prometheus::Registry> owned_registry_;  // only when none was passed in
  prometheus::Counter& commands_ok_;
  prometheus::Counter& commands_error_;
  prometheus::Counter& commands_unavailable_;
  prometheus::Counter& connects_ok_;
  prometheus::Counter& connects_failed_;
  prometheus::Gauge& connected_gauge_;

  mutable absl::Mutex mu_;
  std::unique_ptr<Context> context_ ABSL_GUARDED_BY(mu_);  // null while disconnected
  int64_t next_attempt_ms_ ABSL_GUARDED_BY(mu_) = 0;       // steady clock; backoff end
  int64_t backoff_ms_ ABSL_GUARDED_BY(mu_) = 0;            // current backoff step (0: none)
  std::string last_error_ ABSL_GUARDED_BY(mu_);            // why the last attempt failed
};

}  // namespace kiln::redis
