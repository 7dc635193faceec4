// DiskHealth: whether the node's package directory can be written, checked the only way that
// tells (write + fsync + delete a probe file), periodically by its own thread and on demand after
// a job failed. A node whose disk is full or read-only reports not ready (/readyz, and the
// `unhealthy` reason in its heartbeats, so the coordinator places nothing on it), refuses new
// jobs with UNAVAILABLE, and turns a failed job's error into one line that says what, where and
// what to do (DiskFailure), with a code the coordinator requeues on: RESOURCE_EXHAUSTED for a
// full disk, UNAVAILABLE for one it may not write. The node's own log keeps the original error.
//
// Threads: CheckNow(), status() and reason() from any thread; the probing thread is owned and
// joined by this object (Start/Stop).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace kiln::node {

struct DiskHealthOptions {
  std::string dir;              // the package directory to probe (created by the provider)
  int64_t probe_bytes = 65536;  // bytes written per probe (a nearly full disk fails it too)
  int64_t interval_ms = 5000;   // between periodic probes (ms); 0 = only on demand
};

// One probe of `dir`: creates a unique dot-file, writes `bytes`, fsyncs, closes, deletes.
// OK, or ResourceExhausted (ENOSPC, EDQUOT) / Unavailable (EACCES, EPERM, EROFS, EIO, anything
// else) naming the directory and the error.
absl::Status ProbeDisk(const std::string& dir, int64_t bytes);

class DiskHealth {
 public:
  explicit DiskHealth(DiskHealthOptions options);
  ~DiskHealth();  // Stop()
  DiskHealth(const DiskHealth&) = delete;
  DiskHealth& operator=(const DiskHealth&) = delete;

  // Starts the periodic probe thread (none if interval_ms is 0). Once.
  void Start();
  void Stop();

  // Probes now and records the result (logged when it changes).
  absl::Status CheckNow();
  // The last probe's result (OK before the first).
  absl::Status status() const;
  // "" when healthy; else one line for people: what, where, what to do.
  std::string reason() const;
  const std::string& dir() const { return options_.dir; }

 private:
  const DiskHealthOptions options_;
  mutable absl::Mutex mu_;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  absl::Notification stop_;
  std::thread thread_;
};

// What a job whose run failed with `error` should report, given the node's disk: `error` itself
// when `disk` is healthy (or null); else the disk's status code with one line naming the node,
// the directory and the remedy, and saying the job moves to another node.
absl::Status DiskFailure(const absl::Status& error, DiskHealth* disk, const std::string& node_id);

}  // namespace kiln::node
