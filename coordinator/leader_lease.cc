#include "coordinator/leader_lease.h"

#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "prometheus/family.h"

namespace kiln::coordinator {
namespace {

// KEYS: leader, fence. ARGV: holder, ttl ms. {1, token} when acquired, {0, current value}.
constexpr char kAcquireScript[] = R"lua(
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ' ' .. ARGV[1], 'PX', ARGV[2])
return {1, token}
)lua";

// KEYS: leader, fence. ARGV: token, holder, ttl ms. 1 renewed, 0 lost.
constexpr char kRenewScript[] = R"lua(
local mine = ARGV[1] .. ' ' .. ARGV[2]
local cur = redis.call('GET', KEYS[1])
if cur == mine then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if not cur and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], mine, 'PX', ARGV[3])
  return 1
end
return 0
)lua";

// KEYS: leader. ARGV: token, holder. 1 released, 0 not ours.
constexpr char kReleaseScript[] = R"lua(
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
)lua";

prometheus::Counter& LeadershipCounter(prometheus::Registry& registry, const char* event) {
  return prometheus::BuildCounter()
      .Name("kiln_coordinator_leadership_total")
      .Help("Leader lease events of this coordinator: acquired, lost")
      .Register(registry)
      .Add({{"event", event}});
}

}  // namespace

absl::Status LeaderLeaseOptions::Validate() const {
  if (key_prefix.empty()) return absl::InvalidArgumentError("key_prefix: must not be empty");
  if (holder.empty()) return absl::InvalidArgumentError("holder: must not be empty");
  if (ttl_ms < 100) {
    return absl::InvalidArgumentError(absl::StrCat("ttl_ms: ", ttl_ms, " is less than 100"));
  }
  if (renew_interval_ms < 0 || renew_interval_ms >= ttl_ms) {
    return absl::InvalidArgumentError(absl::StrCat(
        "renew_interval_ms: ", renew_interval_ms, " is not in 0..ttl_ms-1 (0 = ttl_ms / 4)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<LeaderLease>> LeaderLease::Create(
    const LeaderLeaseOptions& options, const redis::RedisOptions& redis,
    prometheus::Registry& registry) {
  if (auto s = options.Validate(); !s.ok()) return s;
  auto client = redis::RedisClient::Create(redis, &registry);
  if (!client.ok()) return client.status();
  return std::unique_ptr<LeaderLease>(new LeaderLease(options, std::move(*client), registry));
}

LeaderLease::LeaderLease(const LeaderLeaseOptions& options,
                         std::unique_ptr<redis::RedisClient> client,
                         prometheus::Registry& registry)
    : options_(options),
      client_(std::move(client)),
      leader_gauge_(prometheus::BuildGauge()
                        .Name("kiln_coordinator_leader")
                        .Help("1 while this coordinator holds the leader lease (active), 0 while "
                              "it is a standby")
                        .Register(registry)
                        .Add({})),
      acquired_(LeadershipCounter(registry, "acquired")),
      lost_(LeadershipCounter(registry, "lost")) {
  leader_gauge_.Set(0);
}

LeaderLease::~LeaderLease() {
  if (is_leader()) (void)Release();
}

absl::StatusOr<bool> LeaderLease::TryAcquire() {
  const std::string p = options_.key_prefix;
  auto reply = client_->Eval(redis::ScriptFor<kAcquireScript>(), {p + ":leader", p + ":fence"},
                             {options_.holder, std::to_string(options_.ttl_ms)});
  if (!reply.ok()) return reply.status();
  if (reply->type != redis::Reply::Type::kArray || reply->elements.size() != 2) {
    return absl::InternalError("leader lease: unexpected reply from the acquire script");
  }
  if (reply->elements[0].integer == 1) {
    token_.store(reply->elements[1].integer);
    last_holder_ = options_.holder;
    acquired_.Increment();
    leader_gauge_.Set(1);
    return true;
  }
  const std::string& cur = reply->elements[1].str;
  const size_t space = cur.find(' ');
  last_holder_ = space == std::string::npos ? cur : cur.substr(space + 1);
  return false;
}

absl::Status LeaderLease::Renew() {
  const int64_t token = token_.load();
  if (token == 0) return absl::AbortedError("leader lease: not held");
  const std::string p = options_.key_prefix;
  auto reply = client_->Eval(redis::ScriptFor<kRenewScript>(), {p + ":leader", p + ":fence"},
                             {std::to_string(token), options_.holder,
                              std::to_string(options_.ttl_ms)});
  if (!reply.ok()) return reply.status();
  if (reply->integer == 1) return absl::OkStatus();
  Lost();
  return absl::AbortedError(absl::StrCat("leader lease: lost (token ", token,
                                         " is no longer current; another coordinator leads)"));
}

absl::Status LeaderLease::Release() {
  const int64_t token = token_.load();
  if (token == 0) return absl::OkStatus();
  auto reply = client_->Eval(redis::ScriptFor<kReleaseScript>(),
                             {options_.key_prefix + ":leader"},
                             {std::to_string(token), options_.holder});
  token_.store(0);
  leader_gauge_.Set(0);
  return reply.ok() ? absl::OkStatus() : reply.status();
}

void LeaderLease::Lost() {
  token_.store(0);
  lost_.Increment();
  leader_gauge_.Set(0);
}

}  // namespace kiln::coordinator
