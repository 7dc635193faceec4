// HeldLease: what every store's CompileLease has in common (cache-internal; SharedFsStore's and
// RedisArtifactStore's leases derive from it). It keeps the lease's info under a mutex and the
// released / lost states: Renew() after Release() is FailedPrecondition, after a loss Aborted;
// Release() after either is OK and touches nothing; a renewal that reports Aborted marks the
// lease lost. A store implements only what touches its medium (RenewHeld, ReleaseHeld), and
// its destructor calls ReleaseOrLog() (a base destructor cannot reach the store's overrides).
// Thread-safe: Renew() and Release() may be called from different threads.
#pragma once

#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "cache/artifact_store.h"
#include "common/clock.h"

namespace kiln::cache {

// What every store's TryAcquireLease checks first: InvalidArgument unless `digest` is a digest,
// the holder is named and the ttl is positive.
absl::Status CheckLeaseRequest(const std::string& digest, const LeaseRequest& request);

class HeldLease : public CompileLease {
 public:
  const std::string& digest() const final { return digest_; }
  bool took_over() const final { return took_over_; }
  LeaseInfo info() const final;
  absl::Status Renew() final;
  absl::Status Release() final;

 protected:
  // `name`: how messages call the lease (its file or key). `clock` must outlive the lease.
  HeldLease(std::string name, LeaseInfo info, const Clock* clock, int64_t ttl_ms, bool took_over);
  // Extends the lease held as `info` on the medium to `new_expiry_unix_ms`. Aborted when the lease
  // is lost (expired, taken over); other codes for I/O errors (still held until it expires).
  virtual absl::Status RenewHeld(const LeaseInfo& info, int64_t new_expiry_unix_ms) = 0;
  // Gives up the lease held as `info` on the medium.
  virtual absl::Status ReleaseHeld(const LeaseInfo& info) = 0;
  // Release(), logging a failure: for the store's destructor.
  void ReleaseOrLog();
  const std::string& name() const { return name_; }
  const Clock& clock() const { return *clock_; }

 private:
  const std::string name_;
  const std::string digest_;
  const Clock* const clock_;
  const int64_t ttl_ms_;
  const bool took_over_;
  mutable absl::Mutex mu_;
  LeaseInfo info_ ABSL_GUARDED_BY(mu_);
  bool released_ ABSL_GUARDED_BY(mu_) = false;
  bool lost_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace kiln::cache
