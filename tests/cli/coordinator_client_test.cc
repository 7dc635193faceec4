// CoordinatorClient against a fake coordinator: replies, ErrorReply → Status with field,
// streamed progress, stale replies, a silent coordinator (a bounded wait, never a hang), and
// retries across several endpoints (nobody listening, UNAVAILABLE, a coordinator dying mid-wait).
#include "cli/coordinator_client.h"

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/cli/fake_coordinator.h"

namespace kiln::cli {
namespace {

using testing::ErrorEnvelope;
using testing::FakeCoordinator;
using ::testing::HasSubstr;
using testing::JobEnvelope;

// A client that tries once (retry_for_ms 0) unless `retry_for_ms` says otherwise.
std::unique_ptr<CoordinatorClient> ConnectTo(const std::string& endpoint, int timeout_ms = 3000,
                                             int64_t retry_for_ms = 0,
                                             std::vector<std::string>* retries = nullptr) {
  ClientOptions options;
  options.endpoint = endpoint;
  options.request_timeout_ms = timeout_ms;
  options.connect_timeout_ms = 300;
  options.failover.retry_for_ms = retry_for_ms;
  options.failover.backoff_initial_ms = 20;
  if (retries != nullptr) {
    options.on_retry = [retries](const absl::Status& error, const std::string& next, int64_t) {
      retries->push_back(absl::StrCat(absl::StatusCodeToString(error.code()), " -> ", next));
    };
  }
  auto client = CoordinatorClient::Connect(options);
  EXPECT_TRUE(client.ok()) << client.status();
  return std::move(client).value();
}

kiln::v1::JobInfo Job(const std::string& id, kiln::v1::JobState state, uint32_t step = 0) {
  kiln::v1::JobInfo job;
  job.mutable_spec()->set_job_id(id);
  job.set_state(state);
  job.set_step(step);
  job.set_total_steps(4);
  return job;
}

TEST(ClientOptions, Validate) {
  ClientOptions o;
  EXPECT_THAT(o.Validate().message(), HasSubstr("endpoint"));
  o.endpoint = "127.0.0.1:5555";
  EXPECT_THAT(o.Validate().message(), HasSubstr("not a ZeroMQ endpoint"));
  o.endpoint = "tcp://127.0.0.1:5555";
  EXPECT_TRUE(o.Validate().ok());
  o.request_timeout_ms = 0;
  EXPECT_THAT(o.Validate().message(), HasSubstr("request_timeout_ms"));
  o = ClientOptions{};
  o.endpoint = "tcp://127.0.0.1:5555, tcp://127.0.0.2:5555";
  EXPECT_TRUE(o.Validate().ok());
  o.endpoint = "tcp://127.0.0.1:5555,127.0.0.2:5555";
  EXPECT_THAT(o.Validate().message(), HasSubstr("'127.0.0.2:5555' is not a ZeroMQ endpoint"));
  o.endpoint = " , ";
  EXPECT_EQ(o.Validate().message(), "endpoint: empty");
  o = ClientOptions{};
  o.endpoint = "tcp://127.0.0.1:5555";
  o.failover.retry_for_ms = -1;
  EXPECT_THAT(o.Validate().message(), HasSubstr("retry_for_ms"));
}

TEST(CoordinatorClient, SubmitSendsTheSpecAndReturnsTheReply) {
  FakeCoordinator fake([](const kiln::v1::Envelope& req) {
    EXPECT_TRUE(req.has_submit());
    EXPECT_EQ(req.protocol_version(), 1u);
    auto job = Job(req.submit().spec().job_id(), kiln::v1::JOB_STATE_QUEUED);
    return std::vector<kiln::v1::Envelope>{JobEnvelope(job, true, /*created=*/false)};
  });
  auto client = ConnectTo(fake.endpoint());
  kiln::v1::JobSpec spec;
  spec.set_job_id("j1");
  spec.set_prompt("a fox");
  auto reply = client->Submit(spec);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->job().spec().job_id(), "j1");
  EXPECT_FALSE(reply->created());
  ASSERT_EQ(fake.requests().size(), 1u);
  EXPECT_EQ(fake.requests()[0].submit().spec().prompt(), "a fox");
}

TEST(CoordinatorClient, ErrorReplyKeepsCodeFieldAndMessage) {
  FakeCoordinator fake([](const kiln::v1::Envelope&) {
    return std::vector<kiln::v1::Envelope>{
        ErrorEnvelope("INVALID_ARGUMENT", "spec.width", "width 250 is not a multiple of 16")};
  });
  auto client = ConnectTo(fake.endpoint());
  auto reply = client->Submit(kiln::v1::JobSpec());
  EXPECT_TRUE(absl::IsInvalidArgument(reply.status()));
  EXPECT_EQ(ErrorField(reply.status()), "spec.width");
  EXPECT_TRUE(FromCoordinator(reply.status()));
  EXPECT_EQ(reply.status().message(), "width 250 is not a multiple of 16");
}

TEST(CoordinatorClient, WaitStreamsProgressUntilTheFinalReply) {
  FakeCoordinator fake([](const kiln::v1::Envelope& req) {
    EXPECT_TRUE(req.wait().stream_progress());
    EXPECT_TRUE(req.wait().include_png());
    EXPECT_EQ(req.wait().timeout_ms(), 5000u);
    const std::string id = req.wait().job_id();
    auto done = Job(id, kiln::v1::JOB_STATE_SUCCEEDED, 4);
    done.set_png("PNG");
    return std::vector<kiln::v1::Envelope>{
        JobEnvelope(Job(id, kiln::v1::JOB_STATE_RUNNING, 1), false),
        JobEnvelope(Job(id, kiln::v1::JOB_STATE_RUNNING, 2), false),
        JobEnvelope(Job(id, kiln::v1::JOB_STATE_RUNNING, 3), false), JobEnvelope(done, true)};
  });
  auto client = ConnectTo(fake.endpoint());
  std::vector<uint32_t> steps;
  auto job = client->Wait("j1", 5000, true,
                          [&](const kiln::v1::JobInfo& j) { steps.push_back(j.step()); });
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(job->png(), "PNG");
  EXPECT_EQ(steps, (std::vector<uint32_t>{1, 2, 3}));
}

TEST(CoordinatorClient, LateRepliesToEarlierRequestsAreIgnored) {
  int calls = 0;
  FakeCoordinator fake([&](const kiln::v1::Envelope& req) {
    ++calls;
    if (calls == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(700));  // past the client's timeout
    }
    return std::vector<kiln::v1::Envelope>{
        JobEnvelope(Job(req.status().job_id(), kiln::v1::JOB_STATE_QUEUED))};
  });
  auto client = ConnectTo(fake.endpoint(), 300);
  auto first = client->Status("first", false);
  EXPECT_TRUE(absl::IsDeadlineExceeded(first.status())) << first.status();
  // Let the late reply to "first" arrive before "second" is asked.
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  auto second = client->Status("second", false);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->spec().job_id(), "second");
}

TEST(CoordinatorClient, SilentOrAbsentCoordinatorTimesOutWithAClearError) {
  FakeCoordinator fake([](const kiln::v1::Envelope&) { return std::vector<kiln::v1::Envelope>{}; });
  auto client = ConnectTo(fake.endpoint(), 300);
  const auto start = std::chrono::steady_clock::now();
  auto nodes = client->ListNodes();
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_TRUE(absl::IsDeadlineExceeded(nodes.status()));
  EXPECT_THAT(nodes.status().message(),
              HasSubstr("coordinator at " + fake.endpoint() + " did not answer within"));
  EXPECT_LT(took, std::chrono::seconds(2));

  // Nobody listening at all: said as such, after the connect timeout.
  auto nobody = ConnectTo("tcp://127.0.0.1:1", 3000);
  auto drained = nobody->Drain("node-1");
  EXPECT_TRUE(absl::IsUnavailable(drained.status())) << drained.status();
  EXPECT_THAT(drained.status().message(),
              HasSubstr("no coordinator is listening at tcp://127.0.0.1:1"));
}

TEST(CoordinatorClient, NobodyListeningMovesOnToTheNextEndpoint) {
  FakeCoordinator fake([](const kiln::v1::Envelope& req) {
    return std::vector<kiln::v1::Envelope>{
        JobEnvelope(Job(req.submit().spec().job_id(), kiln::v1::JOB_STATE_QUEUED))};
  });
  std::vector<std::string> retries;
  // The first endpoint is a standby that binds nothing yet.
  auto client = ConnectTo("tcp://127.0.0.1:1," + fake.endpoint(), 3000, 10000, &retries);
  kiln::v1::JobSpec spec;
  spec.set_job_id("j1");
  auto reply = client->Submit(spec);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->job().spec().job_id(), "j1");
  EXPECT_EQ(retries, (std::vector<std::string>{"UNAVAILABLE -> " + fake.endpoint()}));
  EXPECT_EQ(client->endpoint(), fake.endpoint());
  // The next request goes straight to the one that answered.
  ASSERT_TRUE(client->Status("j1", false).ok());
  EXPECT_EQ(retries.size(), 1u);
}

TEST(CoordinatorClient, UnavailableIsRetriedOtherErrorsAreNot) {
  FakeCoordinator busy([](const kiln::v1::Envelope&) {
    return std::vector<kiln::v1::Envelope>{
        ErrorEnvelope("UNAVAILABLE", "", "the job store is unreachable")};
  });
  FakeCoordinator serving([](const kiln::v1::Envelope& req) {
    if (req.status().job_id() == "gone") {
      return std::vector<kiln::v1::Envelope>{ErrorEnvelope("NOT_FOUND", "job_id", "no job")};
    }
    return std::vector<kiln::v1::Envelope>{
        JobEnvelope(Job(req.status().job_id(), kiln::v1::JOB_STATE_RUNNING))};
  });
  std::vector<std::string> retries;
  auto client = ConnectTo(busy.endpoint() + "," + serving.endpoint(), 3000, 10000, &retries);
  auto job = client->Status("j", false);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(retries.size(), 1u);
  auto gone = client->Status("gone", false);
  EXPECT_TRUE(absl::IsNotFound(gone.status()));
  EXPECT_EQ(retries.size(), 1u);
  EXPECT_EQ(serving.requests().size(), 2u);
}

TEST(CoordinatorClient, RetriesStopWhenTheBudgetIsSpent) {
  FakeCoordinator busy([](const kiln::v1::Envelope&) {
    return std::vector<kiln::v1::Envelope>{ErrorEnvelope("UNAVAILABLE", "", "redis is down")};
  });
  std::vector<std::string> retries;
  auto client = ConnectTo(busy.endpoint(), 3000, 500, &retries);
  const auto start = std::chrono::steady_clock::now();
  auto nodes = client->ListNodes();
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_TRUE(absl::IsUnavailable(nodes.status()));
  EXPECT_THAT(nodes.status().message(), HasSubstr("redis is down (gave up after"));
  EXPECT_GE(retries.size(), 2u);
  EXPECT_GE(took, std::chrono::milliseconds(300));
  EXPECT_LT(took, std::chrono::seconds(3));
}

TEST(CoordinatorClient, AWaitOutlivesTheCoordinatorThatDiesUnderIt) {
  auto dying = std::make_unique<FakeCoordinator>(
      [](const kiln::v1::Envelope&) { return std::vector<kiln::v1::Envelope>{}; });
  FakeCoordinator standby([](const kiln::v1::Envelope& req) {
    return std::vector<kiln::v1::Envelope>{
        JobEnvelope(Job(req.wait().job_id(), kiln::v1::JOB_STATE_SUCCEEDED))};
  });
  std::vector<std::string> retries;
  auto client = ConnectTo(dying->endpoint() + "," + standby.endpoint(), 3000, 10000, &retries);
  std::thread killer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    dying.reset();  // its socket closes: the client hears the connection go
  });
  const auto start = std::chrono::steady_clock::now();
  auto job = client->Wait("j", 20000, false);  // would take 23 s to time out
  const auto took = std::chrono::steady_clock::now() - start;
  killer.join();
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), kiln::v1::JOB_STATE_SUCCEEDED);
  ASSERT_EQ(retries.size(), 1u);
  EXPECT_EQ(retries[0], "UNAVAILABLE -> " + standby.endpoint());
  EXPECT_LT(took, std::chrono::seconds(5));
}

TEST(CoordinatorClient, AWaitMayTakeAsLongAsItAsks) {
  FakeCoordinator fake([](const kiln::v1::Envelope& req) {
    std::this_thread::sleep_for(std::chrono::milliseconds(req.wait().timeout_ms()));
    return std::vector<kiln::v1::Envelope>{
        JobEnvelope(Job(req.wait().job_id(), kiln::v1::JOB_STATE_RUNNING))};
  });
  auto client = ConnectTo(fake.endpoint(), 300);
  auto job = client->Wait("j", 600, false);  // 600 ms wait > 300 ms request timeout
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), kiln::v1::JOB_STATE_RUNNING);
}

TEST(CoordinatorClient, UnexpectedReplyTypeIsAnError) {
  FakeCoordinator fake([](const kiln::v1::Envelope&) {
    kiln::v1::Envelope env;
    env.mutable_nodes();
    return std::vector<kiln::v1::Envelope>{env};
  });
  auto client = ConnectTo(fake.endpoint());
  auto job = client->Cancel("j");
  EXPECT_TRUE(absl::IsInternal(job.status()));
  EXPECT_THAT(job.status().message(), HasSubstr("unexpected reply"));
}

}  // namespace
}  // namespace kiln::cli
