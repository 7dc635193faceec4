// Child processes of a local cluster: start one in its own session with its output in a log
// file, tell whether a pid is still a live kiln process, stop one (SIGTERM, grace, SIGKILL).
// Works for processes this one started (they are reaped) and for ones a previous `kiln` started
// (re-parented; a zombie counts as gone). Thread-compatible; called from the main thread.
#pragma once

#include <sys/types.h>

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kiln::cli {

struct SpawnOptions {
  std::vector<std::string> argv;  // argv[0] is a path to the executable
  std::string log_path;           // stdout and stderr are appended here; stdin is /dev/null
  // setsid(): the child has its own session and process group, so the terminal's Ctrl-C
  // reaches only `kiln`, which stops the cluster in order, and the child outlives a detached
  // `kiln up`.
  bool new_session = true;
  // SIGTERM the child if this process dies (PR_SET_PDEATHSIG): a foreground `kiln up` that is
  // killed outright still takes its cluster down.
  bool die_with_parent = false;
  // Set in the child's environment on top of this process's ("CUDA_VISIBLE_DEVICES" → "1").
  std::map<std::string, std::string> env;
};

// Starts the child. NotFound if the executable cannot be run; the error says which.
// Signals blocked in the caller are unblocked in the child.
absl::StatusOr<pid_t> Spawn(const SpawnOptions& options);

// True while `pid` is a running process whose executable is named `exe_name` (checked through
// /proc so a recycled pid is not mistaken for ours; "" skips that check). Reaps it if it is our
// child and has exited.
bool ProcessAlive(pid_t pid, const std::string& exe_name = "");

// Sends `signal` if `pid` is alive (as above). OK if it was already gone.
absl::Status SignalProcess(pid_t pid, int signal, const std::string& exe_name = "");

// Waits until `pid` is gone; false if it is still alive after `timeout_ms`.
bool WaitGone(pid_t pid, int timeout_ms, const std::string& exe_name = "");

// SIGTERM, wait up to `grace_ms`, then SIGKILL (and wait briefly). Returns true if the process
// exited within the grace period (or was not there, or not named `exe_name`), false if it had to
// be killed. `exe_name` is checked once, before the first signal; the waits then follow the pid.
bool StopProcess(pid_t pid, int grace_ms, const std::string& exe_name = "");

// The last `max_bytes` of a text file (for "it died; here is its log" messages).
std::string TailOfFile(const std::string& path, size_t max_bytes = 2000);

}  // namespace kiln::cli
