// RestartBackoff: how long a foreground `kiln up` waits before restarting a child (coordinator,
// node, redis-server) that died, as plain logic on times passed in. Delays double from
// initial_ms up to max_ms for a child that keeps dying; one that stayed up for stable_ms starts
// over at initial_ms. One instance per supervised child; thread-compatible.
#pragma once

#include <cstdint>

namespace kiln::cli {

struct RestartOptions {
  int64_t initial_ms = 500;   // delay after the first death (or one after a stable run)
  int64_t max_ms = 30000;     // delay cap
  int64_t stable_ms = 60000;  // a run this long counts as healthy: the backoff starts over
};

class RestartBackoff {
 public:
  explicit RestartBackoff(const RestartOptions& options = {}) : options_(options) {}

  // The child started at `started_ms` died at `now_ms`: the delay before starting it again.
  int64_t OnExit(int64_t started_ms, int64_t now_ms) {
    if (now_ms - started_ms >= options_.stable_ms) next_ms_ = options_.initial_ms;
    const int64_t delay = next_ms_;
    next_ms_ = next_ms_ * 2 > options_.max_ms ? options_.max_ms : next_ms_ * 2;
    ++restarts_;
    return delay;
  }
  // Restarts so far.
  int restarts() const { return restarts_; }

 private:
  RestartOptions options_;
  int64_t next_ms_ = options_.initial_ms;
  int restarts_ = 0;
};

}  // namespace kiln::cli
