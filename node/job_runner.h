// JobRunner: what the node's protocol logic (NodeSession) needs of the thing that runs jobs. The
// Worker (node/worker.h) is the implementation; NodeSession's tests use a hand-written fake.
//
// Threads: every method may be called from any thread (the node's I/O thread in production).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/proto/kiln.pb.h"
#include "node/catalog.h"

namespace kiln::node {

struct Job {
  kiln::v1::JobSpec spec;
  uint32_t attempt = 0;  // AssignJob.attempt, echoed in the result
  JobPlan plan;          // from ModelCatalog::Plan(spec)
};

class JobRunner {
 public:
  virtual ~JobRunner() = default;

  // Queues a job. False (and nothing queued) when a job with this id is queued or running: the
  // coordinator re-sent an assignment the node already has.
  virtual bool Enqueue(Job job) = 0;

  enum class CancelOutcome {
    kNotFound,  // not queued, not running (finished already, or never assigned)
    kDequeued,  // was queued: dropped, CANCELLED result queued
    kStopping,  // is running: stops after its current step, then a CANCELLED result
  };
  virtual CancelOutcome Cancel(const std::string& job_id) = 0;

  // Removes and returns every job not yet started, i.e. not denoising: queued, prefetched or
  // being encoded (a graceful stop hands them back to the coordinator). The runner produces no
  // result or progress for them afterwards.
  virtual std::vector<Job> TakeQueued() = 0;

  // The running job's id first, then the queued ones in order.
  virtual std::vector<std::string> ActiveJobIds() const = 0;
  // Digests loaded in memory, as of the end of the last job.
  virtual std::vector<std::string> LoadedPackages() const = 0;
  // "<model>/<precision>" → LoraSetKey of the LoRA set merged there, as of the end of the last
  // job (entries with "" = base are left out).
  virtual std::map<std::string, std::string> AppliedLoras() const { return {}; }
  // Nothing running and nothing queued. Results of finished jobs are queued (in the Outbox)
  // before a runner turns idle.
  virtual bool idle() const = 0;
};

}  // namespace kiln::node
