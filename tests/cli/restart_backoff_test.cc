// RestartBackoff: doubling delays for a child that keeps dying, a fresh start after a stable run.
#include "cli/restart_backoff.h"

#include <vector>

#include "gtest/gtest.h"

namespace kiln::cli {
namespace {

TEST(RestartBackoff, DoublesToTheCapAndStartsOverAfterAStableRun) {
  RestartBackoff b(RestartOptions{100, 1000, 10000});
  std::vector<int64_t> delays;
  int64_t now = 0;
  for (int i = 0; i < 6; ++i) {
    const int64_t started = now;
    now += 50;  // dies 50 ms after each start
    const int64_t delay = b.OnExit(started, now);
    delays.push_back(delay);
    now += delay;
  }
  EXPECT_EQ(delays, (std::vector<int64_t>{100, 200, 400, 800, 1000, 1000}));
  EXPECT_EQ(b.restarts(), 6);
  EXPECT_EQ(b.OnExit(now, now + 10000), 100);  // ran 10 s: healthy, so quick again
  EXPECT_EQ(b.OnExit(0, 1), 200);
}

}  // namespace
}  // namespace kiln::cli
