// common/log.h: line formats (text and JSON), levels, the sink, LineLogger, --log_format parsing.
#include "common/log.h"

#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/civil_time.h"
#include "common/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;

absl::Time At() {
  return absl::FromCivil(absl::CivilSecond(2026, 12, 4, 16, 30, 28), absl::UTCTimeZone()) +
         absl::Milliseconds(123);
}

TEST(LogFormatTest, TextLine) {
  EXPECT_EQ(FormatLogLine(LogFormat::kText, At(), LogLevel::kWarning, "kiln-node", "cache",
                          "evicted package p"),
            "2026-12-04T16:30:28.123Z WARNING kiln-node cache: evicted package p");
  // One event stays one line.
  EXPECT_EQ(FormatLogLine(LogFormat::kText, At(), LogLevel::kInfo, "p", "c", "a\nb"),
            "2026-12-04T16:30:28.123Z INFO p c: a b");
}

TEST(LogFormatTest, JsonLineIsOneObject) {
  const std::string line = FormatLogLine(LogFormat::kJson, At(), LogLevel::kError,
                                         "kiln-coordinator", "coordinator",
                                         "job \"j1\" failed:\nline two \xff");
  EXPECT_EQ(line.find('\n'), std::string::npos);
  const auto j = nlohmann::json::parse(line);
  EXPECT_EQ(j["time"], "2026-12-04T16:30:28.123Z");
  EXPECT_EQ(j["level"], "error");
  EXPECT_EQ(j["program"], "kiln-coordinator");
  EXPECT_EQ(j["component"], "coordinator");
  EXPECT_GT(j["pid"].get<int>(), 0);
  EXPECT_THAT(j["msg"].get<std::string>(), HasSubstr("job \"j1\" failed:\nline two"));
}

TEST(LogFormatTest, ParseLogFormat) {
  EXPECT_EQ(*ParseLogFormat("text"), LogFormat::kText);
  EXPECT_EQ(*ParseLogFormat("JSON"), LogFormat::kJson);
  const auto bad = ParseLogFormat("yaml");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ErrorField(bad.status()), "--log_format");
}

class LogTest : public ::testing::Test {
 protected:
  void Capture(LogFormat format, LogLevel min_level = LogLevel::kInfo) {
    LogOptions o;
    o.program = "test";
    o.format = format;
    o.min_level = min_level;
    o.sink = [this](const std::string& line) {
      std::lock_guard<std::mutex> lock(mu_);
      lines_.push_back(line);
    };
    ConfigureLogging(std::move(o));
  }
  void TearDown() override { ConfigureLogging(LogOptions{}); }
  std::vector<std::string> Lines() {
    std::lock_guard<std::mutex> lock(mu_);
    return lines_;
  }

  std::mutex mu_;
  std::vector<std::string> lines_;
};

TEST_F(LogTest, LevelsBelowTheMinimumAreDropped) {
  Capture(LogFormat::kText, LogLevel::kWarning);
  LogInfo("cache", "quiet");
  LogWarning("cache", "loud");
  LogError("cache", "louder");
  const auto lines = Lines();
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_THAT(lines[0], MatchesRegex(".*Z WARNING test cache: loud"));
  EXPECT_THAT(lines[1], MatchesRegex(".*Z ERROR test cache: louder"));
}

TEST_F(LogTest, LineLoggerRoutesThroughTheProcessLog) {
  Capture(LogFormat::kJson);
  auto log = LineLogger("coordinator");
  log("node n1 registered");
  const auto lines = Lines();
  ASSERT_EQ(lines.size(), 1u);
  const auto j = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(j["component"], "coordinator");
  EXPECT_EQ(j["level"], "info");
  EXPECT_EQ(j["msg"], "node n1 registered");
}

TEST_F(LogTest, ProgramDefaultsToTheExecutablesName) {
  LogOptions o;
  o.sink = [this](const std::string& line) {
    std::lock_guard<std::mutex> lock(mu_);
    lines_.push_back(line);
  };
  ConfigureLogging(std::move(o));
  LogInfo("c", "m");
  const auto lines = Lines();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_THAT(lines[0], MatchesRegex(".*Z INFO common_log_test c: m"));
}

TEST_F(LogTest, ThreadsWriteWholeLines) {
  Capture(LogFormat::kJson);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t] {
      for (int i = 0; i < 100; ++i) LogInfo("t", std::string(200, static_cast<char>('a' + t)));
    });
  }
  for (auto& t : threads) t.join();
  const auto lines = Lines();
  ASSERT_EQ(lines.size(), 400u);
  for (const auto& line : lines) {
    const auto j = nlohmann::json::parse(line);  // throws (fails the test) on a torn line
    EXPECT_EQ(j["msg"].get<std::string>().size(), 200u);
  }
}

}  // namespace
}  // namespace kiln
