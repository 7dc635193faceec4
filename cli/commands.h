// The `kiln` commands: parse the command line (cli/args.h), run the command against the local
// cluster (cli/local_cluster.h) or the coordinator (cli/coordinator_client.h), print the result.
// apps/kiln.cc calls Main(); tests call Run() with their own streams and environment.
//
// Exit status (kiln::ExitCodeFor with ExitContext::kCommand, common/status.h): 0 ok; 2 bad input
// or usage (an error that names a field, or whose code is INVALID_ARGUMENT, NOT_FOUND,
// ALREADY_EXISTS or OUT_OF_RANGE); 3 the job failed or was cancelled; 4 the coordinator answered
// NOT_FOUND (it knows no such job or node); 1 anything else (a coordinator that stayed
// unreachable through every retry).
#pragma once

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/status.h"

namespace kiln::cli {

// 0, 1 and 2 are the shared exit codes (common/status.h); 3 and 4 are the CLI's own.
inline constexpr int kExitOk = kiln::kExitOk;
inline constexpr int kExitFailure = kiln::kExitFailure;
inline constexpr int kExitUsage = kiln::kExitBadInput;
inline constexpr int kExitJobFailed = 3;
inline constexpr int kExitNotFound = 4;

// What one invocation may touch besides the filesystem and the network.
struct Io {
  std::ostream& out;  // results (paths, ids, tables, JSON)
  std::ostream& err;  // progress, notes and errors
  // Environment lookup ("" when unset): KILN_COORDINATOR.
  std::function<std::string(const std::string&)> getenv;
  bool err_is_terminal = false;  // draw the progress bar in place
};

// Runs `kiln ARGS...` (args exclude argv[0]); returns the exit status. A leading
// `--log-format text|json` configures the process log (common/log.h) first.
int Run(const std::vector<std::string>& args, Io& io);

// The process entry point: real streams and environment.
int Main(int argc, char** argv);

// The exit status for a failed Status (see file comment).
int ExitCodeFor(const absl::Status& status);

// Prints "kiln: error: CODE (field F): message" (code and field when the coordinator sent them).
void PrintError(std::ostream& err, const absl::Status& status);

}  // namespace kiln::cli
