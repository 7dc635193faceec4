#include "cli/failover.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kiln::cli {

absl::Status FailoverOptions::Validate() const {
  if (retry_for_ms < 0) return absl::InvalidArgumentError("retry_for_ms: must be >= 0");
  if (backoff_initial_ms <= 0) {
    return absl::InvalidArgumentError("backoff_initial_ms: must be positive");
  }
  if (backoff_max_ms < backoff_initial_ms) {
    return absl::InvalidArgumentError("backoff_max_ms: must be >= backoff_initial_ms");
  }
  return absl::OkStatus();
}

std::vector<std::string> SplitEndpointList(absl::string_view list) {
  std::vector<std::string> endpoints;
  for (absl::string_view part : absl::StrSplit(list, ',')) {
    part = absl::StripAsciiWhitespace(part);
    if (!part.empty()) endpoints.emplace_back(part);
  }
  return endpoints;
}

Failover::Failover(std::vector<std::string> endpoints, const FailoverOptions& options,
                   const Clock& clock)
    : endpoints_(std::move(endpoints)),
      options_(options),
      clock_(clock),
      round_backoff_ms_(options.backoff_initial_ms) {}

std::optional<int64_t> Failover::OnFailure() {
  const int64_t now = clock_.NowMs();
  if (failures_++ == 0) first_failure_ms_ = now;
  int64_t delay = options_.backoff_initial_ms;
  if (++current_ == endpoints_.size()) {
    current_ = 0;
    delay = round_backoff_ms_;
    round_backoff_ms_ = std::min(round_backoff_ms_ * 2, options_.backoff_max_ms);
  }
  if (now + delay - first_failure_ms_ > options_.retry_for_ms) return std::nullopt;
  return delay;
}

void Failover::OnSuccess() {
  failures_ = 0;
  round_backoff_ms_ = options_.backoff_initial_ms;
}

}  // namespace kiln::cli
