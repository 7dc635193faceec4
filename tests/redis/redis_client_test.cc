// RedisClient against a real redis-server (ephemeral port, AOF on): commands, scripts with the
// EVALSHA → EVAL fallback, error mapping, an unreachable server, a killed and restarted one, one
// that stops answering (timeout), and the counters.
#include "redis/redis_client.h"

#include <chrono>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "tests/redis/redis_test_support.h"

namespace kiln::redis {
namespace {

using testing::RedisServer;

double MetricValue(prometheus::Registry& registry, const std::string& name,
                   const std::map<std::string, std::string>& labels) {
  for (const auto& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const auto& m : family.metric) {
      bool match = true;
      for (const auto& [k, v] : labels) {
        bool found = false;
        for (const auto& l : m.label) found |= l.name == k && l.value == v;
        match &= found;
      }
      if (match) return family.type == prometheus::MetricType::Gauge ? m.gauge.value
                                                                      : m.counter.value;
    }
  }
  return -1;
}

TEST(ParseRedisUrl, AcceptsHostPortDb) {
  auto o = ParseRedisUrl("redis://10.0.0.5:6380/3");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->host, "10.0.0.5");
  EXPECT_EQ(o->port, 6380);
  EXPECT_EQ(o->db, 3);
  auto d = ParseRedisUrl("redis://cache-host");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->port, 6379);
  EXPECT_EQ(d->db, 0);
  EXPECT_EQ(d->Url(), "redis://cache-host:6379/0");
}

TEST(ParseRedisUrl, RejectsBadUrls) {
  for (const char* bad : {"/mnt/shared", "redis://", "redis://h:0/0", "redis://h:99999",
                          "redis://h:x/0", "redis://h:6379/-1", "redis://h:6379/db",
                          "redis://user:pw@h:6379/0"}) {
    auto o = ParseRedisUrl(bad);
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_TRUE(IsRedisUrl("redis://x"));
  EXPECT_FALSE(IsRedisUrl("/tmp/redis://x"));
}

TEST(RedisOptions, ValidateNamesTheField) {
  RedisOptions o;
  o.port = 0;
  EXPECT_TRUE(absl::StrContains(o.Validate().message(), "port"));
  o = RedisOptions();
  o.command_timeout_ms = 0;
  EXPECT_TRUE(absl::StrContains(o.Validate().message(), "command_timeout_ms"));
}

class RedisClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    KILN_REQUIRE_REDIS();
    ASSERT_TRUE(server_.Start());
    auto c = RedisClient::Create(server_.options(), &registry_);
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = std::move(*c);
  }
  double Commands(const std::string& result) {
    return MetricValue(registry_, "kiln_redis_commands_total", {{"result", result}});
  }

  RedisServer server_;
  prometheus::Registry registry_;
  std::unique_ptr<RedisClient> client_;
};

TEST_F(RedisClientTest, BinarySafeRoundTrip) {
  const std::string value("a\0b\r\n\xff", 6);
  auto set = client_->Command({"SET", "kiln:test:k", value});
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->str, "OK");
  auto get = client_->Command({"GET", "kiln:test:k"});
  ASSERT_TRUE(get.ok()) << get.status();
  EXPECT_EQ(get->type, Reply::Type::kString);
  EXPECT_EQ(get->str, value);
  auto missing = client_->Command({"GET", "kiln:test:none"});
  ASSERT_TRUE(missing.ok());
  EXPECT_TRUE(missing->is_nil());
  auto list = client_->Command({"RPUSH", "kiln:test:l", "x", "y"});
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->integer, 2);
  auto range = client_->Command({"LRANGE", "kiln:test:l", "0", "-1"});
  ASSERT_TRUE(range.ok());
  ASSERT_EQ(range->elements.size(), 2u);
  EXPECT_EQ(range->elements[1].str, "y");
  EXPECT_GE(Commands("ok"), 5);
  EXPECT_EQ(MetricValue(registry_, "kiln_redis_connected", {}), 1);
}

TEST_F(RedisClientTest, ErrorRepliesMapToCodes) {
  ASSERT_TRUE(client_->Command({"SET", "kiln:test:s", "x"}).ok());
  auto wrong = client_->Command({"HGET", "kiln:test:s", "f"});
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kDataLoss) << wrong.status();
  auto unknown = client_->Command({"NOSUCHCOMMAND"});
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInternal) << unknown.status();
  EXPECT_EQ(Commands("error"), 2);
  // The connection survives error replies.
  EXPECT_TRUE(client_->Command({"PING"}).ok());
}

TEST_F(RedisClientTest, ScriptsSurviveAScriptFlush) {
  Script script(
      "if ARGV[1] == 'bad' then return redis.error_reply('FAILED_PRECONDITION fenced: token ' "
      ".. ARGV[1]) end return redis.call('INCRBY', KEYS[1], ARGV[1])");
  auto one = client_->Eval(script, {"kiln:test:n"}, {"2"});
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ(one->integer, 2);
  ASSERT_TRUE(client_->Command({"SCRIPT", "FLUSH"}).ok());
  auto two = client_->Eval(script, {"kiln:test:n"}, {"3"});  // NOSCRIPT → EVAL
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ(two->integer, 5);
  auto bad = client_->Eval(script, {"kiln:test:n"}, {"bad"});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kFailedPrecondition) << bad.status();
  EXPECT_EQ(bad.status().message(), "fenced: token bad");
}

// ScriptFor's parts: a prologue that may end the script early and defines a function the body
// calls (as the job store's fenced scripts do).
constexpr char kPrologue[] =
    "if ARGV[1] == 'stop' then return 'stopped' end\n"
    "local function twice(x) return 2 * x end\n";
constexpr char kBody[] = "return twice(tonumber(ARGV[1]))";

TEST_F(RedisClientTest, ScriptForJoinsItsPartsIntoOneScript) {
  const Script& joined = ScriptFor<kPrologue, kBody>();
  EXPECT_EQ(&joined, (&ScriptFor<kPrologue, kBody>()));  // made once
  EXPECT_EQ(joined.source(), std::string(kPrologue) + kBody);
  EXPECT_EQ(ScriptFor<kBody>().source(), kBody);
  auto four = client_->Eval(joined, {}, {"2"});
  ASSERT_TRUE(four.ok()) << four.status();
  EXPECT_EQ(four->integer, 4);
  auto stopped = client_->Eval(joined, {}, {"stop"});
  ASSERT_TRUE(stopped.ok()) << stopped.status();
  EXPECT_EQ(stopped->str, "stopped");
}

TEST_F(RedisClientTest, KilledAndRestartedServer) {
  ASSERT_TRUE(client_->Command({"SET", "kiln:test:durable", "1"}).ok());
  server_.Kill();
  auto down = client_->Command({"GET", "kiln:test:durable"});
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable) << down.status();
  EXPECT_FALSE(client_->connected());
  // While down: clear errors, fast (the backoff keeps the client off the network).
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 50; ++i) {
    auto r = client_->Command({"GET", "kiln:test:durable"});
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_TRUE(absl::StrContains(r.status().message(), server_.url().substr(8)))
        << r.status();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
  EXPECT_GE(Commands("unavailable"), 51);
  EXPECT_GE(MetricValue(registry_, "kiln_redis_connects_total", {{"result", "failed"}}), 1);
  EXPECT_EQ(MetricValue(registry_, "kiln_redis_connected", {}), 0);

  ASSERT_TRUE(server_.Start());
  absl::StatusOr<Reply> back = absl::UnavailableError("not yet");
  for (int i = 0; i < 100 && !back.ok(); ++i) {
    back = client_->Command({"GET", "kiln:test:durable"});
    if (!back.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->str, "1");  // AOF with appendfsync always kept it
}

TEST_F(RedisClientTest, AServerThatStopsAnsweringTimesOut) {
  ASSERT_TRUE(client_->Command({"PING"}).ok());
  server_.Stop();
  const auto start = std::chrono::steady_clock::now();
  auto r = client_->Command({"PING"});
  const auto took = std::chrono::steady_clock::now() - start;
  server_.Continue();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "no reply within 1000 ms")) << r.status();
  EXPECT_GE(took, std::chrono::milliseconds(900));
  EXPECT_LT(took, std::chrono::milliseconds(3000));
  // Reconnects after the backoff.
  absl::Status ping = absl::UnavailableError("not yet");
  for (int i = 0; i < 100 && !ping.ok(); ++i) {
    ping = client_->Ping();
    if (!ping.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(ping.ok()) << ping;
}

TEST(RedisClientNoServer, UnreachableIsUnavailable) {
  RedisOptions o;
  o.port = testing::FreePort();
  o.reconnect_initial_ms = 10000;
  o.reconnect_max_ms = 10000;
  prometheus::Registry registry;
  auto client = RedisClient::Create(o, &registry);
  ASSERT_TRUE(client.ok());
  auto first = (*client)->Command({"PING"});
  EXPECT_EQ(first.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(first.status().message(), "cannot connect")) << first.status();
  auto second = (*client)->Command({"PING"});
  EXPECT_TRUE(absl::StrContains(second.status().message(), "next attempt in")) << second.status();
  EXPECT_EQ(MetricValue(registry, "kiln_redis_connects_total", {{"result", "failed"}}), 1);
}

}  // namespace
}  // namespace kiln::redis
