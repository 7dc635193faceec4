// Failover: which coordinator endpoint a client tries next, and when, as plain logic on an
// injected clock (no sockets). CoordinatorClient asks it after every try that got no answer
// (the coordinator is down, restarting, a standby that binds nothing yet) or UNAVAILABLE.
//
// The endpoints are every coordinator's (an active one and its standbys) in the order given.
// Each retry moves on to the next endpoint; within one round of the endpoints the next is tried
// after backoff_initial_ms, and the delay doubles (up to backoff_max_ms) once per round. Retries
// stop when the next try would start more than retry_for_ms after the first failure; a success
// starts the budget and the backoff over.
//
// Thread-compatible; owned by the client's thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/clock.h"

namespace kiln::cli {

struct FailoverOptions {
  int64_t retry_for_ms = 60000;     // how long to keep retrying after a failure (0: never retry)
  int64_t backoff_initial_ms = 200;  // delay before the next endpoint, and the first round's
  int64_t backoff_max_ms = 3000;     // cap of the per-round delay

  absl::Status Validate() const;  // InvalidArgument naming the field
};

// "tcp://A:5555,tcp://B:5555" → its endpoints in order, blanks dropped.
std::vector<std::string> SplitEndpointList(absl::string_view list);

class Failover {
 public:
  // `endpoints` must not be empty.
  Failover(std::vector<std::string> endpoints, const FailoverOptions& options, const Clock& clock);

  // The endpoint to use now.
  const std::string& endpoint() const { return endpoints_[current_]; }
  const std::vector<std::string>& endpoints() const { return endpoints_; }

  // The try on endpoint() failed in a way worth retrying. Moves on to the next endpoint and
  // returns the delay (ms) to wait before trying it, or nullopt when the retry budget is spent.
  std::optional<int64_t> OnFailure();
  // The try succeeded: the budget and the backoff start over.
  void OnSuccess();
  // Failures since the last success.
  int failures() const { return failures_; }

 private:
  const std::vector<std::string> endpoints_;
  const FailoverOptions options_;
  const Clock& clock_;
  size_t current_ = 0;
  int failures_ = 0;
  int64_t first_failure_ms_ = 0;  // valid while failures_ > 0
  int64_t round_backoff_ms_;      // the delay after a full round of endpoints
};

}  // namespace kiln::cli
