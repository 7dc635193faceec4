#include "common/log_flags.h"

#include "absl/flags/flag.h"
#include "common/log.h"

ABSL_FLAG(std::string, log_format, "text",
          "log lines on stderr: text, or json (one JSON object per line)");

namespace kiln {

absl::Status InitLoggingFromFlags(const std::string& program) {
  LogOptions options;
  options.program = program;
  auto format = ParseLogFormat(absl::GetFlag(FLAGS_log_format));
  if (format.ok()) options.format = *format;
  ConfigureLogging(std::move(options));
  return format.status();
}

}  // namespace kiln
