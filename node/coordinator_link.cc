#include "node/coordinator_link.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kiln::node {

absl::Status LinkOptions::Validate() const {
  if (heartbeat_interval_ms <= 0) {
    return absl::InvalidArgumentError("heartbeat_interval_ms: must be > 0");
  }
  if (missed_heartbeats < 1) return absl::InvalidArgumentError("missed_heartbeats: must be >= 1");
  if (backoff_initial_ms <= 0) return absl::InvalidArgumentError("backoff_initial_ms: must be > 0");
  if (backoff_max_ms < backoff_initial_ms) {
    return absl::InvalidArgumentError("backoff_max_ms: must be >= backoff_initial_ms");
  }
  return absl::OkStatus();
}

std::vector<std::string> SplitEndpoints(absl::string_view list) {
  std::vector<std::string> endpoints;
  for (absl::string_view part : absl::StrSplit(list, ',')) {
    part = absl::StripAsciiWhitespace(part);
    if (!part.empty()) endpoints.emplace_back(part);
  }
  return endpoints;
}

CoordinatorLink::CoordinatorLink(const LinkOptions& options, const Clock& clock,
                                 std::vector<std::string> endpoints)
    : options_(options),
      clock_(clock),
      endpoints_(std::move(endpoints)),
      interval_ms_(options.heartbeat_interval_ms),
      backoff_ms_(options.backoff_initial_ms),
      connect_at_ms_(clock.NowMs()) {}

bool CoordinatorLink::ShouldConnect() const {
  return state_ == State::kDisconnected && clock_.NowMs() >= connect_at_ms_;
}

void CoordinatorLink::OnRegisterSent() {
  state_ = State::kRegistering;
  last_heard_ms_ = clock_.NowMs();  // the silence clock starts with the request
}

void CoordinatorLink::OnHeard() { last_heard_ms_ = clock_.NowMs(); }

void CoordinatorLink::OnRegistered(uint32_t heartbeat_interval_ms) {
  state_ = State::kRegistered;
  if (heartbeat_interval_ms > 0) interval_ms_ = heartbeat_interval_ms;
  backoff_ms_ = options_.backoff_initial_ms;
  last_heard_ms_ = clock_.NowMs();
  last_heartbeat_ms_ = clock_.NowMs();
}

bool CoordinatorLink::HeartbeatDue() const {
  return state_ == State::kRegistered && clock_.NowMs() - last_heartbeat_ms_ >= interval_ms_;
}

void CoordinatorLink::OnHeartbeatSent() { last_heartbeat_ms_ = clock_.NowMs(); }

bool CoordinatorLink::PeerDead() const {
  return state_ != State::kDisconnected &&
         clock_.NowMs() - last_heard_ms_ >= options_.missed_heartbeats * interval_ms_;
}

int64_t CoordinatorLink::next_backoff_ms() const {
  // Moving on within a round is quick; starting the next round waits the grown backoff.
  return current_ + 1 < endpoints_.size() ? options_.backoff_initial_ms : backoff_ms_;
}

void CoordinatorLink::OnDisconnected() {
  state_ = State::kDisconnected;
  connect_at_ms_ = clock_.NowMs() + next_backoff_ms();
  if (++current_ == endpoints_.size()) {
    current_ = 0;
    backoff_ms_ = std::min(backoff_ms_ * 2, options_.backoff_max_ms);
  }
}

int64_t CoordinatorLink::MsUntilNextEvent() const {
  const int64_t now = clock_.NowMs();
  int64_t next;
  switch (state_) {
    case State::kDisconnected:
      next = connect_at_ms_;
      break;
    case State::kRegistering:
      next = last_heard_ms_ + options_.missed_heartbeats * interval_ms_;
      break;
    case State::kRegistered:
      next = std::min(last_heartbeat_ms_ + interval_ms_,
                      last_heard_ms_ + options_.missed_heartbeats * interval_ms_);
      break;
  }
  return std::max<int64_t>(0, next - now);
}

}  // namespace kiln::node
