// The Coordinator's bounds and roles (issue 12), without sockets: who may read and cancel a job
// (Caller), per-client caps on waits and queued jobs, the server-side cap on Wait timeouts, the
// waits of a connection that went away (DropWaitsOf), bounded package_sets (cleared when a node
// leaves), and the run timeout that requeues a job a node holds without a result and marks the
// node suspect.
#include <memory>
#include <string>
#include <vector>

#include "common/clock.h"
#include "coordinator/coordinator.h"
#include "coordinator/job_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"

namespace kiln::coordinator {
namespace {

using ::testing::HasSubstr;

kiln::v1::JobSpec Spec(const std::string& id) {
  kiln::v1::JobSpec spec;
  spec.set_job_id(id);
  spec.set_model("flux-tiny");
  spec.set_prompt("a lighthouse");
  spec.set_width(256);
  spec.set_height(256);
  spec.set_steps(4);
  return spec;
}

class BoundsTest : public ::testing::Test {
 protected:
  BoundsTest() : metrics_(registry_) {}

  void Make(CoordinatorOptions options = {}) {
    auto c = Coordinator::Create(options, store_, clock_, metrics_,
                                 [this](const std::string& line) { log_.push_back(line); });
    ASSERT_TRUE(c.ok()) << c.status();
    c_ = std::move(*c);
  }
  absl::Status Register(const std::string& id, int package_sets = 0) {
    kiln::v1::RegisterNode m;
    m.mutable_info()->set_node_id(id);
    m.mutable_info()->mutable_device()->set_kind("cpu");
    m.mutable_info()->add_models("flux-tiny");
    m.mutable_info()->set_can_compile(true);
    for (int i = 0; i < package_sets; ++i) {
      (*m.mutable_info()->mutable_package_sets())["k" + std::to_string(i)].add_digests("d");
    }
    return c_->RegisterNode(id, m).status();
  }
  absl::StatusOr<kiln::v1::JobReply> Submit(const std::string& id, const Caller& caller) {
    kiln::v1::SubmitRequest r;
    *r.mutable_spec() = Spec(id);
    return c_->Submit(r, caller);
  }
  absl::StatusOr<std::optional<kiln::v1::JobReply>> Wait(const std::string& id, uint32_t timeout,
                                                         const std::string& peer,
                                                         const Caller& caller) {
    kiln::v1::WaitRequest w;
    w.set_job_id(id);
    w.set_timeout_ms(timeout);
    return c_->Wait(w, ReplyTo{peer, "r"}, caller);
  }
  std::vector<Outgoing> ClientReplies() {
    std::vector<Outgoing> out;
    for (auto& o : c_->TakeOutgoing()) {
      if (o.socket == Outgoing::Socket::kClient) out.push_back(std::move(o));
    }
    return out;
  }

  FakeClock clock_;
  InMemoryJobStore store_;
  prometheus::Registry registry_;
  CoordinatorMetrics metrics_;
  std::unique_ptr<Coordinator> c_;
  std::vector<std::string> log_;
};

const Caller kAlice{"alice-key", false};
const Caller kBob{"bob-key", false};
const Caller kAdmin{"admin-key", true};

TEST_F(BoundsTest, AClientSeesAndCancelsOnlyItsOwnJobsAndAdminAnyJob) {
  Make();
  ASSERT_TRUE(Register("n1").ok());
  ASSERT_TRUE(Submit("j1", kAlice).ok());
  EXPECT_EQ(store_.Get("j1")->owner(), "alice-key");

  kiln::v1::StatusRequest status;
  status.set_job_id("j1");
  EXPECT_TRUE(c_->Status(status, kAlice).ok());
  EXPECT_EQ(c_->Status(status, kBob).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Wait("j1", 1000, "bob", kBob).status().code(), absl::StatusCode::kPermissionDenied);
  kiln::v1::CancelRequest cancel;
  cancel.set_job_id("j1");
  EXPECT_EQ(c_->Cancel(cancel, kBob).status().code(), absl::StatusCode::kPermissionDenied);
  // Resubmitting another client's job id neither reveals nor adopts it.
  EXPECT_EQ(Submit("j1", kBob).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(store_.Get("j1")->state(), kiln::v1::JOB_STATE_RUNNING);

  EXPECT_TRUE(c_->Status(status, kAdmin).ok());
  auto cancelled = c_->Cancel(cancel, kAdmin);
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  EXPECT_EQ(cancelled->job().state(), kiln::v1::JOB_STATE_CANCELLED);
}

TEST_F(BoundsTest, QueuedJobsAreCappedPerClient) {
  CoordinatorOptions o;
  o.max_queued_jobs_per_client = 3;
  Make(o);
  ASSERT_TRUE(Register("n1").ok());  // takes the first job; the rest queue
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(Submit("a" + std::to_string(i), kAlice).ok()) << i;
  auto over = Submit("a4", kAlice);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(over.status().message(), HasSubstr("per client"));
  EXPECT_TRUE(Submit("b0", kBob).ok());  // another client is not held back
}

TEST_F(BoundsTest, TenThousandWaitsOfOneClientDoNotLockOutAnother) {
  CoordinatorOptions o;
  o.max_waits_per_client = 100;
  o.max_pending_waits = 1000;
  Make(o);
  ASSERT_TRUE(Register("n1").ok());
  ASSERT_TRUE(Submit("j", kAlice).ok());
  for (int i = 0; i < 10000; ++i) {
    auto w = Wait("j", 0xFFFFFFFFu, "alice-route", kAlice);
    ASSERT_TRUE(w.ok()) << i << ": " << w.status();
  }
  EXPECT_EQ(c_->pending_waits(), 100u);  // the oldest were answered and dropped
  EXPECT_EQ(ClientReplies().size(), 9900u);
  auto bob = Wait("j", 1000, "bob-route", kAdmin);
  EXPECT_TRUE(bob.ok()) << bob.status();
  EXPECT_EQ(c_->pending_waits(), 101u);
}

TEST_F(BoundsTest, AClientCappedAtOneWaitHasItsOldWaitAnsweredByItsNewOne) {
  // At the cap of one, answering the old wait empties (and erases) the client's wait set before
  // the new wait goes in: a reference to that set held across it dangled (ASan in the sanitizer
  // build sees it).
  CoordinatorOptions o;
  o.max_waits_per_client = 1;
  Make(o);
  ASSERT_TRUE(Register("n1").ok());
  ASSERT_TRUE(Submit("j", kAlice).ok());
  for (int i = 0; i < 3; ++i) {
    auto w = Wait("j", 60000, "alice-route", kAlice);
    ASSERT_TRUE(w.ok()) << i << ": " << w.status();
    EXPECT_EQ(c_->pending_waits(), 1u);
  }
  EXPECT_EQ(ClientReplies().size(), 2u);
  EXPECT_EQ(metrics_.waits_dropped_client_cap.Value(), 2);
}

TEST_F(BoundsTest, AGoneConnectionsWaitsAreDroppedAndOnlyItsOwn) {
  CoordinatorOptions o;
  o.max_waits_per_client = 3;
  o.max_pending_waits = 4;
  Make(o);
  ASSERT_TRUE(Register("n1").ok());
  ASSERT_TRUE(Submit("j", kAlice).ok());
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(Wait("j", 60000, "alice-conn-1", kAlice).ok());
  ASSERT_TRUE(Wait("j", 60000, "alice-conn-2", kAlice).ok());
  ASSERT_TRUE(Wait("j", 60000, "bob-conn", kAdmin).ok());
  EXPECT_EQ(metrics_.waits_pending.Value(), 4);
  EXPECT_EQ(Wait("j", 60000, "bob-conn", kAdmin).status().code(),
            absl::StatusCode::kResourceExhausted);

  EXPECT_EQ(c_->DropWaitsOf("alice-conn-1"), 2u);
  EXPECT_TRUE(ClientReplies().empty());  // nobody to answer
  EXPECT_EQ(c_->pending_waits(), 2u);
  EXPECT_EQ(metrics_.waits_pending.Value(), 2);
  EXPECT_EQ(metrics_.waits_dropped_client_gone.Value(), 2);
  EXPECT_EQ(c_->DropWaitsOf("alice-conn-1"), 0u);
  EXPECT_EQ(c_->DropWaitsOf("never-seen"), 0u);

  // The caps are free again: alice's key holds one wait, and the total has room.
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(Wait("j", 60000, "alice-conn-3", kAlice).ok());
  EXPECT_TRUE(ClientReplies().empty());  // none of alice's was evicted: under her cap of 3
  EXPECT_EQ(metrics_.waits_dropped_client_cap.Value(), 0);

  // The job's end answers every remaining wait, on its own connection, and none dropped.
  kiln::v1::CancelRequest cancel;
  cancel.set_job_id("j");
  ASSERT_TRUE(c_->Cancel(cancel, kAlice).ok());
  std::vector<std::string> peers;
  for (const auto& o : ClientReplies()) peers.push_back(o.peer);
  EXPECT_THAT(peers, ::testing::UnorderedElementsAre("alice-conn-2", "bob-conn", "alice-conn-3",
                                                     "alice-conn-3"));
  EXPECT_EQ(metrics_.waits_pending.Value(), 0);
  EXPECT_EQ(c_->DropWaitsOf("alice-conn-3"), 0u);
}

TEST_F(BoundsTest, WaitTimeoutIsCappedServerSide) {
  CoordinatorOptions o;
  o.max_wait_timeout_ms = 5000;
  Make(o);
  ASSERT_TRUE(Register("n1").ok());
  ASSERT_TRUE(Submit("j", kAlice).ok());
  ASSERT_TRUE(Wait("j", 0xFFFFFFFFu, "alice-route", kAlice).ok());
  clock_.AdvanceMs(4999);
  c_->Tick();
  EXPECT_TRUE(ClientReplies().empty());
  clock_.AdvanceMs(2);
  c_->Tick();
  EXPECT_EQ(ClientReplies().size(), 1u);  // answered at the cap, not in 49 days
  EXPECT_EQ(c_->pending_waits(), 0u);
}

TEST_F(BoundsTest, PackageSetsAreBoundedAndClearedWhenTheNodeLeaves) {
  CoordinatorOptions o;
  o.max_package_sets_per_node = 8;
  Make(o);
  EXPECT_EQ(Register("big", 9).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(Register("n1", 2).ok());
  for (int i = 0; i < 100; ++i) {
    kiln::v1::Heartbeat hb;
    (*hb.mutable_package_sets())["flood" + std::to_string(i)].add_digests(std::string(1000, 'x'));
    (void)c_->Heartbeat("n1", hb);
  }
  auto nodes = c_->ListNodes();
  ASSERT_EQ(nodes.nodes_size(), 1);
  EXPECT_EQ(nodes.nodes(0).info().package_sets_size(), 8);
  kiln::v1::Heartbeat many;
  for (int i = 0; i < 65; ++i) (*many.mutable_package_sets())["k0"].add_digests("d");
  EXPECT_EQ(c_->Heartbeat("n1", many).code(), absl::StatusCode::kResourceExhausted);

  ASSERT_TRUE(c_->Deregister("n1", {}).ok());
  EXPECT_EQ(c_->ListNodes().nodes(0).info().package_sets_size(), 0);
}

TEST_F(BoundsTest, ASilentNodesJobIsRequeuedAfterItsRunTimeoutAndTheNodeIsSuspect) {
  CoordinatorOptions o;
  o.run_timeout_min_ms = 30000;
  o.run_timeout_factor = 1e-6;  // the minimum decides (the priors expect a compile)
  o.heartbeat_interval_ms = 1000;
  Make(o);
  ASSERT_TRUE(Register("n1").ok());
  ASSERT_TRUE(Submit("j", kAlice).ok());
  ASSERT_EQ(store_.Get("j")->node_id(), "n1");
  // The node heartbeats and lists the job, but never reports progress or a result.
  for (int t = 0; t < 29; ++t) {
    clock_.AdvanceMs(1000);
    kiln::v1::Heartbeat hb;
    hb.add_running_jobs("j");
    ASSERT_TRUE(c_->Heartbeat("n1", hb).ok());
    c_->Tick();
  }
  EXPECT_EQ(store_.Get("j")->state(), kiln::v1::JOB_STATE_RUNNING);
  for (int t = 0; t < 5; ++t) {
    clock_.AdvanceMs(1000);
    kiln::v1::Heartbeat hb;
    hb.add_running_jobs("j");
    (void)c_->Heartbeat("n1", hb);
    c_->Tick();
  }
  auto job = store_.Get("j");
  EXPECT_EQ(job->state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_THAT(job->error(), HasSubstr("run timeout"));
  EXPECT_EQ(metrics_.run_timeouts.Value(), 1);
  EXPECT_EQ(c_->ListNodes().nodes(0).state(), kiln::v1::NODE_STATE_DRAINING);
  // A healthy node picks it up.
  ASSERT_TRUE(Register("n2").ok());
  EXPECT_EQ(store_.Get("j")->node_id(), "n2");
}

}  // namespace
}  // namespace kiln::coordinator
