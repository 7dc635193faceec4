#include "cache/lease_heartbeat.h"


#include "absl/time/time.h"
#include "common/log.h"

namespace kiln::cache {

LeaseHeartbeat::LeaseHeartbeat(CompileLease& lease, std::chrono::milliseconds interval)
    : lease_(lease), interval_(interval), thread_([this] { Run(); }) {}

LeaseHeartbeat::~LeaseHeartbeat() { (void)Stop(); }

absl::Status LeaseHeartbeat::Stop() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
  absl::MutexLock l(&mu_);
  return result_;
}

int LeaseHeartbeat::renewals() const {
  absl::MutexLock l(&mu_);
  return renewals_;
}

void LeaseHeartbeat::Run() {
  const absl::Duration interval = absl::FromChrono(interval_);
  while (true) {
    {
      absl::MutexLock l(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&stop_), interval);
      if (stop_) return;
    }
    absl::Status s = lease_.Renew();  // I/O outside the lock: Stop() never waits on a slow disk
    absl::MutexLock l(&mu_);
    if (s.ok()) {
      ++renewals_;
      result_ = absl::OkStatus();
      continue;
    }
    kiln::LogWarning("cache", absl::StrCat("renewing compile lease for ",
                                           lease_.digest().substr(0, 12), ": ", s.ToString()));
    result_ = s;
    if (absl::IsAborted(s) || absl::IsFailedPrecondition(s)) return;  // lost or released
  }
}

}  // namespace kiln::cache
