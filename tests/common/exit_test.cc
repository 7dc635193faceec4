// common/exit.h: FailMain logs one error line of component "main" and returns ExitCodeFor's code.
#include "common/exit.h"

#include <string>
#include <vector>

#include "common/log.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

using ::testing::ElementsAre;
using ::testing::MatchesRegex;

class FailMainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    LogOptions o;
    o.program = "test";
    o.sink = [this](const std::string& line) { lines_.push_back(line); };
    ConfigureLogging(std::move(o));
  }
  void TearDown() override { ConfigureLogging(LogOptions{}); }

  std::vector<std::string> lines_;
};

TEST_F(FailMainTest, LogsTheMessageAsMainAndReturnsItsExitCode) {
  EXPECT_EQ(FailMain(absl::InvalidArgumentError("--model is required")), kExitBadInput);
  EXPECT_EQ(FailMain(absl::InternalError("boom")), kExitFailure);
  EXPECT_THAT(lines_, ElementsAre(MatchesRegex(".*Z ERROR test main: --model is required"),
                                  MatchesRegex(".*Z ERROR test main: boom")));
}

TEST_F(FailMainTest, ContextDecidesFailedPrecondition) {
  const absl::Status no_gpu = absl::FailedPreconditionError("no CUDA device");
  EXPECT_EQ(FailMain(no_gpu), kExitBadInput);  // start-up by default
  EXPECT_EQ(FailMain(no_gpu, ExitContext::kCommand), kExitFailure);
  EXPECT_EQ(lines_.size(), 2u);
}

}  // namespace
}  // namespace kiln
