// The process log: one line per event on stderr, each with a UTC timestamp, a level, the program
// and the component that wrote it. Two formats, chosen by main from --log_format:
//   text: 2026-12-04T16:30:28.123Z INFO kiln-coordinator coordinator: serving clients on ...
//   json: {"time":"2026-12-04T16:30:28.123Z","level":"info","program":"kiln-coordinator",
//          "pid":4242,"component":"coordinator","msg":"serving clients on ..."}
// (one object per line, nothing else on the line, so a collector can parse every line).
//
// Why not absl/log: Debian bookworm's Abseil (20220623) predates it, and glog would be one more
// dependency for a few lines of code. This is deliberately small: no verbosity flags, no files,
// no rotation (the process's supervisor owns stderr).
//
// Process-wide by nature (one stderr per process): ConfigureLogging sets the format and the
// program name once, from main, before threads start; Log() is thread-safe and writes each line
// with one write so lines of different threads never interleave. Library code calls Log() with
// its component name ("cache", "coordinator", ...); it never writes to std::cerr itself.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kiln {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };
enum class LogFormat { kText, kJson };

// "debug", "info", "warning", "error".
const char* LogLevelName(LogLevel level);
// "text" or "json"; InvalidArgument naming --log_format otherwise.
absl::StatusOr<LogFormat> ParseLogFormat(absl::string_view text);

// Where whole lines go (without the trailing newline). Default: stderr.
using LogSink = std::function<void(const std::string& line)>;

struct LogOptions {
  std::string program;                    // e.g. "kiln-node"; "" = the executable's file name
  LogFormat format = LogFormat::kText;
  LogLevel min_level = LogLevel::kInfo;   // lines below it are dropped
  LogSink sink;                           // null: stderr (tests capture lines here)
};

// Replaces the process's logging options. Called by main (and by tests that capture lines).
void ConfigureLogging(LogOptions options);

// One line (no newline) in `format`. Pure; exposed for tests.
std::string FormatLogLine(LogFormat format, absl::Time time, LogLevel level,
                          absl::string_view program, absl::string_view component,
                          absl::string_view message);

// Writes one event. `component`: the library or subsystem ("cache", "coordinator", "cli").
void Log(LogLevel level, absl::string_view component, absl::string_view message);
inline void LogInfo(absl::string_view component, absl::string_view message) {
  Log(LogLevel::kInfo, component, message);
}
inline void LogWarning(absl::string_view component, absl::string_view message) {
  Log(LogLevel::kWarning, component, message);
}
inline void LogError(absl::string_view component, absl::string_view message) {
  Log(LogLevel::kError, component, message);
}

// A callable that logs each line at `level` for `component`: the default for classes that take
// an injected line logger (coordinator::EventLog), so their lines reach the one process log.
std::function<void(const std::string& line)> LineLogger(std::string component,
                                                        LogLevel level = LogLevel::kInfo);

// Lets at most `burst` events through, refilled at `per_second`; what it holds back is counted
// so the next line let through can say how many were dropped. Thread-compatible (callers lock).
class LogRateLimiter {
 public:
  LogRateLimiter(double burst, double per_second)
      : burst_(burst), per_second_(per_second), tokens_(burst) {}
  // True when an event at `now_ms` (monotonic) may be logged; then *suppressed is the number
  // held back since the last one let through (and is reset).
  bool Allow(int64_t now_ms, int64_t* suppressed);

 private:
  double burst_, per_second_, tokens_;
  int64_t last_ms_ = -1;
  int64_t suppressed_ = 0;
};

// Routes libprotobuf's own log lines (e.g. "String field ... contains invalid UTF-8 data", written
// for every bad frame a peer sends) into the process log as component "protobuf", at most 10 lines
// at once and one a second after that, with a count of those dropped. Installed by
// ConfigureLogging; idempotent.
void InstallProtobufLogHandler();
// Lines libprotobuf tried to log since the process started, and how many were dropped.
int64_t ProtobufLogLines();
int64_t ProtobufLogLinesDropped();

}  // namespace kiln
