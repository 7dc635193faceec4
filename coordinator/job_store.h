// JobStore: where the coordinator keeps jobs, as kiln::v1::JobInfo keyed by spec.job_id. The
// coordinator is its only writer and keeps its own in-memory indexes (queue, assignments); the
// store is the record of every job (local mode: InMemoryJobStore; cluster mode will add a
// Redis-backed store behind this same interface, so every call may fail and returns a Status).
#pragma once

#include <cstddef>
#include <deque>
#include <functional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/job_state.h"
#include "common/proto/kiln.pb.h"

namespace kiln::coordinator {

class JobStore {
 public:
  struct CreateResult {
    kiln::v1::JobInfo job;  // the stored job: `job` as given, or the one already stored
    bool created = false;   // false: a job with this id existed and was left untouched
  };

  virtual ~JobStore() = default;

  // Stores `job` unless a job with the same spec.job_id exists (idempotent create).
  // InvalidArgument for an empty job_id.
  virtual absl::StatusOr<CreateResult> Create(const kiln::v1::JobInfo& job) = 0;
  // NotFound when no job has this id.
  virtual absl::StatusOr<kiln::v1::JobInfo> Get(const std::string& job_id) const = 0;
  // Stores `job`, replacing any job with the same id.
  virtual absl::Status Put(const kiln::v1::JobInfo& job) = 0;
  // Read-modify-write of one job, atomic with respect to the store's other calls. An error from
  // `mutate` aborts without writing and is returned. `mutate` must not change spec.job_id.
  // Returns the job as stored. NotFound when no job has this id.
  virtual absl::StatusOr<kiln::v1::JobInfo> Update(
      const std::string& job_id, const std::function<absl::Status(kiln::v1::JobInfo&)>& mutate) = 0;
  // Every job in `state`, oldest submission first, without their PNGs.
  virtual absl::StatusOr<std::vector<kiln::v1::JobInfo>> List(kiln::v1::JobState state) const = 0;

  // Group commit: Create for each of `jobs`, in order, as one write where the store can (the
  // RedisJobStore: one script, so one fsync under `appendfsync always`). One result per job; when
  // the write as a whole fails (Redis unreachable, fenced) every result carries that error and
  // nothing was stored. The default calls Create for each.
  virtual std::vector<absl::StatusOr<CreateResult>> CreateMany(
      const std::vector<kiln::v1::JobInfo>& jobs);
  // Get for each id, in order, in one round trip where the store can. The default calls Get.
  virtual std::vector<absl::StatusOr<kiln::v1::JobInfo>> GetMany(
      const std::vector<std::string>& job_ids) const;
};

// True for SUCCEEDED, FAILED and CANCELLED (common/job_state.h).
using kiln::IsTerminal;

// A JobStore in process memory. Keeps at most `max_finished_jobs` finished jobs (with their
// PNGs): beyond that the oldest finished ones are forgotten (their ids can then be reused).
// Thread-safe.
class InMemoryJobStore : public JobStore {
 public:
  explicit InMemoryJobStore(size_t max_finished_jobs = 10000)
      : max_finished_jobs_(max_finished_jobs) {}

  absl::StatusOr<CreateResult> Create(const kiln::v1::JobInfo& job) override;
  absl::StatusOr<kiln::v1::JobInfo> Get(const std::string& job_id) const override;
  absl::Status Put(const kiln::v1::JobInfo& job) override;
  absl::StatusOr<kiln::v1::JobInfo> Update(
      const std::string& job_id,
      const std::function<absl::Status(kiln::v1::JobInfo&)>& mutate) override;
  absl::StatusOr<std::vector<kiln::v1::JobInfo>> List(kiln::v1::JobState state) const override;

  size_t size() const;

 private:
  struct Entry {
    kiln::v1::JobInfo job;
    uint64_t seq = 0;  // creation order
    bool finished_noted = false;
  };
  // Records that `id` reached a terminal state and forgets the oldest finished jobs over the cap.
  void NoteFinished(const std::string& id, Entry& entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const size_t max_finished_jobs_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Entry> jobs_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> finished_ ABSL_GUARDED_BY(mu_);  // oldest first
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kiln::coordinator
