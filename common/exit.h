// How a main gives up: one error line in the process log and the exit code for it. Every
// executable's main (apps/, bench/) returns through this on an error, so that they all report
// and exit the same way (README.md: 0 ok, 2 bad input, 1 anything else). Only mains call this.
#pragma once

#include "absl/status/status.h"
#include "common/status.h"

namespace kiln {

// Logs `status`'s message as an error of component "main" (common/log.h) and returns
// ExitCodeFor(status, context), for main to return: `if (!s.ok()) return kiln::FailMain(s);`.
int FailMain(const absl::Status& status, ExitContext context = ExitContext::kStartup);

}  // namespace kiln
