// LeaderLease: which of the coordinators sharing one Redis is active. The lease is one key,
// P:leader = "<token> <holder>", set with SET NX semantics and a TTL that Redis (not the
// coordinators' clocks) runs down; the holder renews it every renew_interval. Each acquisition
// takes a new fencing token, INCR P:fence, and RedisJobStore writes carry the token and are
// refused unless it is P:fence's current value — so a leader that was paused or cut off past its
// lease and wakes up cannot overwrite what its successor wrote, even before it notices.
//
// Acquire, renew and release are Lua scripts (check and act in one step). Renew keeps the lease
// when it is ours, and re-takes it when it lapsed while nobody else took it (our token is still
// the current one: e.g. Redis restarted and dropped the expired key); otherwise the lease is lost
// (ABORTED) and the caller must stop acting as leader.
//
// Used by kiln-coordinator's main thread only (acquire/renew/release); token() and is_leader()
// from any thread. Metrics: kiln_coordinator_leader (1 active, 0 standby) and
// kiln_coordinator_leadership_total{event="acquired|lost"}.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "redis/redis_client.h"

namespace kiln::coordinator {

struct LeaderLeaseOptions {
  std::string key_prefix = "kiln";  // the RedisJobStore's key_prefix
  std::string holder;               // who we are, for the standby's messages (host, pid, endpoint)
  int64_t ttl_ms = 3000;            // ms the lease lives without renewal: a standby takes over
                                    // within ttl_ms (+ its poll interval) of the leader's death
  int64_t renew_interval_ms = 0;    // ms between renewals and standby polls; 0 = ttl_ms / 4

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;
  int64_t interval_ms() const { return renew_interval_ms > 0 ? renew_interval_ms : ttl_ms / 4; }
};

class LeaderLease {
 public:
  static absl::StatusOr<std::unique_ptr<LeaderLease>> Create(const LeaderLeaseOptions& options,
                                                             const redis::RedisOptions& redis,
                                                             prometheus::Registry& registry);
  // Releases the lease if held (best effort).
  ~LeaderLease();

  // One attempt. True: we lead, with a new token(). False: `holder()` says who does.
  // Unavailable when Redis cannot be reached.
  absl::StatusOr<bool> TryAcquire();
  // OK: still ours (ttl pushed back). Aborted: lost (another coordinator took it, or our token
  // is stale); token() is then 0. Unavailable: Redis unreachable (still ours as far as we know;
  // the store's fencing keeps this safe).
  absl::Status Renew();
  // Gives the lease up if it is still ours (a standby takes over at its next poll).
  absl::Status Release();

  bool is_leader() const { return token_.load() != 0; }
  int64_t token() const { return token_.load(); }
  // The current holder's description as last seen by TryAcquire ("" if none).
  const std::string& holder() const { return last_holder_; }

 private:
  LeaderLease(const LeaderLeaseOptions& options, std::unique_ptr<redis::RedisClient> client,
              prometheus::Registry& registry);
  void Lost();

  const LeaderLeaseOptions options_;
  const std::unique_ptr<redis::RedisClient> client_;
  std::atomic<int64_t> token_{0};
  std::string last_holder_;
  prometheus::Gauge& leader_gauge_;
  prometheus::Counter& acquired_;
  prometheus::Counter& lost_;
};

}  // namespace kiln::coordinator
