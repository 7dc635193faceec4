#include "coordinator/redis_job_store.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "prometheus/family.h"

namespace kiln::coordinator {
namespace {

// The start of every script that writes (ScriptFor<kFencedPrologue, kScript>): it refuses to run
// unless KEYS[1] (the fence) still holds ARGV[1] (this coordinator's fencing token), and defines
// sweep_expired, which removes up to 100 jobs whose retention ended by `now` from the expiry set
// and, once their record is gone, from the state sets of ARGV[first..last] (terminal states).
constexpr char kFencedPrologue[] = R"lua(
local fence = redis.call('GET', KEYS[1])
if fence ~= ARGV[1] then
  return redis.error_reply('FAILED_PRECONDITION fenced: fencing token ' .. ARGV[1] ..
    ' is not the current one (' .. tostring(fence) .. '); another coordinator leads')
end
local function sweep_expired(expiry, now, job_prefix, state_prefix, first, last)
  local gone = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, 100)
  for _, id in ipairs(gone) do
    if redis.call('EXISTS', job_prefix .. id) == 0 then
      for i = first, last do redis.call('ZREM', state_prefix .. ARGV[i], id) end
    end
    redis.call('ZREM', expiry, id)
  end
end
)lua";

// KEYS: fence, job, seq, expiry. ARGV: 1 token, 2 mode (create|put|cas), 3 expected version,
// 4 job id, 5 info, 6 png, 7 state, 8 terminal (0|1), 9 retention ms, 10 now unix ms,
// 11 state-set prefix, 12 job-key prefix, 13.. the terminal state numbers.
// Returns {0, info, png} when create found the job, {1, version} after a write, {2} on a version
// conflict (cas).
constexpr char kWriteScript[] = R"lua(
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'none' and t ~= 'hash' then
  return redis.error_reply('DATA_LOSS job record ' .. KEYS[2] .. ' is a ' .. t ..
    ', not a kiln job hash')
end
local exists = t == 'hash'
local mode = ARGV[2]
if mode == 'create' and exists then
  local cur = redis.call('HMGET', KEYS[2], 'info', 'png')
  return {0, cur[1] or '', cur[2] or ''}
end
if mode == 'cas' then
  if not exists then return redis.error_reply('NOT_FOUND job ' .. ARGV[4] .. ' not found') end
  if (redis.call('HGET', KEYS[2], 'ver') or '') ~= ARGV[3] then return {2} end
end
local seq = false
local oldstate = false
if exists then
  local cur = redis.call('HMGET', KEYS[2], 'seq', 'state')
  seq = cur[1]
  oldstate = cur[2]
end
if not seq then seq = redis.call('INCR', KEYS[3]) end
if oldstate then redis.call('ZREM', ARGV[11] .. oldstate, ARGV[4]) end
redis.call('HSET', KEYS[2], 'info', ARGV[5], 'png', ARGV[6], 'state', ARGV[7], 'seq', seq)
local ver = redis.call('HINCRBY', KEYS[2], 'ver', 1)
redis.call('ZADD', ARGV[11] .. ARGV[7], seq, ARGV[4])
local now = tonumber(ARGV[10])
if ARGV[8] == '1' then
  redis.call('PEXPIRE', KEYS[2], ARGV[9])
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[9]), ARGV[4])
else
  redis.call('PERSIST', KEYS[2])
  redis.call('ZREM', KEYS[4], ARGV[4])
end
sweep_expired(KEYS[4], now, ARGV[12], ARGV[11], 13, #ARGV)
return {1, ver}
)lua";

// KEYS: the state set. ARGV: 1 job-key prefix. Returns {id, info-or-false, ...} in creation order;
// false marks a record that is missing (expired) or not a hash.
constexpr char kListScript[] = R"lua(
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local t = redis.call('TYPE', key)['ok']
  if t == 'hash' then
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGET', key, 'info') or '-'
  elseif t ~= 'none' then
    out[#out + 1] = id
    out[#out + 1] = '-'
  end
end
return out
)lua";

// Create for many jobs in one script: one fencing check, one AOF write (one fsync under
// `appendfsync always`). KEYS: fence, seq, expiry. ARGV: 1 token, 2 job-key prefix, 3 state-set
// prefix, 4 now unix ms, 5 retention ms, 6 number of terminal state numbers k, 7..6+k those, then
// per job 5 values: id, info, png, state, terminal (0|1). Returns one entry per job: {0, info,
// png} found, {1, version} created, {4, message} garbage under its key. Every job is checked
// before anything is written.
constexpr char kCreateManyScript[] = R"lua(
local k = tonumber(ARGV[6])
local first = 7 + k
local types = {}
for i = first, #ARGV, 5 do
  types[#types + 1] = redis.call('TYPE', ARGV[2] .. ARGV[i])['ok']
end
local out = {}
local j = 0
for i = first, #ARGV, 5 do
  j = j + 1
  local id = ARGV[i]
  local key = ARGV[2] .. id
  local t = types[j]
  if t == 'hash' then
    local cur = redis.call('HMGET', key, 'info', 'png')
    out[j] = {0, cur[1] or '', cur[2] or ''}
  elseif t ~= 'none' then
    out[j] = {4, 'job record ' .. key .. ' is a ' .. t .. ', not a kiln job hash'}
  else
    local seq = redis.call('INCR', KEYS[2])
    redis.call('HSET', key, 'info', ARGV[i + 1], 'png', ARGV[i + 2], 'state', ARGV[i + 3],
      'seq', seq)
    local ver = redis.call('HINCRBY', key, 'ver', 1)
    redis.call('ZADD', ARGV[3] .. ARGV[i + 3], seq, id)
    if ARGV[i + 4] == '1' then
      redis.call('PEXPIRE', key, ARGV[5])
      redis.call('ZADD', KEYS[3], tonumber(ARGV[4]) + tonumber(ARGV[5]), id)
    else
      redis.call('ZREM', KEYS[3], id)
    end
    out[j] = {1, ver}
    -- A key in a batch twice: the second finds the first.
    types[j] = 'hash'
    for m = j + 1, #types do
      if ARGV[first + (m - 1) * 5] == id then types[m] = 'hash' end
    end
  end
end
local now = tonumber(ARGV[4])
sweep_expired(KEYS[3], now, ARGV[2], ARGV[3], 7, 6 + k)
return out
)lua";

// Get for many jobs. ARGV: 1 job-key prefix, then the ids. Returns one entry per id: {0} missing,
// {1, info-or-false, png-or-false, ver-or-false}, {2, type} not a hash.
constexpr char kGetManyScript[] = R"lua(
local out = {}
for i = 2, #ARGV do
  local key = ARGV[1] .. ARGV[i]
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' then
    out[#out + 1] = {0}
  elseif t == 'hash' then
    local cur = redis.call('HMGET', key, 'info', 'png', 'ver')
    out[#out + 1] = {1, cur[1], cur[2], cur[3]}
  else
    out[#out + 1] = {2, t}
  end
end
return out
)lua";

prometheus::Counter& ErrorCounter(prometheus::Registry& registry, const char* kind) {
  return prometheus::BuildCounter()
      .Name("kiln_job_store_errors_total")
      .Help("Job store calls that failed, by kind: unavailable (Redis unreachable), fenced (this "
            "coordinator's fencing token is stale), corrupt (garbage under a job key), other")
      .Register(registry)
      .Add({{"kind", kind}});
}

}  // namespace

absl::Status RedisJobStoreOptions::Validate() const {
  if (key_prefix.empty()) return absl::InvalidArgumentError("key_prefix: must not be empty");
  if (retention_ms < 1000) {
    return absl::InvalidArgumentError(
        absl::StrCat("retention_ms: ", retention_ms, " is less than 1000"));
  }
  if (max_update_attempts < 1) {
    return absl::InvalidArgumentError("max_update_attempts: must be at least 1");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<RedisJobStore>> RedisJobStore::Create(
    const RedisJobStoreOptions& options, const redis::RedisOptions& redis, const Clock& clock,
    prometheus::Registry& registry) {
  if (auto s = options.Validate(); !s.ok()) return s;
  auto client = redis::RedisClient::Create(redis, &registry);
  if (!client.ok()) return client.status();
  return std::unique_ptr<RedisJobStore>(
      new RedisJobStore(options, std::move(*client), clock, registry));
}

RedisJobStore::RedisJobStore(const RedisJobStoreOptions& options,
                             std::unique_ptr<redis::RedisClient> client, const Clock& clock,
                             prometheus::Registry& registry)
    : options_(options),
      client_(std::move(client)),
      clock_(clock),
      unavailable_(ErrorCounter(registry, "unavailable")),
      fenced_(ErrorCounter(registry, "fenced")),
      corrupt_(ErrorCounter(registry, "corrupt")),
      other_(ErrorCounter(registry, "other")) {}

std::string RedisJobStore::JobKey(const std::string& job_id) const {
  return absl::StrCat(options_.key_prefix, ":job:", job_id);
}

absl::Status RedisJobStore::Count(absl::Status s) const {
  if (s.ok() || absl::IsNotFound(s)) return s;
  if (absl::IsUnavailable(s)) {
    unavailable_.Increment();
    return absl::UnavailableError(absl::StrCat("job store: ", s.message()));
  }
  if (absl::IsFailedPrecondition(s)) {
    fenced_.Increment();
  } else if (absl::IsDataLoss(s)) {
    corrupt_.Increment();
  } else {
    other_.Increment();
  }
  return s;
}

absl::StatusOr<kiln::v1::JobInfo> RedisJobStore::Parse(const std::string& job_id,
                                                       const std::string& info,
                                                       const std::string& png) const {
  kiln::v1::JobInfo job;
  if (!job.ParseFromString(info) || job.spec().job_id() != job_id) {
    return absl::DataLossError(absl::StrCat("job store: the record under ", JobKey(job_id),
                                            " is not a JobInfo for job ", job_id));
  }
  job.set_png(png);
  return job;
}

absl::StatusOr<redis::Reply> RedisJobStore::Write(const std::string& mode,
                                                  const kiln::v1::JobInfo& job,
                                                  const std::string& version) {
  const std::string& id = job.spec().job_id();
  kiln::v1::JobInfo info = job;
  info.clear_png();
  std::string bytes;
  if (!info.SerializeToString(&bytes)) {
    return Count(absl::InternalError(absl::StrCat("job store: cannot serialize job ", id)));
  }
  const std::string p = options_.key_prefix;
  std::vector<std::string> args = {std::to_string(token_.load()),
                                   mode,
                                   version,
                                   id,
                                   bytes,
                                   job.png(),
                                   std::to_string(static_cast<int>(job.state())),
                                   IsTerminal(job.state()) ? "1" : "0",
                                   std::to_string(options_.retention_ms),
                                   std::to_string(clock_.UnixMs()),
                                   p + ":state:",
                                   p + ":job:"};
  for (auto s : {kiln::v1::JOB_STATE_SUCCEEDED, kiln::v1::JOB_STATE_FAILED,
                 kiln::v1::JOB_STATE_CANCELLED}) {
    args.push_back(std::to_string(static_cast<int>(s)));
  }
  auto reply = client_->Eval(redis::ScriptFor<kFencedPrologue, kWriteScript>(),
                             {FenceKey(), JobKey(id), p + ":seq", p + ":expiry"}, args);
  if (!reply.ok()) return Count(reply.status());
  if (reply->type != redis::Reply::Type::kArray || reply->elements.empty() ||
      reply->elements[0].type != redis::Reply::Type::kInteger) {
    return Count(absl::InternalError("job store: unexpected reply from the write script"));
  }
  return reply;
}

absl::StatusOr<JobStore::CreateResult> RedisJobStore::Create(const kiln::v1::JobInfo& job) {
  const std::string& id = job.spec().job_id();
  if (id.empty()) return absl::InvalidArgumentError("job store: empty job_id");
  auto reply = Write("create", job, "");
  if (!reply.ok()) return reply.status();
  if (reply->elements[0].integer == 0 && reply->elements.size() == 3) {
    auto existing = Parse(id, reply->elements[1].str, reply->elements[2].str);
    if (!existing.ok()) return Count(existing.status());
    return CreateResult{std::move(*existing), false};
  }
  return CreateResult{job, true};
}

absl::StatusOr<RedisJobStore::Stored> RedisJobStore::Read(const std::string& job_id) const {
  auto reply = client_->Command({"HMGET", JobKey(job_id), "info", "png", "ver"});
  if (!reply.ok()) return Count(reply.status());
  if (reply->type != redis::Reply::Type::kArray || reply->elements.size() != 3) {
    return Count(absl::InternalError("job store: unexpected HMGET reply"));
  }
  const auto& e = reply->elements;
  if (e[0].is_nil() && e[1].is_nil() && e[2].is_nil()) {
    return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  }
  if (e[0].is_nil()) {
    return Count(absl::DataLossError(
        absl::StrCat("job store: the record under ", JobKey(job_id), " has no job info")));
  }
  auto job = Parse(job_id, e[0].str, e[1].is_nil() ? "" : e[1].str);
  if (!job.ok()) return Count(job.status());
  return Stored{std::move(*job), e[2].is_nil() ? "" : e[2].str};
}

absl::StatusOr<kiln::v1::JobInfo> RedisJobStore::Get(const std::string& job_id) const {
  auto stored = Read(job_id);
  if (!stored.ok()) return stored.status();
  return std::move(stored->job);
}

absl::Status RedisJobStore::Put(const kiln::v1::JobInfo& job) {
  if (job.spec().job_id().empty()) return absl::InvalidArgumentError("job store: empty job_id");
  auto reply = Write("put", job, "");
  return reply.ok() ? absl::OkStatus() : reply.status();
}

absl::StatusOr<kiln::v1::JobInfo> RedisJobStore::Update(
    const std::string& job_id, const std::function<absl::Status(kiln::v1::JobInfo&)>& mutate) {
  for (int attempt = 0; attempt < options_.max_update_attempts; ++attempt) {
    auto stored = Read(job_id);
    if (!stored.ok()) return stored.status();
    kiln::v1::JobInfo job = std::move(stored->job);
    if (auto s = mutate(job); !s.ok()) return s;
    if (job.spec().job_id() != job_id) {
      return absl::InternalError(absl::StrCat("job store: update changed job_id of ", job_id));
    }
    auto reply = Write("cas", job, stored->version);
    if (!reply.ok()) return reply.status();
    if (reply->elements[0].integer == 1) return job;
    // Version conflict: another writer changed it between our read and write; read again.
  }
  return Count(absl::AbortedError(absl::StrCat("job store: job ", job_id, " changed under ",
                                               options_.max_update_attempts,
                                               " updates in a row")));
}

std::vector<absl::StatusOr<JobStore::CreateResult>> RedisJobStore::CreateMany(
    const std::vector<kiln::v1::JobInfo>& jobs) {
  std::vector<absl::StatusOr<CreateResult>> out(jobs.size(),
                                                absl::InternalError("job store: not written"));
  if (jobs.empty()) return out;
  const std::string p = options_.key_prefix;
  std::vector<std::string> args = {std::to_string(token_.load()), p + ":job:", p + ":state:",
                                   std::to_string(clock_.UnixMs()),
                                   std::to_string(options_.retention_ms), "3"};
  for (auto s : {kiln::v1::JOB_STATE_SUCCEEDED, kiln::v1::JOB_STATE_FAILED,
                 kiln::v1::JOB_STATE_CANCELLED}) {
    args.push_back(std::to_string(static_cast<int>(s)));
  }
  std::vector<size_t> sent;  // index in `jobs` of each job in the script
  sent.reserve(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    const kiln::v1::JobInfo& job = jobs[i];
    const std::string& id = job.spec().job_id();
    if (id.empty()) {
      out[i] = absl::InvalidArgumentError("job store: empty job_id");
      continue;
    }
    kiln::v1::JobInfo info = job;
    info.clear_png();
    std::string bytes;
    if (!info.SerializeToString(&bytes)) {
      out[i] = Count(absl::InternalError(absl::StrCat("job store: cannot serialize job ", id)));
      continue;
    }
    args.push_back(id);
    args.push_back(std::move(bytes));
    args.push_back(job.png());
    args.push_back(std::to_string(static_cast<int>(job.state())));
    args.push_back(IsTerminal(job.state()) ? "1" : "0");
    sent.push_back(i);
  }
  if (sent.empty()) return out;
  auto reply = client_->Eval(redis::ScriptFor<kFencedPrologue, kCreateManyScript>(),
                             {FenceKey(), p + ":seq", p + ":expiry"}, args);
  absl::Status failed;
  if (!reply.ok()) {
    failed = Count(reply.status());
  } else if (reply->type != redis::Reply::Type::kArray ||
             reply->elements.size() != sent.size()) {
    failed = Count(absl::InternalError("job store: unexpected reply from the create script"));
  }
  if (!failed.ok()) {
    for (size_t i : sent) out[i] = failed;
    return out;
  }
  for (size_t n = 0; n < sent.size(); ++n) {
    const size_t i = sent[n];
    const std::string& id = jobs[i].spec().job_id();
    const redis::Reply& r = reply->elements[n];
    if (r.type != redis::Reply::Type::kArray || r.elements.empty() ||
        r.elements[0].type != redis::Reply::Type::kInteger) {
      out[i] = Count(absl::InternalError("job store: unexpected entry from the create script"));
      continue;
    }
    const int64_t kind = r.elements[0].integer;
    if (kind == 1) {
      out[i] = CreateResult{jobs[i], true};
    } else if (kind == 0 && r.elements.size() == 3) {
      auto existing = Parse(id, r.elements[1].str, r.elements[2].str);
      if (existing.ok()) {
        out[i] = CreateResult{std::move(*existing), false};
      } else {
        out[i] = Count(existing.status());
      }
    } else if (kind == 4 && r.elements.size() == 2) {
      out[i] = Count(absl::DataLossError(absl::StrCat("job store: ", r.elements[1].str)));
    } else {
      out[i] = Count(absl::InternalError("job store: unexpected entry from the create script"));
    }
  }
  return out;
}

std::vector<absl::StatusOr<kiln::v1::JobInfo>> RedisJobStore::GetMany(
    const std::vector<std::string>& job_ids) const {
  std::vector<absl::StatusOr<kiln::v1::JobInfo>> out;
  if (job_ids.empty()) return out;
  std::vector<std::string> args = {options_.key_prefix + ":job:"};
  args.insert(args.end(), job_ids.begin(), job_ids.end());
  auto reply = client_->Eval(redis::ScriptFor<kGetManyScript>(), {}, args);
  absl::Status failed;
  if (!reply.ok()) {
    failed = Count(reply.status());
  } else if (reply->type != redis::Reply::Type::kArray ||
             reply->elements.size() != job_ids.size()) {
    failed = Count(absl::InternalError("job store: unexpected reply from the get script"));
  }
  if (!failed.ok()) return std::vector<absl::StatusOr<kiln::v1::JobInfo>>(job_ids.size(), failed);
  out.reserve(job_ids.size());
  for (size_t i = 0; i < job_ids.size(); ++i) {
    const std::string& id = job_ids[i];
    const redis::Reply& r = reply->elements[i];
    const auto& e = r.elements;
    if (r.type != redis::Reply::Type::kArray || e.empty() ||
        e[0].type != redis::Reply::Type::kInteger) {
      out.push_back(Count(absl::InternalError("job store: unexpected entry from the get script")));
    } else if (e[0].integer == 0) {
      out.push_back(absl::NotFoundError(absl::StrCat("job ", id, " not found")));
    } else if (e[0].integer == 2 && e.size() == 2) {
      out.push_back(Count(absl::DataLossError(absl::StrCat(
          "job store: job record ", JobKey(id), " is a ", e[1].str, ", not a kiln job hash"))));
    } else if (e[0].integer == 1 && e.size() == 4) {
      // A Lua false (missing field) arrives as nil.
      if (e[1].is_nil()) {
        out.push_back(Count(absl::DataLossError(
            absl::StrCat("job store: the record under ", JobKey(id), " has no job info"))));
        continue;
      }
      auto job = Parse(id, e[1].str, e[2].is_nil() ? "" : e[2].str);
      if (job.ok()) {
        out.push_back(std::move(job));
      } else {
        out.push_back(Count(job.status()));
      }
    } else {
      out.push_back(Count(absl::InternalError("job store: unexpected entry from the get script")));
    }
  }
  return out;
}

absl::StatusOr<std::vector<kiln::v1::JobInfo>> RedisJobStore::List(
    kiln::v1::JobState state) const {
  const std::string p = options_.key_prefix;
  auto reply = client_->Eval(
      redis::ScriptFor<kListScript>(), {absl::StrCat(p, ":state:", static_cast<int>(state))},
      {p + ":job:"});
  if (!reply.ok()) return Count(reply.status());
  if (reply->type != redis::Reply::Type::kArray || reply->elements.size() % 2 != 0) {
    return Count(absl::InternalError("job store: unexpected reply from the list script"));
  }
  std::vector<kiln::v1::JobInfo> out;
  out.reserve(reply->elements.size() / 2);
  for (size_t i = 0; i < reply->elements.size(); i += 2) {
    const std::string& id = reply->elements[i].str;
    auto job = Parse(id, reply->elements[i + 1].str, "");
    if (!job.ok() || job->state() != state) {
      corrupt_.Increment();
      if (options_.log) {
        options_.log(absl::StrCat("job store: skipped ", JobKey(id), " listing state ",
                                  static_cast<int>(state), ": ",
                                  job.ok() ? "its record is in another state"
                                           : std::string(job.status().message())));
      }
      continue;
    }
    out.push_back(std::move(*job));
  }
  return out;
}

}  // namespace kiln::coordinator
