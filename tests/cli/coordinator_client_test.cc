// CoordinatorClient against a fake coordinator: replies, ErrorReply → Status with field,
// streamed progress, stale replies, and a silent coordinator (a bounded wait, never a hang).
#include "cli/coordinator_client.h"

#include <chrono>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/cli/fake_coordinator.h"

namespace kiln::cli {
namespace {

using testing::ErrorEnvelope;
using testing::FakeCoordinator;
using ::testing::HasSubstr;
using testing::JobEnvelope;

std::unique_ptr<CoordinatorClient> ConnectTo(const std::string& endpoint, int timeout_ms = 3000) {
  ClientOptions options;
  options.endpoint = endpoint;
  options.request_timeout_ms = timeout_ms;
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

  // Nobody listening at all.
  auto nobody = ConnectTo("tcp://127.0.0.1:1", 300);
  EXPECT_TRUE(absl::IsDeadlineExceeded(nobody->Drain("node-1").status()));
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
