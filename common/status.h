// Status helpers shared by every component: the field error (a Status that names the field it is
// about, the same way everywhere: "spec.width: 300 is not a multiple of 16") and the one policy
// that turns a Status into a process exit code. Thread-safe (no state).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kiln {

// A status whose message is "<field>: <message>" and that carries `field` as a payload, so code
// that handles it (a transport filling ErrorReply.field, a CLI choosing its exit code) reads the
// field without parsing the message. Fields are dotted paths from the checked object:
// "spec.width", "register_node.info.node_id", "heartbeat_interval_ms".
absl::Status FieldError(absl::StatusCode code, absl::string_view field, absl::string_view message);
inline absl::Status InvalidField(absl::string_view field, absl::string_view message) {
  return FieldError(absl::StatusCode::kInvalidArgument, field, message);
}
// Attaches `field` to an existing status (keeps code and message); OK stays OK.
absl::Status WithField(absl::Status status, absl::string_view field);
// The field a FieldError names, "" if none.
std::string ErrorField(const absl::Status& status);

// Process exit codes (README.md, cli/README.md): 0 ok, 2 bad input, 1 anything else. The CLI adds
// 3 (a job that failed) on top, for a result rather than an error.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitBadInput = 2;

// What FAILED_PRECONDITION means to the process that reports it.
enum class ExitContext {
  // Starting a process (kiln-run, kiln-node, kiln-coordinator): the flags asked for something
  // this machine or model cannot do (fp8 on a CPU, a CUDA device without a driver): bad input.
  kStartup,
  // A command against a running system (the `kiln` CLI): the system is not in a state for it
  // (the cluster is down, the job already finished): not the caller's input.
  kCommand,
};

// 0 for OK; 2 for a status that names a field (ErrorField), INVALID_ARGUMENT, NOT_FOUND,
// ALREADY_EXISTS, OUT_OF_RANGE, and FAILED_PRECONDITION under ExitContext::kStartup; 1 otherwise.
int ExitCodeFor(const absl::Status& status, ExitContext context = ExitContext::kStartup);

}  // namespace kiln
