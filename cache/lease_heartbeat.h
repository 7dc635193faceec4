// LeaseHeartbeat: keeps a CompileLease alive while its holder compiles. Owns one thread that calls
// lease.Renew() every `interval` until Stop() (or destruction) joins it. A renewal that fails with
// an I/O error is retried at the next tick (the lease stays valid until it expires); Aborted (the
// lease was lost to a takeover) ends the heartbeat and is reported by Stop().
// Used by TieredPackageProvider around a compile; the lease must outlive the heartbeat.
#pragma once

#include <chrono>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "cache/artifact_store.h"

namespace kiln::cache {

class LeaseHeartbeat {
 public:
  // Starts the renewal thread; the first renewal comes one `interval` from now.
  LeaseHeartbeat(CompileLease& lease, std::chrono::milliseconds interval);
  ~LeaseHeartbeat();
  LeaseHeartbeat(const LeaseHeartbeat&) = delete;
  LeaseHeartbeat& operator=(const LeaseHeartbeat&) = delete;

  // Stops renewing and joins the thread (idempotent). Returns the last renewal's status: OK (or
  // no renewal yet), Aborted if the lease was found lost, an I/O error if the last try failed.
  absl::Status Stop();
  // Renewals that succeeded so far.
  int renewals() const;

 private:
  void Run();

  CompileLease& lease_;
  const std::chrono::milliseconds interval_;
  mutable absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  int renewals_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status result_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;  // started last, joined by Stop()
};

}  // namespace kiln::cache
