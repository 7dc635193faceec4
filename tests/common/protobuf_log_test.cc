// libprotobuf's own log lines go through kiln's log with a rate limit: a peer flooding frames with
// invalid UTF-8 in a string field (each parse makes libprotobuf log an error) cannot flood the
// process log (issue 12: 1.18 GB of log in 10 s).
#include <mutex>
#include <string>
#include <vector>

#include "common/log.h"
#include "common/proto/kiln.pb.h"
#include "common/wire.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

TEST(LogRateLimiter, LetsABurstThroughThenOneEventPerRefillAndCountsTheRest) {
  LogRateLimiter limiter(3, 1);
  int64_t suppressed = -1;
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(limiter.Allow(1000, &suppressed));
  EXPECT_EQ(suppressed, 0);
  for (int i = 0; i < 100; ++i) EXPECT_FALSE(limiter.Allow(1000 + i, &suppressed));
  EXPECT_TRUE(limiter.Allow(2001, &suppressed));
  EXPECT_EQ(suppressed, 100);
}

TEST(ProtobufLogHandler, AnInvalidUtf8FloodIsRateLimited) {
  std::mutex mu;
  std::vector<std::string> lines;
  LogOptions options;
  options.program = "test";
  options.sink = [&](const std::string& line) {
    std::lock_guard<std::mutex> lock(mu);
    lines.push_back(line);
  };
  ConfigureLogging(options);

  kiln::v1::Envelope env;
  env.set_protocol_version(kProtocolVersion);
  env.mutable_submit()->mutable_spec()->set_prompt("AAAAAAAA");
  std::string bytes = env.SerializeAsString();
  const size_t at = bytes.find("AAAAAAAA");
  ASSERT_NE(at, std::string::npos);
  bytes.replace(at, 8, "\xff\xfe\xff\xfe\xff\xfe\xff\xfe");

  const int64_t before = ProtobufLogLines();
  for (int i = 0; i < 10000; ++i) (void)Decode(bytes);
  const int64_t attempted = ProtobufLogLines() - before;
  EXPECT_GE(attempted, 10000) << "libprotobuf did not log the invalid UTF-8; the test is moot";
  size_t protobuf_lines = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& l : lines) protobuf_lines += l.find(" protobuf: ") != std::string::npos;
    ASSERT_FALSE(lines.empty());
    EXPECT_THAT(lines.front(), ::testing::HasSubstr("UTF-8"));
  }
  EXPECT_LE(protobuf_lines, 12u);  // the burst of 10 (+1 per second the loop took)
  EXPECT_GE(ProtobufLogLinesDropped(), attempted - 12);
  ConfigureLogging(LogOptions{});
}

}  // namespace
}  // namespace kiln
