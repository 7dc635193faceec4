// How `kiln` shows things: jobs and nodes as text or JSON, and the progress bar of `generate` /
// `wait`. Pure formatting (ProgressBar writes to the stream it is given). Thread-compatible.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>

#include "common/job_state.h"
#include "common/proto/kiln.pb.h"
#include "nlohmann/json.hpp"

namespace kiln::cli {

// "QUEUED", "RUNNING", "SUCCEEDED", ... and "READY", "DRAINING", "DEAD", "LEFT": the proto's
// names (common/job_state.h).
using kiln::JobStateName;
using kiln::NodeStateName;

// The job as one JSON object (never the PNG bytes; png_bytes gives their size):
// {job_id, state, node_id, attempts, step, total_steps, phase, error, queue_seconds, run_seconds,
//  cold_start{weights,package_load,compile,fetch,total}, packages{component: provenance},
//  submitted_unix_ms, finished_unix_ms, png_bytes, spec{model, prompt, width, height, steps,
//  guidance, seed, precision, priority}}.
nlohmann::json JobToJson(const kiln::v1::JobInfo& job);

// A few human-readable lines: state, node, timings, cold start, packages, error.
std::string FormatJob(const kiln::v1::JobInfo& job);

// Table with columns NODE, STATE, DEVICE, RUNNING, QUEUED, DONE, LAST SEEN ("1.2s ago"
// relative to `now_unix_ms`).
std::string FormatNodesTable(const kiln::v1::ListNodesReply& nodes, int64_t now_unix_ms);
nlohmann::json NodeToJson(const kiln::v1::NodeStatus& node);

// A job's phase in words for people: "preparing" → "preparing (packages, weights)",
// "text_encoding" → "encoding text", "assigned" → "assigned, starting"; others ("queued",
// "fetching transformer", "compiling vae", "loading weights", "denoising", ...) as they are.
std::string PhaseText(const std::string& phase);

// Progress on a stream (stderr): on a terminal one line redrawn in place with a bar of steps;
// elsewhere one line per state change, phase change, waiting-reason change and quarter of the
// steps, so logs stay readable. A running job's phase (JobInfo.phase) is shown beside its
// steps; a queued job's waiting reason (JobInfo.error "waiting: ...") likewise.
class ProgressBar {
 public:
  ProgressBar(std::ostream& out, bool is_terminal, std::string job_id);
  // Shows the job's state and step; cheap when nothing changed.
  void Update(const kiln::v1::JobInfo& job);
  // Ends the line (terminal) so later output starts on a fresh line.
  void Finish();

 private:
  std::ostream& out_;
  bool terminal_;
  std::string job_id_;
  std::string last_line_;
  int last_quarter_ = -1;
  std::string last_phase_;
  std::string last_where_;
  kiln::v1::JobState last_state_ = kiln::v1::JOB_STATE_UNSPECIFIED;
  std::string last_node_;
  bool drawn_ = false;
};

}  // namespace kiln::cli
