#include "cache/held_lease.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "cache/package_dir.h"
#include "common/log.h"

namespace kiln::cache {

absl::Status CheckLeaseRequest(const std::string& digest, const LeaseRequest& request) {
  if (!IsDigest(digest)) {
    return absl::InvalidArgumentError(absl::StrCat("lease: '", digest, "' is not a digest"));
  }
  if (request.holder.empty()) return absl::InvalidArgumentError("lease: holder is empty");
  if (request.ttl_ms <= 0) return absl::InvalidArgumentError("lease: ttl_ms must be > 0");
  return absl::OkStatus();
}

HeldLease::HeldLease(std::string name, LeaseInfo info, const Clock* clock, int64_t ttl_ms,
                     bool took_over)
    : name_(std::move(name)),
      digest_(info.digest),
      clock_(clock),
      ttl_ms_(ttl_ms),
      took_over_(took_over),
      info_(std::move(info)) {}

LeaseInfo HeldLease::info() const {
  absl::MutexLock l(&mu_);
  return info_;
}

absl::Status HeldLease::Renew() {
  absl::MutexLock l(&mu_);
  if (released_) return absl::FailedPreconditionError(absl::StrCat("lease ", name_, " released"));
  if (lost_) return absl::AbortedError(absl::StrCat("lease ", name_, " was lost"));
  const int64_t expiry = clock_->UnixMs() + ttl_ms_;
  absl::Status s = RenewHeld(info_, expiry);
  if (absl::IsAborted(s)) lost_ = true;
  if (s.ok()) info_.expires_unix_ms = expiry;
  return s;
}

absl::Status HeldLease::Release() {
  absl::MutexLock l(&mu_);
  if (released_ || lost_) {
    released_ = true;
    return absl::OkStatus();
  }
  if (auto s = ReleaseHeld(info_); !s.ok()) return s;  // it expires on its own
  released_ = true;
  return absl::OkStatus();
}

void HeldLease::ReleaseOrLog() {
  if (auto s = Release(); !s.ok()) {
    kiln::LogWarning("cache", absl::StrCat("releasing lease ", name_, ": ", s.ToString()));
  }
}

}  // namespace kiln::cache
