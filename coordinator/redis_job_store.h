// RedisJobStore: the JobStore of cluster mode. Every job, state transition and result lives in
// Redis (run with AOF), so a coordinator that restarts, or a standby that takes over, finds every
// acknowledged job. Finished jobs, PNG included, are kept for `retention_ms` after they finish and
// then expire in Redis; coordinator memory holds only queued and running jobs.
//
// Keys (P = key_prefix):
//   P:job:<id>      hash {info: JobInfo without png (protobuf), png, state, seq, ver}
//   P:state:<n>     sorted set of job ids in JobState n, scored by creation order (List)
//   P:seq           creation counter
//   P:expiry        sorted set of finished job ids by expiry time (to prune P:state:<n>)
//   P:fence         the current fencing token (LeaderLease increments it on every acquisition)
//
// Every write is one Lua script that first checks that this store's fencing token is P:fence's
// value: a coordinator that lost its lease (paused, partitioned) and wakes up cannot overwrite
// anything (FAILED_PRECONDITION "fenced: ..."). Create is atomic (create-if-absent in the script:
// idempotent across restarts and coordinators; CreateMany does the same for a whole batch of
// jobs in one script — the group commit of the coordinator's Submits); Update is optimistic (read, mutate, write if the
// record's version is unchanged, retried). Errors: UNAVAILABLE while Redis cannot be reached (the
// write did not happen, or — for a reply lost after the write — is idempotent to retry),
// FAILED_PRECONDITION when fenced, DATA_LOSS for garbage under P:job:<id>. List skips garbage
// records (logged and counted) so that one bad key cannot keep a coordinator from starting.
// Counted in kiln_job_store_errors_total{kind="unavailable|fenced|corrupt|other"}.
//
// Thread-safe (the client serializes commands). Redis Cluster is not supported: the scripts
// touch keys they compute from P (one Redis, or one primary with replicas).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/clock.h"
#include "coordinator/job_store.h"
#include "prometheus/counter.h"
#include "prometheus/registry.h"
#include "redis/redis_client.h"

namespace kiln::coordinator {

struct RedisJobStoreOptions {
  std::string key_prefix = "kiln";             // every key starts with "<key_prefix>:"
  int64_t retention_ms = 24LL * 3600 * 1000;   // ms a finished job (and its PNG) is kept
  int max_update_attempts = 16;                // optimistic Update retries before ABORTED
  // Receives one line per record List skipped as garbage. May be null.
  std::function<void(const std::string&)> log;

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;
};

class RedisJobStore : public JobStore {
 public:
  // Does not contact Redis (the first call does). `clock` (finish times for retention) and
  // `registry` must outlive the store. Writes are refused until SetFencingToken.
  static absl::StatusOr<std::unique_ptr<RedisJobStore>> Create(
      const RedisJobStoreOptions& options, const redis::RedisOptions& redis, const Clock& clock,
      prometheus::Registry& registry);

  // The token writes carry (LeaderLease::token()); 0 refuses every write. Any thread.
  void SetFencingToken(int64_t token) { token_.store(token); }
  int64_t fencing_token() const { return token_.load(); }

  absl::StatusOr<CreateResult> Create(const kiln::v1::JobInfo& job) override;
  absl::StatusOr<kiln::v1::JobInfo> Get(const std::string& job_id) const override;
  absl::Status Put(const kiln::v1::JobInfo& job) override;
  absl::StatusOr<kiln::v1::JobInfo> Update(
      const std::string& job_id,
      const std::function<absl::Status(kiln::v1::JobInfo&)>& mutate) override;
  absl::StatusOr<std::vector<kiln::v1::JobInfo>> List(kiln::v1::JobState state) const override;
  // One script for all of `jobs` (one fencing check, one AOF write and fsync). Per job: created,
  // found (CreateResult.created = false), DATA_LOSS for garbage under its key, InvalidArgument for
  // an empty id; UNAVAILABLE / fenced for every job when the script does not run.
  std::vector<absl::StatusOr<CreateResult>> CreateMany(
      const std::vector<kiln::v1::JobInfo>& jobs) override;
  // One read-only script for all ids.
  std::vector<absl::StatusOr<kiln::v1::JobInfo>> GetMany(
      const std::vector<std::string>& job_ids) const override;

  std::string JobKey(const std::string& job_id) const;
  std::string FenceKey() const { return options_.key_prefix + ":fence"; }
  redis::RedisClient& client() { return *client_; }

 private:
  struct Stored {
    kiln::v1::JobInfo job;
    std::string version;
  };
  RedisJobStore(const RedisJobStoreOptions& options, std::unique_ptr<redis::RedisClient> client,
                const Clock& clock, prometheus::Registry& registry);
  // mode: "create", "put" or "cas" (with `version`). Returns the script's reply.
  absl::StatusOr<redis::Reply> Write(const std::string& mode, const kiln::v1::JobInfo& job,
                                     const std::string& version);
  absl::StatusOr<Stored> Read(const std::string& job_id) const;
  // Counts `s` by kind and returns it.
  absl::Status Count(absl::Status s) const;
  absl::StatusOr<kiln::v1::JobInfo> Parse(const std::string& job_id, const std::string& info,
                                          const std::string& png) const;

  const RedisJobStoreOptions options_;
  const std::unique_ptr<redis::RedisClient> client_;
  const Clock& clock_;
  std::atomic<int64_t> token_{0};
  prometheus::Counter& unavailable_;
  prometheus::Counter& fenced_;
  prometheus::Counter& corrupt_;
  prometheus::Counter& other_;
};

}  // namespace kiln::coordinator
