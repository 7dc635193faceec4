// ScalingSignal: what an autoscaler (KEDA, an HPA on external metrics) needs to size the node
// fleet, per model and precision: jobs queued, the estimated wait of the next job submitted,
// nodes ready to run such a job and how many of them are busy. The status board feeds it the
// coordinator's finished jobs and computes it on every snapshot; CoordinatorMetrics exports the
// rows as kiln_scaling_* gauges (README "Scaling"). Thread-safe (one mutex); no I/O.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "common/proto/kiln.pb.h"

namespace kiln::coordinator {

struct ScalingRow {
  std::string model;
  std::string precision;    // CoordinatorMetrics::PrecisionLabel: fp32 | bf16 | fp8 | default
  int queued = 0;           // jobs waiting at the coordinator
  double wait_seconds = 0;  // estimated wait of the next job submitted (see Compute)
  int nodes_ready = 0;      // READY nodes that serve the model and precision, busy or not
  int nodes_busy = 0;       // of those, the ones running at least one job
};

class ScalingSignal {
 public:
  // A job reached a final state: a succeeded one updates the run-time estimate of its model and
  // precision (an exponentially weighted mean of JobInfo.run_seconds, weight kRunWeight).
  void ObserveFinished(const kiln::v1::JobInfo& job);

  // One row per (model, precision) that has queued jobs or that a READY node serves, sorted.
  // A node serves (model, precision) when it lists the model and either has a package set for
  // that precision ("<model>/<precision>/<W>x<H>") or lists no package set for the model at all;
  // a job of precision "" (the node's default) is served by every node of its model.
  // wait_seconds: 0 when an idle ready node is left for the next job; otherwise
  // (1 + floor((queued - idle) / max(ready, 1))) × the mean run time, that is the rounds of jobs
  // the ready nodes (at least one, as if one came) must finish first. 0 until a job of that model
  // and precision has succeeded.
  std::vector<ScalingRow> Compute(const kiln::v1::ListNodesReply& nodes,
                                  const std::vector<kiln::v1::JobSpec>& queued) const;

  static constexpr double kRunWeight = 0.2;

 private:
  mutable absl::Mutex mu_;
  std::map<std::pair<std::string, std::string>, double> run_seconds_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln::coordinator
