// Failover on a fake clock: rotation through the endpoints, per-round backoff, the retry budget,
// and a success starting both over.
#include "cli/failover.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::cli {
namespace {

using ::testing::HasSubstr;

FailoverOptions Options(int64_t retry_for_ms) {
  FailoverOptions o;
  o.retry_for_ms = retry_for_ms;
  o.backoff_initial_ms = 100;
  o.backoff_max_ms = 400;
  return o;
}

TEST(Failover, RotatesQuicklyWithinARoundAndDoublesPerRound) {
  FakeClock clock;
  Failover f(SplitEndpointList("tcp://a:1,tcp://b:1"), Options(60000), clock);
  std::vector<std::string> tried;
  std::vector<int64_t> delays;
  for (int i = 0; i < 8; ++i) {
    tried.push_back(f.endpoint());
    auto delay = f.OnFailure();
    ASSERT_TRUE(delay.has_value());
    delays.push_back(*delay);
    clock.AdvanceMs(*delay);
  }
  EXPECT_EQ(tried, (std::vector<std::string>{"tcp://a:1", "tcp://b:1", "tcp://a:1", "tcp://b:1",
                                             "tcp://a:1", "tcp://b:1", "tcp://a:1", "tcp://b:1"}));
  EXPECT_EQ(delays, (std::vector<int64_t>{100, 100, 100, 200, 100, 400, 100, 400}));
  EXPECT_EQ(f.failures(), 8);
  f.OnSuccess();
  EXPECT_EQ(f.failures(), 0);
  EXPECT_EQ(f.endpoint(), "tcp://a:1");  // the one that answered stays current
  EXPECT_EQ(f.OnFailure(), 100);
  EXPECT_EQ(f.OnFailure(), 100);  // the round's backoff started over too
}

TEST(Failover, GivesUpWhenTheNextTryWouldStartPastTheBudget) {
  FakeClock clock;
  Failover f({"tcp://a:1"}, Options(1000), clock);
  int64_t waited = 0;
  int tries = 1;
  while (auto delay = f.OnFailure()) {
    clock.AdvanceMs(*delay + 50);  // each try takes 50 ms to fail
    waited += *delay;
    ++tries;
    ASSERT_LT(tries, 100);
  }
  // 100, 200, 400 (+ 50 ms per try) fit in 1 s; the next 400 would not.
  EXPECT_EQ(tries, 4);
  EXPECT_EQ(waited, 700);
  // After a success the whole budget is there again.
  f.OnSuccess();
  EXPECT_EQ(f.OnFailure(), 100);
}

TEST(Failover, ZeroBudgetNeverRetries) {
  FakeClock clock;
  Failover f({"tcp://a:1", "tcp://b:1"}, Options(0), clock);
  EXPECT_FALSE(f.OnFailure().has_value());
}

TEST(Failover, OptionsAndEndpointList) {
  FailoverOptions o;
  EXPECT_TRUE(o.Validate().ok());
  o.backoff_initial_ms = 0;
  EXPECT_THAT(o.Validate().message(), HasSubstr("backoff_initial_ms"));
  o = FailoverOptions{};
  o.backoff_max_ms = 1;
  EXPECT_THAT(o.Validate().message(), HasSubstr("backoff_max_ms"));
  EXPECT_EQ(SplitEndpointList(" tcp://a:1 ,, tcp://b:2 "),
            (std::vector<std::string>{"tcp://a:1", "tcp://b:2"}));
}

}  // namespace
}  // namespace kiln::cli
