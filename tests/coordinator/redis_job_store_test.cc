// RedisJobStore and LeaderLease against a real redis-server (ephemeral port, AOF on): the JobStore
// contract, idempotent create across store instances, PNGs and retention, fencing, the lease's
// takeover, garbage under kiln's keys, a Redis that is killed and restarted, and a Coordinator
// recovering from it.
#include "coordinator/redis_job_store.h"

#include <chrono>
#include <thread>

#include "absl/strings/match.h"
#include "coordinator/coordinator.h"
#include "coordinator/leader_lease.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "tests/redis/redis_test_support.h"

namespace kiln::coordinator {
namespace {

using ::testing::HasSubstr;
using kiln::v1::JobInfo;
using redis::testing::RedisServer;

double Metric(prometheus::Registry& registry, const std::string& name, const std::string& label,
              const std::string& value) {
  for (const auto& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const auto& m : family.metric) {
      for (const auto& l : m.label) {
        if (l.name == label && l.value == value) {
          return family.type == prometheus::MetricType::Gauge ? m.gauge.value : m.counter.value;
        }
      }
    }
  }
  return -1;
}

JobInfo MakeJob(const std::string& id, kiln::v1::JobState state = kiln::v1::JOB_STATE_QUEUED) {
  JobInfo job;
  job.mutable_spec()->set_job_id(id);
  job.mutable_spec()->set_model("flux-tiny");
  job.mutable_spec()->set_prompt("a lighthouse");
  job.mutable_spec()->set_width(256);
  job.mutable_spec()->set_height(256);
  job.mutable_spec()->set_steps(4);
  job.set_state(state);
  return job;
}

class RedisJobStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    KILN_REQUIRE_REDIS();
    ASSERT_TRUE(server_.Start());
    store_ = NewStore(registry_);
    lease_ = NewLease("coordinator-a", registry_);
    auto acquired = lease_->TryAcquire();
    ASSERT_TRUE(acquired.ok() && *acquired) << acquired.status();
    store_->SetFencingToken(lease_->token());
  }

  std::unique_ptr<RedisJobStore> NewStore(prometheus::Registry& registry,
                                          int64_t retention_ms = 3600 * 1000) {
    RedisJobStoreOptions o;
    o.key_prefix = "test";
    o.retention_ms = retention_ms;
    o.log = [this](const std::string& line) { log_.push_back(line); };
    auto s = RedisJobStore::Create(o, server_.options(), clock_, registry);
    EXPECT_TRUE(s.ok()) << s.status();
    return std::move(*s);
  }
  std::unique_ptr<LeaderLease> NewLease(const std::string& holder, prometheus::Registry& registry,
                                        int64_t ttl_ms = 1000) {
    LeaderLeaseOptions o;
    o.key_prefix = "test";
    o.holder = holder;
    o.ttl_ms = ttl_ms;
    auto l = LeaderLease::Create(o, server_.options(), registry);
    EXPECT_TRUE(l.ok()) << l.status();
    return std::move(*l);
  }
  absl::StatusOr<redis::Reply> Raw(const std::vector<std::string>& argv) {
    return store_->client().Command(argv);
  }
  double Errors(const std::string& kind) {
    return Metric(registry_, "kiln_job_store_errors_total", "kind", kind);
  }

  RedisServer server_;
  SystemClock clock_;
  prometheus::Registry registry_;
  std::unique_ptr<RedisJobStore> store_;
  std::unique_ptr<LeaderLease> lease_;
  std::vector<std::string> log_;
};

TEST_F(RedisJobStoreTest, CreateGetUpdateList) {
  auto created = store_->Create(MakeJob("j1"));
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_TRUE(created->created);
  ASSERT_TRUE(store_->Create(MakeJob("j2")).ok());
  ASSERT_TRUE(store_->Create(MakeJob("j3")).ok());
  JobInfo other = MakeJob("j1");
  other.mutable_spec()->set_prompt("something else");
  auto again = store_->Create(other);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->created);
  EXPECT_EQ(again->job.spec().prompt(), "a lighthouse");  // the stored one, untouched

  auto updated = store_->Update("j2", [](JobInfo& j) {
    j.set_state(kiln::v1::JOB_STATE_RUNNING);
    j.set_node_id("n1");
    return absl::OkStatus();
  });
  ASSERT_TRUE(updated.ok()) << updated.status();
  EXPECT_EQ(updated->node_id(), "n1");
  EXPECT_EQ(store_->Get("j2")->state(), kiln::v1::JOB_STATE_RUNNING);

  auto queued = store_->List(kiln::v1::JOB_STATE_QUEUED);
  ASSERT_TRUE(queued.ok()) << queued.status();
  ASSERT_EQ(queued->size(), 2u);
  EXPECT_EQ((*queued)[0].spec().job_id(), "j1");  // creation order
  EXPECT_EQ((*queued)[1].spec().job_id(), "j3");
  auto running = store_->List(kiln::v1::JOB_STATE_RUNNING);
  ASSERT_EQ(running->size(), 1u);
  EXPECT_EQ((*running)[0].spec().job_id(), "j2");

  EXPECT_EQ(store_->Get("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Update("nope", [](JobInfo&) { return absl::OkStatus(); }).status().code(),
            absl::StatusCode::kNotFound);
  auto refused = store_->Update("j1", [](JobInfo&) { return absl::CancelledError("no"); });
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(store_->Create(MakeJob("")).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(RedisJobStoreTest, CreateIsIdempotentAcrossStoreInstances) {
  ASSERT_TRUE(store_->Create(MakeJob("j1")).ok());
  prometheus::Registry other_registry;
  auto restarted = NewStore(other_registry);
  restarted->SetFencingToken(lease_->token());
  auto again = restarted->Create(MakeJob("j1"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->created);
}

TEST_F(RedisJobStoreTest, PngsAreStoredAndFinishedJobsExpire) {
  prometheus::Registry registry;
  auto short_lived = NewStore(registry, /*retention_ms=*/1000);
  short_lived->SetFencingToken(lease_->token());
  ASSERT_TRUE(short_lived->Create(MakeJob("done")).ok());
  const std::string png("\x89PNG\r\n\x1a\n\0data", 13);
  auto finished = short_lived->Update("done", [&](JobInfo& j) {
    j.set_state(kiln::v1::JOB_STATE_SUCCEEDED);
    j.set_png(png);
    return absl::OkStatus();
  });
  ASSERT_TRUE(finished.ok()) << finished.status();
  EXPECT_EQ(short_lived->Get("done")->png(), png);
  auto listed = short_lived->List(kiln::v1::JOB_STATE_SUCCEEDED);
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_TRUE((*listed)[0].png().empty());  // List leaves PNGs in Redis
  auto ttl = Raw({"PTTL", short_lived->JobKey("done")});
  ASSERT_TRUE(ttl.ok());
  EXPECT_GT(ttl->integer, 0);
  EXPECT_LE(ttl->integer, 1000);
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  EXPECT_EQ(short_lived->Get("done").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(short_lived->List(kiln::v1::JOB_STATE_SUCCEEDED)->empty());
  // The next write prunes the index entry of the expired job.
  ASSERT_TRUE(short_lived->Create(MakeJob("next")).ok());
  auto members = Raw({"ZCARD", absl::StrCat("test:state:", kiln::v1::JOB_STATE_SUCCEEDED)});
  EXPECT_EQ(members->integer, 0);
  // An expired id can be used again.
  auto reused = short_lived->Create(MakeJob("done"));
  ASSERT_TRUE(reused.ok());
  EXPECT_TRUE(reused->created);
}

TEST_F(RedisJobStoreTest, WritesWithAStaleFencingTokenAreRefused) {
  ASSERT_TRUE(store_->Create(MakeJob("j1")).ok());
  // Coordinator A's lease lapses (it was paused) and B takes over with a newer token.
  prometheus::Registry b_registry;
  auto b_lease = NewLease("coordinator-b", b_registry);
  auto b_store = NewStore(b_registry);
  EXPECT_FALSE(*b_lease->TryAcquire());
  EXPECT_EQ(b_lease->holder(), "coordinator-a");
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  ASSERT_TRUE(*b_lease->TryAcquire());
  EXPECT_GT(b_lease->token(), lease_->token());
  b_store->SetFencingToken(b_lease->token());

  // A wakes up: every write it tries is refused, nothing changes.
  auto create = store_->Create(MakeJob("j2"));
  EXPECT_EQ(create.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(create.status().message()), HasSubstr("fenced"));
  auto update = store_->Update("j1", [](JobInfo& j) {
    j.set_state(kiln::v1::JOB_STATE_FAILED);
    return absl::OkStatus();
  });
  EXPECT_EQ(update.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_->Put(MakeJob("j1", kiln::v1::JOB_STATE_CANCELLED)).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Errors("fenced"), 3);
  EXPECT_EQ(store_->Get("j1")->state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(store_->Get("j2").status().code(), absl::StatusCode::kNotFound);
  // Its renewal finds the lease lost; B's writes go through.
  EXPECT_EQ(lease_->Renew().code(), absl::StatusCode::kAborted);
  EXPECT_FALSE(lease_->is_leader());
  EXPECT_TRUE(b_lease->Renew().ok());
  EXPECT_TRUE(b_store->Create(MakeJob("j2")).ok());
  // A store without a token writes nothing.
  prometheus::Registry c_registry;
  auto tokenless = NewStore(c_registry);
  EXPECT_EQ(tokenless->Create(MakeJob("j3")).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(RedisJobStoreTest, CreateManyIsOneWriteWithPerJobOutcomes) {
  ASSERT_TRUE(store_->Create(MakeJob("old")).ok());
  ASSERT_TRUE(Raw({"SET", store_->JobKey("garbage"), "x"}).ok());
  JobInfo old_again = MakeJob("old");
  old_again.mutable_spec()->set_prompt("other");
  auto results = store_->CreateMany(
      {MakeJob("a"), old_again, MakeJob("garbage"), MakeJob(""), MakeJob("b"), MakeJob("a")});
  ASSERT_EQ(results.size(), 6u);
  ASSERT_TRUE(results[0].ok()) << results[0].status();
  EXPECT_TRUE(results[0]->created);
  ASSERT_TRUE(results[1].ok()) << results[1].status();
  EXPECT_FALSE(results[1]->created);
  EXPECT_EQ(results[1]->job.spec().prompt(), "a lighthouse");  // the stored one
  EXPECT_EQ(results[2].status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(results[3].status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(results[4].ok());
  EXPECT_TRUE(results[4]->created);
  ASSERT_TRUE(results[5].ok());  // the same id twice in one batch: the second finds the first
  EXPECT_FALSE(results[5]->created);
  auto queued = store_->List(kiln::v1::JOB_STATE_QUEUED);
  ASSERT_TRUE(queued.ok());
  ASSERT_EQ(queued->size(), 3u);
  EXPECT_EQ((*queued)[1].spec().job_id(), "a");  // creation order, as Create
  EXPECT_EQ((*queued)[2].spec().job_id(), "b");

  auto got = store_->GetMany({"a", "nope", "garbage", "old"});
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(got[0]->spec().job_id(), "a");
  EXPECT_EQ(got[1].status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(got[2].status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(got[3]->state(), kiln::v1::JOB_STATE_QUEUED);

  // Fenced or unreachable: every job of the batch gets the error, nothing is written.
  store_->SetFencingToken(lease_->token() + 1);
  for (const auto& r : store_->CreateMany({MakeJob("c"), MakeJob("d")})) {
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  }
  EXPECT_EQ(store_->Get("c").status().code(), absl::StatusCode::kNotFound);
  store_->SetFencingToken(lease_->token());
  server_.Kill();
  for (const auto& r : store_->CreateMany({MakeJob("e"), MakeJob("f")})) {
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  }
  for (const auto& r : store_->GetMany({"a", "b"})) {
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  }
}

TEST_F(RedisJobStoreTest, LeaseRenewalAndRelease) {
  prometheus::Registry b_registry;
  auto b_lease = NewLease("coordinator-b", b_registry);
  for (int i = 0; i < 6; ++i) {  // renewed past several ttls: nobody else gets it
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    ASSERT_TRUE(lease_->Renew().ok());
    ASSERT_FALSE(*b_lease->TryAcquire());
  }
  const int64_t old_token = lease_->token();
  ASSERT_TRUE(lease_->Release().ok());
  EXPECT_FALSE(lease_->is_leader());
  ASSERT_TRUE(*b_lease->TryAcquire());
  EXPECT_EQ(b_lease->token(), old_token + 1);
  EXPECT_EQ(Metric(b_registry, "kiln_coordinator_leadership_total", "event", "acquired"), 1);
}

TEST_F(RedisJobStoreTest, GarbageUnderKilnKeysIsDataLossNotACrash) {
  ASSERT_TRUE(store_->Create(MakeJob("good")).ok());
  ASSERT_TRUE(Raw({"SET", store_->JobKey("string"), "garbage"}).ok());
  ASSERT_TRUE(Raw({"HSET", store_->JobKey("badproto"), "info", "\xff\xfe not a proto"}).ok());
  ASSERT_TRUE(Raw({"HSET", store_->JobKey("noinfo"), "png", "x"}).ok());
  const std::string queued = absl::StrCat("test:state:", kiln::v1::JOB_STATE_QUEUED);
  for (const char* id : {"string", "badproto", "noinfo"}) {
    ASSERT_TRUE(Raw({"ZADD", queued, "0", id}).ok());
  }
  EXPECT_EQ(store_->Get("string").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(store_->Get("badproto").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(store_->Get("noinfo").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(store_->Create(MakeJob("string")).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(store_->Update("badproto", [](JobInfo&) { return absl::OkStatus(); }).status().code(),
            absl::StatusCode::kDataLoss);
  // List skips the garbage (counted, logged) and returns the good job.
  auto listed = store_->List(kiln::v1::JOB_STATE_QUEUED);
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].spec().job_id(), "good");
  EXPECT_EQ(log_.size(), 3u);
  EXPECT_GE(Errors("corrupt"), 8);
  // A fence key that is not a number fences every write rather than crashing.
  ASSERT_TRUE(Raw({"SET", store_->FenceKey(), "garbage"}).ok());
  EXPECT_EQ(store_->Create(MakeJob("after")).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(RedisJobStoreTest, ARedisThatIsKilledAndRestarted) {
  ASSERT_TRUE(store_->Create(MakeJob("before")).ok());
  server_.Kill();
  auto down = store_->Create(MakeJob("during"));
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(down.status().message()), HasSubstr("job store"));
  EXPECT_EQ(store_->Get("before").status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(store_->List(kiln::v1::JOB_STATE_QUEUED).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_GE(Errors("unavailable"), 3);
  ASSERT_TRUE(server_.Start());
  absl::StatusOr<JobInfo> back = absl::UnavailableError("");
  for (int i = 0; i < 100 && !back.ok(); ++i) {
    back = store_->Get("before");
    if (!back.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(back.ok()) << back.status();  // the AOF kept it
  EXPECT_EQ(store_->Get("during").status().code(), absl::StatusCode::kNotFound);
  // Scripts are loaded again (NOSCRIPT → EVAL) and the fence survived.
  auto created = store_->Create(MakeJob("after"));
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_TRUE(created->created);
}

TEST_F(RedisJobStoreTest, ACoordinatorRecoversFromRedis) {
  CoordinatorMetrics metrics(registry_);
  FakeClock clock;
  auto first = Coordinator::Create(CoordinatorOptions{}, *store_, clock, metrics);
  ASSERT_TRUE(first.ok()) << first.status();
  kiln::v1::RegisterNode reg;
  reg.mutable_info()->set_node_id("n1");
  reg.mutable_info()->mutable_device()->set_kind("cpu");
  reg.mutable_info()->add_models("flux-tiny");
  reg.mutable_info()->set_can_compile(true);
  ASSERT_TRUE((*first)->RegisterNode("n1", reg).ok());
  for (const char* id : {"a", "b"}) {
    kiln::v1::SubmitRequest submit;
    *submit.mutable_spec() = MakeJob(id).spec();
    ASSERT_TRUE((*first)->Submit(submit).ok());
  }
  first->reset();  // the coordinator dies

  auto second = Coordinator::Create(CoordinatorOptions{}, *store_, clock, metrics);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*second)->queue_depth(), 1u);  // "b"; "a" stays on n1
  ASSERT_TRUE((*second)->RegisterNode("n1", reg).ok());
  kiln::v1::JobResult result;
  result.set_job_id("a");
  result.set_ok(true);
  result.set_png("png-a");
  ASSERT_TRUE((*second)->Result("n1", result).ok());
  EXPECT_EQ(store_->Get("a")->state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(store_->Get("a")->png(), "png-a");
  EXPECT_EQ(store_->Get("b")->state(), kiln::v1::JOB_STATE_RUNNING);
}

}  // namespace
}  // namespace kiln::coordinator
