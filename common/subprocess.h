// Runs a child process to completion and captures its output. Used where kiln shells out to a
// tool (kiln-compile). Thread-compatible; blocks the calling thread.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kiln {

struct ProcessResult {
  int exit_code = -1;    // exit status, or 128+signal if killed by a signal
  std::string stdout_text;
  std::string stderr_text;
};

// Runs argv[0] (looked up in PATH if it has no '/') with argv. When `echo_stderr` is set the
// child's stderr is also copied to ours as it arrives (progress stays visible).
// Returns NotFound if the program cannot be started; a non-zero exit is a result, not an error.
absl::StatusOr<ProcessResult> RunProcess(const std::vector<std::string>& argv,
                                         bool echo_stderr = false);

}  // namespace kiln
