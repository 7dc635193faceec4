// The node's connection logic on a fake clock: immediate first connect, registration, heartbeat
// cadence, death after 3 silent intervals, exponential reconnect backoff (100 ms → 5 s) that
// starts over after a successful registration.
#include "node/coordinator_link.h"

#include "gtest/gtest.h"

namespace kiln::node {
namespace {

using State = CoordinatorLink::State;

TEST(CoordinatorLinkTest, RegistersHeartbeatsAndDetectsSilence) {
  FakeClock clock;
  CoordinatorLink link(LinkOptions{}, clock, {"tcp://a:1"});
  EXPECT_EQ(link.state(), State::kDisconnected);
  EXPECT_TRUE(link.ShouldConnect());  // the first connection is immediate
  EXPECT_EQ(link.MsUntilNextEvent(), 0);
  link.OnRegisterSent();
  EXPECT_EQ(link.state(), State::kRegistering);
  EXPECT_FALSE(link.HeartbeatDue());  // no heartbeats before RegisterAck
  EXPECT_EQ(link.MsUntilNextEvent(), 3000);
  clock.AdvanceMs(200);
  link.OnRegistered(/*heartbeat_interval_ms=*/500);  // the coordinator's interval wins
  EXPECT_TRUE(link.registered());
  EXPECT_EQ(link.heartbeat_interval_ms(), 500);
  EXPECT_FALSE(link.HeartbeatDue());
  EXPECT_EQ(link.MsUntilNextEvent(), 500);
  clock.AdvanceMs(500);
  EXPECT_TRUE(link.HeartbeatDue());
  link.OnHeartbeatSent();
  EXPECT_FALSE(link.HeartbeatDue());
  clock.AdvanceMs(400);
  link.OnHeard();
  clock.AdvanceMs(1499);  // 3 intervals = 1500 ms of silence
  EXPECT_FALSE(link.PeerDead());
  clock.AdvanceMs(1);
  EXPECT_TRUE(link.PeerDead());
  link.OnDisconnected();
  EXPECT_EQ(link.state(), State::kDisconnected);
  EXPECT_FALSE(link.PeerDead());
  EXPECT_FALSE(link.HeartbeatDue());
  EXPECT_FALSE(link.ShouldConnect());
  EXPECT_EQ(link.MsUntilNextEvent(), 100);
  clock.AdvanceMs(100);
  EXPECT_TRUE(link.ShouldConnect());
}

TEST(CoordinatorLinkTest, ZeroIntervalInAckKeepsOurs) {
  FakeClock clock;
  LinkOptions o;
  o.heartbeat_interval_ms = 250;
  CoordinatorLink link(o, clock, {"tcp://a:1"});
  link.OnRegisterSent();
  link.OnRegistered(0);
  EXPECT_EQ(link.heartbeat_interval_ms(), 250);
}

TEST(CoordinatorLinkTest, BackoffDoublesToTheCapAndResetsAfterRegistering) {
  FakeClock clock;
  CoordinatorLink link(LinkOptions{}, clock, {"tcp://a:1"});
  std::vector<int64_t> delays;
  for (int i = 0; i < 9; ++i) {
    ASSERT_TRUE(link.ShouldConnect());
    link.OnRegisterSent();
    clock.AdvanceMs(3000);  // never acked: dead after 3 x 1000 ms
    ASSERT_TRUE(link.PeerDead());
    link.OnDisconnected();
    const int64_t start = clock.NowMs();
    while (!link.ShouldConnect()) clock.AdvanceMs(link.MsUntilNextEvent());
    delays.push_back(clock.NowMs() - start);
  }
  EXPECT_EQ(delays, (std::vector<int64_t>{100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000}));
  link.OnRegisterSent();
  link.OnRegistered(1000);
  clock.AdvanceMs(3000);
  link.OnDisconnected();
  EXPECT_EQ(link.MsUntilNextEvent(), 100);
}

TEST(CoordinatorLinkTest, ReRegisteringOnTheOpenSocket) {
  FakeClock clock;
  CoordinatorLink link(LinkOptions{}, clock, {"tcp://a:1"});
  link.OnRegisterSent();
  link.OnRegistered(1000);
  clock.AdvanceMs(2500);
  link.OnRegisterSent();  // the coordinator said "not registered"
  EXPECT_EQ(link.state(), State::kRegistering);
  EXPECT_FALSE(link.HeartbeatDue());
  clock.AdvanceMs(2999);
  EXPECT_FALSE(link.PeerDead());  // the silence clock restarted with the request
}

TEST(CoordinatorLinkTest, RotatesThroughEndpointsAndBacksOffPerRound) {
  FakeClock clock;
  CoordinatorLink link(LinkOptions{}, clock, SplitEndpoints("tcp://a:1,tcp://b:1,,tcp://c:1"));
  ASSERT_EQ(link.endpoints(), (std::vector<std::string>{"tcp://a:1", "tcp://b:1", "tcp://c:1"}));
  std::vector<std::string> tried;
  std::vector<int64_t> delays;
  for (int i = 0; i < 7; ++i) {
    ASSERT_TRUE(link.ShouldConnect());
    tried.push_back(link.endpoint());
    link.OnRegisterSent();
    clock.AdvanceMs(3000);  // no answer (a standby binds nothing)
    ASSERT_TRUE(link.PeerDead());
    link.OnDisconnected();
    const int64_t start = clock.NowMs();
    while (!link.ShouldConnect()) clock.AdvanceMs(link.MsUntilNextEvent());
    delays.push_back(clock.NowMs() - start);
  }
  EXPECT_EQ(tried, (std::vector<std::string>{"tcp://a:1", "tcp://b:1", "tcp://c:1", "tcp://a:1",
                                             "tcp://b:1", "tcp://c:1", "tcp://a:1"}));
  // Quick within a round; the round's delay doubles: 100, 200, 400.
  EXPECT_EQ(delays, (std::vector<int64_t>{100, 100, 100, 100, 100, 200, 100}));
  // Registered with b, then b dies: c next, and the backoff has started over.
  link.OnRegisterSent();
  link.OnRegistered(1000);
  EXPECT_EQ(link.endpoint(), "tcp://b:1");
  clock.AdvanceMs(3000);
  link.OnDisconnected();
  EXPECT_EQ(link.endpoint(), "tcp://c:1");
  EXPECT_EQ(link.MsUntilNextEvent(), 100);
}

TEST(CoordinatorLinkTest, SplitEndpointsDropsBlanks) {
  EXPECT_EQ(SplitEndpoints(" tcp://a:1 , tcp://b:2,"),
            (std::vector<std::string>{"tcp://a:1", "tcp://b:2"}));
  EXPECT_TRUE(SplitEndpoints("").empty());
}

TEST(LinkOptionsTest, ValidateNamesTheField) {
  LinkOptions o;
  EXPECT_TRUE(o.Validate().ok());
  o.heartbeat_interval_ms = 0;
  EXPECT_EQ(o.Validate().message(), "heartbeat_interval_ms: must be > 0");
  o = LinkOptions{};
  o.backoff_max_ms = 50;
  EXPECT_EQ(o.Validate().code(), absl::StatusCode::kInvalidArgument);
  o = LinkOptions{};
  o.missed_heartbeats = 0;
  EXPECT_EQ(o.Validate().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kiln::node
