// The --log_format flag every kiln executable takes (text | json), defined once here so that a
// main needs one call after parsing its flags. Only mains call this (STYLE: only main reads flags).
#pragma once

#include <string>

#include "absl/status/status.h"

namespace kiln {

// Configures the process log (common/log.h) from --log_format for `program` ("kiln-node").
// InvalidArgument naming --log_format for a value that is not text or json (the log is then left
// in text format, so the caller can still report the error).
absl::Status InitLoggingFromFlags(const std::string& program);

}  // namespace kiln
