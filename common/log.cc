#include "common/log.h"

#include <errno.h>  // program_invocation_short_name
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <mutex>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/clock.h"
#include "google/protobuf/stubs/logging.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace {

// The one process-wide logger (see log.h: stderr is one per process). Leaked on purpose so that
// threads still logging during static destruction find it alive.
struct Logger {
  std::mutex mu;
  LogOptions options;  // guarded by mu
  std::string program;  // options.program, or the executable's name; guarded by mu
};

std::string ProgramName(const LogOptions& options) {
  // glibc's short name of argv[0]: right even before (or without) ConfigureLogging.
  return options.program.empty() ? std::string(program_invocation_short_name) : options.program;
}

Logger& TheLogger() {
  static Logger* logger = [] {
    auto* l = new Logger;
    l->program = ProgramName(l->options);
    return l;
  }();
  return *logger;
}

void WriteStderr(const std::string& line) {
  const std::string text = line + "\n";
  std::fwrite(text.data(), 1, text.size(), stderr);
  std::fflush(stderr);
}

}  // namespace

const char* LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "info";
}

absl::StatusOr<LogFormat> ParseLogFormat(absl::string_view text) {
  const std::string lower = absl::AsciiStrToLower(text);
  if (lower == "text") return LogFormat::kText;
  if (lower == "json") return LogFormat::kJson;
  return InvalidField("--log_format", absl::StrCat("'", text, "' is not one of text, json"));
}

void ConfigureLogging(LogOptions options) {
  InstallProtobufLogHandler();
  Logger& logger = TheLogger();
  std::lock_guard<std::mutex> lock(logger.mu);
  logger.options = std::move(options);
  logger.program = ProgramName(logger.options);
}

std::string FormatLogLine(LogFormat format, absl::Time time, LogLevel level,
                          absl::string_view program, absl::string_view component,
                          absl::string_view message) {
  const std::string stamp = absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", time, absl::UTCTimeZone());
  if (format == LogFormat::kJson) {
    // nlohmann::json escapes control characters and quotes; invalid UTF-8 is replaced rather
    // than thrown on, so a line is always written.
    const nlohmann::json j = {{"time", stamp},
                              {"level", LogLevelName(level)},
                              {"program", std::string(program)},
                              {"pid", static_cast<int>(::getpid())},
                              {"component", std::string(component)},
                              {"msg", std::string(message)}};
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  }
  std::string line = absl::StrCat(stamp, " ", absl::AsciiStrToUpper(LogLevelName(level)), " ",
                                  program, " ", component, ": ", message);
  // One event, one line: a multi-line message keeps its lines together.
  for (char& c : line) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return line;
}

void Log(LogLevel level, absl::string_view component, absl::string_view message) {
  Logger& logger = TheLogger();
  std::lock_guard<std::mutex> lock(logger.mu);
  const LogOptions& o = logger.options;
  if (level < o.min_level) return;
  const std::string line =
      FormatLogLine(o.format, absl::Now(), level, logger.program, component, message);
  if (o.sink) {
    o.sink(line);
  } else {
    WriteStderr(line);
  }
}

std::function<void(const std::string& line)> LineLogger(std::string component, LogLevel level) {
  return [component = std::move(component), level](const std::string& line) {
    Log(level, component, line);
  };
}

bool LogRateLimiter::Allow(int64_t now_ms, int64_t* suppressed) {
  if (last_ms_ >= 0 && now_ms > last_ms_) {
    tokens_ = std::min(burst_, tokens_ + (now_ms - last_ms_) * per_second_ / 1000.0);
  }
  if (last_ms_ < 0 || now_ms > last_ms_) last_ms_ = now_ms;
  if (tokens_ < 1.0) {
    ++suppressed_;
    return false;
  }
  tokens_ -= 1.0;
  *suppressed = suppressed_;
  suppressed_ = 0;
  return true;
}

namespace {

struct ProtobufLogState {
  std::mutex mu;
  LogRateLimiter limiter{10, 1};
  std::atomic<int64_t> lines{0};
  std::atomic<int64_t> dropped{0};
};

ProtobufLogState& TheProtobufLogState() {
  static ProtobufLogState* state = new ProtobufLogState();
  return *state;
}

void ProtobufLogHandler(google::protobuf::LogLevel level, const char* filename, int line,
                        const std::string& message) {
  ProtobufLogState& state = TheProtobufLogState();
  state.lines.fetch_add(1);
  int64_t suppressed = 0;
  {
    std::lock_guard<std::mutex> lock(state.mu);
    if (!state.limiter.Allow(SteadyMs(), &suppressed)) {
      state.dropped.fetch_add(1);
      return;
    }
  }
  const LogLevel ours = level >= google::protobuf::LOGLEVEL_ERROR     ? LogLevel::kError
                        : level == google::protobuf::LOGLEVEL_WARNING ? LogLevel::kWarning
                                                                      : LogLevel::kInfo;
  std::string text = absl::StrCat(message, " (", filename ? filename : "?", ":", line, ")");
  if (suppressed > 0) absl::StrAppend(&text, " [", suppressed, " more protobuf lines dropped]");
  Log(ours, "protobuf", text);
}

}  // namespace

void InstallProtobufLogHandler() {
  static std::once_flag once;
  std::call_once(once, [] { google::protobuf::SetLogHandler(&ProtobufLogHandler); });
}

int64_t ProtobufLogLines() { return TheProtobufLogState().lines.load(); }
int64_t ProtobufLogLinesDropped() { return TheProtobufLogState().dropped.load(); }

}  // namespace kiln
