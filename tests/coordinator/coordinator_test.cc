// Coordinator logic without sockets: a FakeClock, an InMemoryJobStore and a private Prometheus
// registry. Nodes and clients are played by calling the Coordinator's methods directly and by
// reading what it queues in TakeOutgoing().
#include "coordinator/coordinator.h"

#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/clock.h"
#include "coordinator/job_store.h"
#include "coordinator/validation.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"

namespace kiln::coordinator {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Pair;
using ::testing::StartsWith;
using kiln::v1::JobInfo;
using kiln::v1::JobSpec;
using kiln::v1::NodeInfo;

constexpr char kModel[] = "flux-tiny";
constexpr char kSetKey[] = "flux-tiny/fp32/256x256";

JobSpec Spec(const std::string& id, int32_t priority = 0) {
  JobSpec spec;
  spec.set_job_id(id);
  spec.set_model(kModel);
  spec.set_prompt("a lighthouse on a cliff at dusk");
  spec.set_width(256);
  spec.set_height(256);
  spec.set_steps(4);
  spec.set_seed(7);
  spec.set_priority(priority);
  return spec;
}

NodeInfo Node(const std::string& id, const std::string& kind = "cpu", bool can_compile = true) {
  NodeInfo info;
  info.set_node_id(id);
  info.mutable_device()->set_kind(kind);
  if (kind == "cuda") info.mutable_device()->set_compute_capability("9.0");
  info.add_models(kModel);
  info.set_can_compile(can_compile);
  return info;
}

// Declares that jobs of kSetKey need packages d1 and d2.
void DeclareSet(NodeInfo& info, const std::string& key = kSetKey) {
  auto& set = (*info.mutable_package_sets())[key];
  set.add_digests("d1");
  set.add_digests("d2");
}

class CoordinatorTest : public ::testing::Test {
 protected:
  CoordinatorTest() : metrics_(registry_) { Make(CoordinatorOptions{}); }

  void Make(CoordinatorOptions options) {
    coordinator_.reset();
    auto c = Coordinator::Create(options, store_, clock_, metrics_,
                                 [this](const std::string& line) { log_.push_back(line); });
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = std::move(*c);
  }

  Coordinator& c() { return *coordinator_; }

  void Register(const NodeInfo& info) {
    kiln::v1::RegisterNode m;
    *m.mutable_info() = info;
    auto ack = c().RegisterNode(info.node_id(), m);
    ASSERT_TRUE(ack.ok()) << ack.status();
    EXPECT_EQ(ack->heartbeat_interval_ms(), c().options().heartbeat_interval_ms);
  }

  absl::StatusOr<kiln::v1::JobReply> Submit(const JobSpec& spec) {
    kiln::v1::SubmitRequest r;
    *r.mutable_spec() = spec;
    return c().Submit(r);
  }
  void MustSubmit(const JobSpec& spec) {
    auto r = Submit(spec);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->created());
  }

  JobInfo Job(const std::string& id) {
    auto j = store_.Get(id);
    EXPECT_TRUE(j.ok()) << j.status();
    return j.ok() ? *j : JobInfo();
  }

  void Beat(const std::string& node_id, std::vector<std::string> running = {}) {
    kiln::v1::Heartbeat hb;
    for (auto& j : running) hb.add_running_jobs(j);
    ASSERT_TRUE(c().Heartbeat(node_id, hb).ok());
  }

  absl::Status Result(const std::string& node_id, const std::string& job_id, bool ok = true,
                      uint32_t attempt = 0, const std::string& code = "") {
    kiln::v1::JobResult r;
    r.set_job_id(job_id);
    r.set_ok(ok);
    r.set_attempt(attempt);
    if (ok) {
      r.set_png(std::string("\x89PNG fake", 9));
      r.set_run_seconds(0.5);
      (*r.mutable_packages())["transformer"] = "local";
    } else {
      r.set_error_code(code);
      r.set_error("it broke");
    }
    return c().Result(node_id, r);
  }

  // (node, job, attempt) of every AssignJob queued since the last call; other messages are kept
  // in `others_`.
  std::vector<std::tuple<std::string, std::string, uint32_t>> Assigned() {
    std::vector<std::tuple<std::string, std::string, uint32_t>> out;
    for (auto& o : c().TakeOutgoing()) {
      if (o.socket == Outgoing::Socket::kNode && o.envelope.has_assign()) {
        out.emplace_back(o.peer, o.envelope.assign().spec().job_id(),
                         o.envelope.assign().attempt());
      } else {
        others_.push_back(std::move(o));
      }
    }
    return out;
  }
  std::vector<Outgoing> Others() {
    Assigned();
    return std::exchange(others_, {});
  }
  // The replies to clients among Others().
  std::vector<Outgoing> ClientReplies() {
    std::vector<Outgoing> out;
    for (auto& o : Others()) {
      if (o.socket == Outgoing::Socket::kClient) out.push_back(std::move(o));
    }
    return out;
  }

  // Advances the clock in heartbeat-sized steps, keeping `alive` nodes alive (each reports
  // the jobs the coordinator assigned to it).
  void Advance(int64_t ms, const std::vector<std::string>& alive = {}) {
    const int64_t step = c().options().heartbeat_interval_ms;
    while (ms > 0) {
      const int64_t d = std::min(ms, step);
      clock_.AdvanceMs(d);
      ms -= d;
      for (const auto& n : alive) Beat(n, RunningOn(n));
      c().Tick();
    }
  }

  std::vector<std::string> RunningOn(const std::string& node_id) {
    const auto nodes = c().ListNodes();
    for (const auto& n : nodes.nodes()) {
      if (n.info().node_id() == node_id) {
        return {n.running_jobs().begin(), n.running_jobs().end()};
      }
    }
    return {};
  }
  kiln::v1::NodeState StateOf(const std::string& node_id) {
    const auto nodes = c().ListNodes();
    for (const auto& n : nodes.nodes()) {
      if (n.info().node_id() == node_id) return n.state();
    }
    return kiln::v1::NODE_STATE_UNSPECIFIED;
  }
  bool Logged(const std::string& needle) {
    for (const auto& l : log_) {
      if (absl::StrContains(l, needle)) return true;
    }
    return false;
  }

  FakeClock clock_;
  InMemoryJobStore store_;
  prometheus::Registry registry_;
  CoordinatorMetrics metrics_;
  std::vector<std::string> log_;
  std::unique_ptr<Coordinator> coordinator_;
  std::vector<Outgoing> others_;
};

// ---- Submit validation

struct BadField {
  std::string name;
  std::function<void(JobSpec&)> mutate;
  std::string field;
  std::string message;  // expected substring
};

TEST_F(CoordinatorTest, EveryBadFieldIsNamed) {
  Register(Node("n1"));
  const std::vector<BadField> cases = {
      {"empty id", [](JobSpec& s) { s.set_job_id(""); }, "spec.job_id", "must not be empty"},
      {"id charset", [](JobSpec& s) { s.set_job_id("a b"); }, "spec.job_id", "byte 0x20"},
      {"id length", [](JobSpec& s) { s.set_job_id(std::string(129, 'a')); }, "spec.job_id",
       "129 characters"},
      {"empty model", [](JobSpec& s) { s.set_model(""); }, "spec.model", "must not be empty"},
      {"model charset", [](JobSpec& s) { s.set_model("flux tiny"); }, "spec.model", "0x20"},
      {"empty prompt", [](JobSpec& s) { s.set_prompt(""); }, "spec.prompt", "must not be empty"},
      {"long prompt", [](JobSpec& s) { s.set_prompt(std::string(10001, 'x')); }, "spec.prompt",
       "10001 bytes"},
      {"bad utf8", [](JobSpec& s) { s.set_prompt("ok \xC3\x28"); }, "spec.prompt",
       "not valid UTF-8 at byte 3"},
      {"overlong utf8", [](JobSpec& s) { s.set_prompt("\xC0\xAF"); }, "spec.prompt", "UTF-8"},
      {"width 300", [](JobSpec& s) { s.set_width(300); }, "spec.width",
       "300 is not a multiple of 16"},
      {"width 0", [](JobSpec& s) { s.set_width(0); }, "spec.width", "must be set"},
      {"width huge", [](JobSpec& s) { s.set_width(8192); }, "spec.width", "more than 4096"},
      {"height", [](JobSpec& s) { s.set_height(100); }, "spec.height", "100 is not a multiple"},
      {"steps 0", [](JobSpec& s) { s.set_steps(0); }, "spec.steps", "0 is not in 1..1000"},
      {"steps 1001", [](JobSpec& s) { s.set_steps(1001); }, "spec.steps", "1001"},
      {"guidance <0", [](JobSpec& s) { s.set_guidance(-1); }, "spec.guidance", "not in 0..100"},
      {"guidance >100", [](JobSpec& s) { s.set_guidance(100.5f); }, "spec.guidance", "100.5"},
      {"guidance NaN",
       [](JobSpec& s) { s.set_guidance(std::numeric_limits<float>::quiet_NaN()); },
       "spec.guidance", "not in 0..100"},
      {"precision", [](JobSpec& s) { s.set_precision("fp16"); }, "spec.precision", "'fp16'"},
      {"deadline <0", [](JobSpec& s) { s.set_deadline_unix_ms(-5); }, "spec.deadline_unix_ms",
       "negative"},
      {"deadline past",
       [this](JobSpec& s) { s.set_deadline_unix_ms(clock_.UnixMs() - 1); },
       "spec.deadline_unix_ms", "in the past"},
  };
  for (const auto& tc : cases) {
    JobSpec spec = Spec("job-1");
    tc.mutate(spec);
    auto r = Submit(spec);
    ASSERT_FALSE(r.ok()) << tc.name;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << tc.name;
    EXPECT_EQ(ErrorField(r.status()), tc.field) << tc.name;
    EXPECT_THAT(std::string(r.status().message()), StartsWith(tc.field + ": ")) << tc.name;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(tc.message)) << tc.name;
  }
  EXPECT_EQ(metrics_.submissions_rejected.Value(), cases.size());
  EXPECT_EQ(metrics_.submissions_created.Value(), 0);

  // The exact wording promised in the issue.
  JobSpec spec = Spec("job-1");
  spec.set_width(300);
  EXPECT_EQ(Submit(spec).status().message(), "spec.width: 300 is not a multiple of 16");
  // Every field at its limit is fine.
  spec = Spec(std::string(128, 'z'));
  spec.set_job_id("A-z_0.9:" + std::string(120, 'q'));
  spec.set_prompt(std::string(10000, 'p'));
  spec.set_width(4096);
  spec.set_height(16);
  spec.set_steps(1000);
  spec.set_guidance(100);
  spec.set_precision("bf16");
  spec.set_seed(std::numeric_limits<uint64_t>::max());
  spec.set_priority(std::numeric_limits<int32_t>::min());
  spec.set_deadline_unix_ms(clock_.UnixMs() + 1);
  EXPECT_TRUE(Submit(spec).ok());
}

TEST_F(CoordinatorTest, WithNoRegisteredNodeAJobWaitsAndSaysWhy) {
  // A cluster starting (or scaled to zero): nothing to judge the job by, so it waits.
  auto r = Submit(Spec("j1"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->job().state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(r->job().phase(), "queued");
  EXPECT_THAT(r->job().error(), StartsWith("waiting: no node has registered yet"));
  Register(Node("n1"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u)));
  EXPECT_EQ(Job("j1").phase(), "assigned");
}

TEST_F(CoordinatorTest, ModelNoRegisteredNodeServesIsRejectedNamingWhatTheClusterServes) {
  Register(Node("n1"));
  JobSpec spec = Spec("j1");
  spec.set_model("flux-dev");
  auto r = Submit(spec);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ErrorField(r.status()), "spec.model");
  EXPECT_EQ(r.status().message(),
            "spec.model: no registered node serves model flux-dev; the cluster serves: flux-tiny "
            "at any precision and size");
  // Nothing was stored.
  EXPECT_EQ(store_.Get("j1").status().code(), absl::StatusCode::kNotFound);

  // A model that only a departed node served is refused too, once another node is registered.
  NodeInfo dev = Node("n2");
  dev.clear_models();
  dev.add_models("flux-dev");
  Register(dev);
  ASSERT_TRUE(c().Deregister("n2", {}).ok());
  EXPECT_EQ(Submit(spec).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(CoordinatorTest, PrecisionOrSizeNoRegisteredNodeServesFailsAtOnce) {
  NodeInfo n1 = Node("n1");
  DeclareSet(n1, "flux-tiny/fp32/256x256");
  DeclareSet(n1, "flux-tiny/fp32/512x512");
  Register(n1);
  NodeInfo n2 = Node("n2");
  DeclareSet(n2, "flux-tiny/fp32/512x512");
  Register(n2);
  JobSpec spec = Spec("j1");
  spec.set_precision("bf16");
  spec.set_width(320);
  spec.set_height(320);
  auto r = Submit(spec);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(r.status().message(),
            "no registered node serves precision bf16 at 320x320 for model flux-tiny; the "
            "cluster serves: flux-tiny fp32 at 256x256, 512x512");
  // fp32 at 320x320: the size is what is missing.
  spec.set_precision("fp32");
  r = Submit(spec);
  EXPECT_THAT(std::string(r.status().message()),
              StartsWith("no registered node serves precision fp32 at 320x320 for model "
                         "flux-tiny;"));
  // A served kind is accepted.
  spec.set_width(512);
  spec.set_height(512);
  EXPECT_TRUE(Submit(spec).ok());
  EXPECT_GE(metrics_.submissions_unservable.Value(), 2.0);
}

TEST_F(CoordinatorTest, Fp8WithoutAnSm89GpuFailsAtOnceWithTheDevicesReason) {
  Register(Node("cpu-1"));
  NodeInfo ampere = Node("a100", "cuda");
  ampere.mutable_device()->set_compute_capability("8.0");
  Register(ampere);
  JobSpec spec = Spec("j1");
  spec.set_precision("fp8");
  auto r = Submit(spec);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string message(r.status().message());
  EXPECT_THAT(message, StartsWith("no registered node can run precision fp8 at 256x256 for "
                                  "model flux-tiny ("));
  EXPECT_THAT(message, HasSubstr("a100 has compute capability 8.0"));
  EXPECT_THAT(message, HasSubstr("cpu-1 has a cpu device, which cannot run fp8"));
  // An H100 joins: fp8 is accepted and placed there.
  Register(Node("h100", "cuda"));
  EXPECT_TRUE(Submit(spec).ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("h100", "j1", 1u)));
}

TEST_F(CoordinatorTest, AJobForBusyOrDrainingNodesWaitsAndItsReasonIsStreamed) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  ASSERT_EQ(Assigned().size(), 1u);
  // j2 waits for the busy node: accepted, with the reason.
  auto r = Submit(Spec("j2"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->job().state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(r->job().error(), "waiting: the nodes that can run it are busy");

  kiln::v1::WaitRequest wait;
  wait.set_job_id("j2");
  wait.set_timeout_ms(60000);
  wait.set_stream_progress(true);
  ASSERT_TRUE(c().Wait(wait, ReplyTo{"client", "w"}).ok());
  kiln::v1::DrainRequest drain;
  drain.set_node_id("n1");
  ASSERT_TRUE(c().Drain(drain).ok());
  ASSERT_TRUE(Result("n1", "j1").ok());
  // The node is drained and free: the reason changes and the waiting client is told.
  bool streamed = false;
  for (const auto& o : ClientReplies()) {
    if (o.envelope.job().job().error() == "waiting: the nodes that can run it are draining (n1)") {
      EXPECT_FALSE(o.envelope.job().final());
      streamed = true;
    }
  }
  EXPECT_TRUE(streamed);
  EXPECT_EQ(Job("j2").state(), kiln::v1::JOB_STATE_QUEUED);
  // A job submitted now is accepted too: a draining node is registered.
  auto j3 = Submit(Spec("j3"));
  ASSERT_TRUE(j3.ok()) << j3.status();
  EXPECT_EQ(j3->job().error(), "waiting: the nodes that can run it are draining (n1)");
}

TEST_F(CoordinatorTest, QueuedJobsNobodyCanServeAfterANodeLeavesFail) {
  Register(Node("n1"));
  NodeInfo big = Node("big");
  DeclareSet(big, "flux-tiny/fp32/512x512");
  Register(big);
  // Keep both busy so the jobs stay queued.
  MustSubmit(Spec("busy-1"));
  JobSpec busy2 = Spec("busy-2");
  busy2.set_width(512);
  busy2.set_height(512);
  MustSubmit(busy2);
  ASSERT_EQ(Assigned().size(), 2u);
  JobSpec only_n1 = Spec("small");  // 256x256: n1 only (big declares 512x512 alone)
  MustSubmit(only_n1);
  JobSpec either = Spec("large");
  either.set_width(512);
  either.set_height(512);
  MustSubmit(either);

  ASSERT_TRUE(c().Deregister("n1", {}).ok());
  const JobInfo small = Job("small");
  EXPECT_EQ(small.state(), kiln::v1::JOB_STATE_FAILED);
  EXPECT_EQ(small.error(),
            "FAILED_PRECONDITION: no registered node serves 256x256 for model flux-tiny; the "
            "cluster serves: flux-tiny fp32 at 512x512");
  EXPECT_EQ(Job("busy-1").state(), kiln::v1::JOB_STATE_FAILED);  // requeued from n1, then failed
  EXPECT_EQ(Job("large").state(), kiln::v1::JOB_STATE_QUEUED);
}

TEST_F(CoordinatorTest, WhenTheLastNodeLeavesQueuedJobsWait) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  MustSubmit(Spec("j2"));
  ASSERT_EQ(Assigned().size(), 1u);
  ASSERT_TRUE(c().Deregister("n1", {}).ok());  // scaled to zero: nothing to judge by
  EXPECT_EQ(Job("j2").state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_QUEUED);  // requeued
}

TEST_F(CoordinatorTest, UncordonUndoesADrain) {
  Register(Node("n1"));
  kiln::v1::DrainRequest drain;
  drain.set_node_id("n1");
  ASSERT_TRUE(c().Drain(drain).ok());
  MustSubmit(Spec("j1"));
  EXPECT_THAT(Assigned(), IsEmpty());
  kiln::v1::UncordonRequest uncordon;
  uncordon.set_node_id("n1");
  auto r = c().Uncordon(uncordon);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->node().state(), kiln::v1::NODE_STATE_READY);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u)));
  EXPECT_TRUE(c().Uncordon(uncordon).ok());  // idempotent
  EXPECT_TRUE(Logged("node n1 uncordoned"));

  uncordon.set_node_id("nope");
  EXPECT_EQ(c().Uncordon(uncordon).status().code(), absl::StatusCode::kNotFound);
  uncordon.set_node_id("bad id");
  EXPECT_EQ(c().Uncordon(uncordon).status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(c().Deregister("n1", {}).ok());
  uncordon.set_node_id("n1");
  EXPECT_EQ(c().Uncordon(uncordon).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(CoordinatorTest, RemoveNodeRefusesWhileJobsRunUnlessForced) {
  Register(Node("n1"));
  Register(Node("n2"));
  MustSubmit(Spec("j1"));
  ASSERT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u)));

  kiln::v1::RemoveNodeRequest remove;
  remove.set_node_id("n1");
  auto refused = c().RemoveNode(remove);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("running 1 job(s) (j1)"));
  EXPECT_EQ(StateOf("n1"), kiln::v1::NODE_STATE_READY);

  remove.set_force(true);
  auto removed = c().RemoveNode(remove);
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(removed->node().info().node_id(), "n1");
  EXPECT_THAT(removed->requeued_jobs(), ElementsAre("j1"));
  EXPECT_EQ(StateOf("n1"), kiln::v1::NODE_STATE_UNSPECIFIED);  // gone from ListNodes
  // n1 was told to stop j1, and j1 runs on n2 now.
  bool cancel_sent = false;
  auto assigned = Assigned();
  for (const auto& o : others_) {
    cancel_sent = cancel_sent || (o.peer == "n1" && o.envelope.cancel_job().job_id() == "j1");
  }
  EXPECT_TRUE(cancel_sent);
  EXPECT_THAT(assigned, ElementsAre(std::make_tuple("n2", "j1", 2u)));
  // n1 is forgotten: its messages are refused until it registers again.
  EXPECT_EQ(c().Heartbeat("n1", {}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(c().RemoveNode(remove).status().code(), absl::StatusCode::kNotFound);
  Register(Node("n1"));
  EXPECT_EQ(StateOf("n1"), kiln::v1::NODE_STATE_READY);
}

TEST_F(CoordinatorTest, RemovingANodeFailsQueuedJobsNobodyElseCanRun) {
  NodeInfo dev = Node("dev");
  dev.clear_models();
  dev.add_models("flux-dev");
  Register(dev);
  Register(Node("tiny"));
  JobSpec spec = Spec("j1");
  spec.set_model("flux-dev");
  kiln::v1::DrainRequest drain;
  drain.set_node_id("dev");
  ASSERT_TRUE(c().Drain(drain).ok());
  MustSubmit(spec);  // waits for the draining node
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_QUEUED);
  kiln::v1::RemoveNodeRequest remove;
  remove.set_node_id("dev");
  ASSERT_TRUE(c().RemoveNode(remove).ok());
  const JobInfo j1 = Job("j1");
  EXPECT_EQ(j1.state(), kiln::v1::JOB_STATE_FAILED);
  EXPECT_EQ(j1.error(),
            "FAILED_PRECONDITION: no registered node serves model flux-dev; the cluster serves: "
            "flux-tiny at any precision and size");
  EXPECT_EQ(metrics_.submissions_unservable.Value(), 1);
  EXPECT_TRUE(j1.phase().empty());
}

TEST_F(CoordinatorTest, PhaseFollowsTheJob) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  ASSERT_EQ(Assigned().size(), 1u);
  EXPECT_EQ(Job("j1").phase(), "assigned");
  kiln::v1::JobProgress p;
  p.set_job_id("j1");
  p.set_phase("compiling transformer");
  ASSERT_TRUE(c().Progress("n1", p).ok());
  EXPECT_EQ(Job("j1").phase(), "compiling transformer");
  p.set_phase("");  // a progress event without a phase keeps the last one
  p.set_step(1);
  ASSERT_TRUE(c().Progress("n1", p).ok());
  EXPECT_EQ(Job("j1").phase(), "compiling transformer");
  // Requeued (and the node drained, so that it stays queued): queued again.
  kiln::v1::DrainRequest drain;
  drain.set_node_id("n1");
  ASSERT_TRUE(c().Drain(drain).ok());
  ASSERT_TRUE(Result("n1", "j1", false, 1, "UNAVAILABLE").ok());
  EXPECT_EQ(Job("j1").phase(), "queued");
  kiln::v1::UncordonRequest uncordon;
  uncordon.set_node_id("n1");
  ASSERT_TRUE(c().Uncordon(uncordon).ok());
  ASSERT_EQ(Assigned().size(), 1u);
  ASSERT_TRUE(Result("n1", "j1").ok());
  EXPECT_TRUE(Job("j1").phase().empty());
}

TEST_F(CoordinatorTest, RepeatedJobIdReturnsTheSameJob) {
  Register(Node("n1"));
  auto first = Submit(Spec("j1"));
  ASSERT_TRUE(first.ok());
  EXPECT_TRUE(first->created());
  EXPECT_EQ(first->job().state(), kiln::v1::JOB_STATE_RUNNING);  // placed at once
  auto again = Submit(Spec("j1"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->created());
  EXPECT_EQ(again->job().spec().job_id(), "j1");
  EXPECT_EQ(again->job().submitted_unix_ms(), first->job().submitted_unix_ms());
  EXPECT_EQ(again->job().attempts(), 1u);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u)));  // only once

  JobSpec other = Spec("j1");
  other.set_prompt("a different prompt");
  auto clash = Submit(other);
  EXPECT_EQ(clash.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(ErrorField(clash.status()), "spec.job_id");
  EXPECT_THAT(std::string(clash.status().message()), HasSubstr("job j1 already exists"));
  EXPECT_THAT(std::string(clash.status().message()), HasSubstr("spec.prompt differs"));

  // Still the same job after it finished (and the PNG is not in a Submit reply).
  ASSERT_TRUE(Result("n1", "j1").ok());
  auto done = Submit(Spec("j1"));
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->job().state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_TRUE(done->job().png().empty());

  EXPECT_EQ(metrics_.submissions_created.Value(), 1);
  EXPECT_EQ(metrics_.submissions_duplicate.Value(), 2);
  EXPECT_EQ(metrics_.submissions_rejected.Value(), 1);
}

// ---- Placement

// Jobs whose run time dwarfs every cold start: each goes to the warmest free node rather than
// waiting for a busy one.
CoordinatorOptions LongJobs() {
  CoordinatorOptions o;
  o.costs.prior_job_seconds = 10'000;
  return o;
}

TEST_F(CoordinatorTest, PrefersLoadedThenLocalDiskThenCompile) {
  Make(LongJobs());
  NodeInfo cold = Node("a-cold");  // sorts first: preference must beat the id tie-break
  DeclareSet(cold);
  NodeInfo local = Node("b-local");
  DeclareSet(local);
  local.add_packages("d1");
  local.add_packages("d2");
  NodeInfo loaded = Node("c-loaded");
  DeclareSet(loaded);
  loaded.add_loaded_packages("d1");
  loaded.add_loaded_packages("d2");
  for (const auto& n : {cold, local, loaded}) Register(n);
  EXPECT_THAT(Assigned(), IsEmpty());

  for (const char* id : {"j1", "j2", "j3", "j4"}) {
    JobSpec spec = Spec(id);
    spec.set_precision("fp32");
    MustSubmit(spec);
  }
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("c-loaded", "j1", 1u),
                                      std::make_tuple("b-local", "j2", 1u),
                                      std::make_tuple("a-cold", "j3", 1u)));
  EXPECT_EQ(Job("j4").state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(c().queue_depth(), 1u);
  EXPECT_EQ(metrics_.queue_depth.Value(), 1);
  EXPECT_TRUE(Logged("job j1 assigned to node c-loaded (attempt 1, packages loaded)"));
  EXPECT_TRUE(Logged("job j2 assigned to node b-local (attempt 1, packages local)"));
}

// Among nodes with the packages loaded, the one whose weights hold the job's LoRA set wins, then
// one that has the LoRAs on disk, then one that lacks them (the LoRA term of the expected
// finish: CostModelOptions::prior_lora_*); a job without LoRAs prefers a node on base weights.
TEST_F(CoordinatorTest, PrefersTheNodeWithTheJobsLoraSetAppliedThenOnDisk) {
  Make(LongJobs());
  auto warm = [](const std::string& id) {
    NodeInfo n = Node(id);
    DeclareSet(n);
    n.add_loaded_packages("d1");
    n.add_loaded_packages("d2");
    return n;
  };
  NodeInfo none = warm("a-none");  // sorts first: preference must beat the id tie-break
  NodeInfo disk = warm("b-disk");
  disk.add_loras("style");
  disk.add_loras("ink");
  NodeInfo applied = warm("c-applied");
  applied.add_loras("style");
  applied.add_loras("ink");
  (*applied.mutable_applied_loras())[std::string(kModel) + "/fp32"] = "style@1,ink@0.5";
  for (const auto& n : {none, disk, applied}) Register(n);

  for (const char* id : {"j1", "j2", "j3"}) {
    JobSpec spec = Spec(id);
    spec.set_precision("fp32");
    auto* style = spec.add_loras();
    style->set_name("style");  // scale 0: 1.0
    auto* ink = spec.add_loras();
    ink->set_name("ink");
    ink->set_scale(0.5);
    MustSubmit(spec);
  }
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("c-applied", "j1", 1u),
                                      std::make_tuple("b-disk", "j2", 1u),
                                      std::make_tuple("a-none", "j3", 1u)));
}

TEST_F(CoordinatorTest, AJobWithoutLorasPrefersANodeOnBaseWeights) {
  Make(LongJobs());
  NodeInfo applied = Node("a-applied");
  DeclareSet(applied);
  applied.add_loras("style");
  (*applied.mutable_applied_loras())[std::string(kModel) + "/fp32"] = "style@1";
  NodeInfo base = Node("b-base");
  DeclareSet(base);
  for (const auto& n : {applied, base}) Register(n);
  JobSpec spec = Spec("j1");
  spec.set_precision("fp32");
  MustSubmit(spec);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-base", "j1", 1u)));
}

TEST_F(CoordinatorTest, PartlyLoadedCountsAsLocalDisk) {
  NodeInfo mixed = Node("a");
  DeclareSet(mixed);
  mixed.add_loaded_packages("d1");
  mixed.add_packages("d2");
  NodeInfo loaded = Node("b");
  DeclareSet(loaded);
  loaded.add_loaded_packages("d1");
  loaded.add_loaded_packages("d2");
  Register(mixed);
  Register(loaded);
  JobSpec spec = Spec("j1");
  spec.set_precision("fp32");
  MustSubmit(spec);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b", "j1", 1u)));
}

TEST_F(CoordinatorTest, DefaultPrecisionUsesTheNodesDeclaredSetThenItsDeviceDefault) {
  // Job precision "": node "x" declares what its default needs under "flux-tiny//256x256";
  // node "y" declares nothing for "" but is a cpu node, whose default is fp32.
  Make(LongJobs());
  NodeInfo x = Node("x");
  DeclareSet(x, "flux-tiny//256x256");
  x.add_packages("d1");
  x.add_packages("d2");
  NodeInfo y = Node("y");
  DeclareSet(y, "flux-tiny/fp32/256x256");
  y.add_loaded_packages("d1");
  y.add_loaded_packages("d2");
  NodeInfo z = Node("a-z");  // cold
  Register(z);
  Register(x);
  Register(y);
  MustSubmit(Spec("j1"));  // precision ""
  MustSubmit(Spec("j2"));
  MustSubmit(Spec("j3"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("y", "j1", 1u),
                                      std::make_tuple("x", "j2", 1u),
                                      std::make_tuple("a-z", "j3", 1u)));
}

TEST_F(CoordinatorTest, IneligibleNodesAreSkippedAndTheReasonIsShown) {
  NodeInfo no_compile = Node("n1", "cpu", /*can_compile=*/false);
  Register(no_compile);
  MustSubmit(Spec("j1"));
  EXPECT_THAT(Assigned(), IsEmpty());
  JobInfo j = Job("j1");
  EXPECT_EQ(j.state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_THAT(j.error(), StartsWith("waiting: no ready node can run it"));
  EXPECT_THAT(j.error(), HasSubstr("n1 does not hold the packages"));
  EXPECT_THAT(j.error(), HasSubstr("cannot compile"));

  // The node gets the packages on disk (heartbeat): now it is eligible.
  kiln::v1::Heartbeat hb;
  hb.add_packages("d1");
  hb.add_packages("d2");
  (*hb.mutable_package_sets())["flux-tiny//256x256"].add_digests("d1");
  (*hb.mutable_package_sets())["flux-tiny//256x256"].add_digests("d2");
  ASSERT_TRUE(c().Heartbeat("n1", hb).ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u)));
  EXPECT_EQ(Job("j1").error(), "");
}

TEST_F(CoordinatorTest, ANodeThatCannotCompileButCanFetchTakesColdJobs) {
  // A node that cannot compile and has no shared tier holds nothing on local disk: the job
  // (precision "") waits, and the reason names the set looked for, the node's declared fp32.
  NodeInfo stuck = Node("n1", "cpu", /*can_compile=*/false);
  DeclareSet(stuck);
  Register(stuck);
  MustSubmit(Spec("j1"));
  EXPECT_THAT(Assigned(), IsEmpty());
  EXPECT_THAT(Job("j1").error(),
              HasSubstr("n1 does not hold the packages for flux-tiny/fp32/256x256 and cannot "
                        "compile or fetch them (no shared cache)"));

  // kiln up --no-compile: the same, but it fetches from the shared cache. The job is its, cold.
  NodeInfo fetcher = Node("n2", "cpu", /*can_compile=*/false);
  DeclareSet(fetcher);
  fetcher.set_can_fetch(true);
  Register(fetcher);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n2", "j1", 1u)));
  EXPECT_EQ(Job("j1").error(), "");
  EXPECT_TRUE(Logged("node n2 registered (cpu; models flux-tiny; 0 packages loaded, 0 on disk; "
                     "can fetch)"));
}

TEST_F(CoordinatorTest, DeclaredPackageSetsSayWhichSizesAndPrecisionsANodeServes) {
  NodeInfo small = Node("a-small", "cuda");  // serves flux-tiny fp32 at 256x256 only
  DeclareSet(small);
  small.add_loaded_packages("d1");
  small.add_loaded_packages("d2");
  Register(small);
  // Kinds no registered node serves are refused at once, naming what the cluster serves.
  JobSpec big = Spec("big");
  big.set_width(512);
  EXPECT_EQ(Submit(big).status().message(),
            "no registered node serves 512x256 for model flux-tiny; the cluster serves: "
            "flux-tiny fp32 at 256x256");
  JobSpec bf16 = Spec("bf16");
  bf16.set_precision("bf16");
  EXPECT_EQ(Submit(bf16).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(Assigned(), IsEmpty());
  // Precision "": the node's default; the one precision it declares at that size is used for
  // warmth even though a cuda device usually defaults to bf16.
  MustSubmit(Spec("default"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a-small", "default", 1u)));
  EXPECT_TRUE(Logged("job default assigned to node a-small (attempt 1, packages loaded)"));
  // A node that declares nothing for the model takes any size (cold, it can compile).
  Register(Node("b-any"));
  MustSubmit(big);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-any", "big", 1u)));
}

TEST_F(CoordinatorTest, Fp8NeedsARecentCudaDevice) {
  Register(Node("cpu-node"));
  NodeInfo ampere = Node("ampere", "cuda");
  ampere.mutable_device()->set_compute_capability("8.0");
  Register(ampere);
  JobSpec spec = Spec("j1");
  spec.set_precision("fp8");
  auto refused = Submit(spec);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("cpu-node has a cpu device, which cannot run fp8"));
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("ampere has compute capability 8.0"));
  Register(Node("hopper", "cuda"));  // 9.0
  MustSubmit(spec);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("hopper", "j1", 1u)));
  // A node that does not serve the model is never chosen.
  NodeInfo other = Node("aaa-other");  // would win the id tie-break if it were eligible
  other.clear_models();
  other.add_models("flux-dev");
  Register(other);
  MustSubmit(Spec("j2"));  // not fp8: the 8.0 card may run it
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("ampere", "j2", 1u)));
}

TEST_F(CoordinatorTest, LeastLoadedWinsAmongEquallyWarmNodes) {
  CoordinatorOptions o;
  o.max_jobs_per_node = 2;
  Make(o);
  Register(Node("a"));
  Register(Node("b"));
  for (const char* id : {"j1", "j2", "j3", "j4", "j5"}) MustSubmit(Spec(id));
  // j1 → a (tie: id); j2 → b (a has 1); j3 → a (tie: a idle longer); j4 → b; j5 waits.
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a", "j1", 1u),
                                      std::make_tuple("b", "j2", 1u),
                                      std::make_tuple("a", "j3", 1u),
                                      std::make_tuple("b", "j4", 1u)));
  ASSERT_TRUE(Result("b", "j2").ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b", "j5", 1u)));
  ASSERT_TRUE(Result("a", "j1").ok());
  ASSERT_TRUE(Result("a", "j3").ok());
  MustSubmit(Spec("j6"));  // a has 0 jobs, b has 2 (full)
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a", "j6", 1u)));
}

TEST_F(CoordinatorTest, WarmthBeatsLoad) {
  CoordinatorOptions o;
  o.max_jobs_per_node = 2;
  Make(o);
  NodeInfo warm = Node("warm");
  DeclareSet(warm);
  warm.add_loaded_packages("d1");
  warm.add_loaded_packages("d2");
  Register(Node("cold"));
  Register(warm);
  for (const char* id : {"j1", "j2"}) {
    JobSpec spec = Spec(id);
    spec.set_precision("fp32");
    MustSubmit(spec);
  }
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("warm", "j1", 1u),
                                      std::make_tuple("warm", "j2", 1u)));
}

// ---- Placement by expected finish time

kiln::v1::JobResult Finished(const std::string& job_id, double run_seconds, double cold_seconds,
                             const std::string& where) {
  kiln::v1::JobResult r;
  r.set_job_id(job_id);
  r.set_ok(true);
  r.set_png(std::string("\x89PNG fake", 9));
  r.set_run_seconds(run_seconds);
  r.mutable_cold_start()->set_total_seconds(cold_seconds);
  (*r.mutable_packages())["transformer"] = where;
  return r;
}

NodeInfo Gpu(const std::string& id, const std::string& name, uint32_t sms,
             const std::string& mig = "") {
  NodeInfo info = Node(id, "cuda");
  info.mutable_device()->set_name(name);
  info.mutable_device()->set_sm_count(sms);
  info.mutable_device()->set_mig_profile(mig);
  DeclareSet(info, "flux-tiny/bf16/256x256");
  return info;
}

JobSpec Bf16(const std::string& id) {
  JobSpec spec = Spec(id);
  spec.set_precision("bf16");
  return spec;
}

TEST_F(CoordinatorTest, AJobWaitsForABusyWarmNodeThatWillFinishItSooner) {
  NodeInfo warm = Gpu("b-warm", "H100", 132);
  warm.add_loaded_packages("d1");
  warm.add_loaded_packages("d2");
  Register(Gpu("a-cold", "H100", 132));  // would have to compile (prior 180 s)
  Register(warm);
  MustSubmit(Bf16("j1"));
  MustSubmit(Bf16("j2"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-warm", "j1", 1u)));
  EXPECT_EQ(Job("j2").state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(Job("j2").error(), "waiting: the nodes that can run it are busy");
  clock_.AdvanceMs(2000);
  ASSERT_TRUE(c().Result("b-warm", Finished("j1", 2, 0, "resident")).ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-warm", "j2", 1u)));
  EXPECT_TRUE(Logged("job j2 assigned to node b-warm (attempt 1, packages loaded); expected to "
                     "take 2.0 s"));
}

TEST_F(CoordinatorTest, ALongQueueSpillsOntoColdNodesWhenWaitingCostsMore) {
  NodeInfo warm = Gpu("b-warm", "H100", 132);
  warm.add_loaded_packages("d1");
  warm.add_loaded_packages("d2");
  Register(Gpu("a-cold", "H100", 132));
  Register(warm);
  MustSubmit(Bf16("j1"));
  ASSERT_TRUE(c().Result("b-warm", Finished("j1", 8, 0, "resident")).ok());  // 8 s a job
  Assigned();
  // j3 and j4 finish sooner behind j2 on b-warm (16 s, 24 s) than on a-cold, which fetches
  // from the shared store first (prior 20 s + 8 s); j5 does not (32 s).
  for (int i = 2; i <= 5; ++i) MustSubmit(Bf16("j" + std::to_string(i)));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-warm", "j2", 1u),
                                      std::make_tuple("a-cold", "j5", 1u)));
}

TEST_F(CoordinatorTest, LearnedRunTimesPickTheFasterDeviceClass) {
  NodeInfo mig = Gpu("a-mig", "H100", 132, "3g.40gb");  // claims full SMs: the prior ties
  NodeInfo h200 = Gpu("b-h200", "H200", 132);
  for (NodeInfo* n : {&mig, &h200}) {
    n->add_loaded_packages("d1");
    n->add_loaded_packages("d2");
  }
  Register(mig);
  Register(h200);
  MustSubmit(Bf16("j1"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a-mig", "j1", 1u)));  // tie: node id
  ASSERT_TRUE(c().Result("a-mig", Finished("j1", 8, 0, "resident")).ok());
  MustSubmit(Bf16("j2"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-h200", "j2", 1u)));  // prior < 8 s
  ASSERT_TRUE(c().Result("b-h200", Finished("j2", 2, 0, "resident")).ok());
  // Both free and warm: the class that ran it in 2 s, not 8.
  MustSubmit(Bf16("j3"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-h200", "j3", 1u)));
  // While b-h200 runs j3 (2 s), j4 waits for it rather than take 8 s on the slice.
  MustSubmit(Bf16("j4"));
  EXPECT_THAT(Assigned(), IsEmpty());
  EXPECT_NEAR(c().costs().RunSeconds(h200.device(), Bf16("j")), 2, 1e-9);
  // Learned cold starts per node: a-mig fetched from the shared store in 3 s.
  ASSERT_TRUE(c().Result("b-h200", Finished("j3", 2, 0, "resident")).ok());
  Assigned();
  EXPECT_NEAR(c().costs().ColdStartSeconds("a-mig", "H100 MIG 3g.40gb",
                                           ColdTier::kSharedStore),
              c().options().costs.prior_shared_seconds, 1e-9);
}

// A node over four GPUs (DeviceInfo.gpu_count) registers once, as its own device class, with
// a prior step time a quarter of one GPU's over the scaling target; latency-critical jobs
// (priority >= latency_priority) go where they finish first, throughput jobs are ranked by
// expected finish x GPUs, so they take a free single GPU and the multi-GPU node only when every
// single GPU is busy for long enough.
TEST_F(CoordinatorTest, AMultiGpuNodeTakesLatencyJobsAndThroughputJobsOnlyWhenItPays) {
  NodeInfo x4 = Gpu("a-x4", "H200", 132);
  x4.mutable_device()->set_gpu_count(4);
  NodeInfo one = Gpu("b-one", "H200", 132);
  for (NodeInfo* n : {&x4, &one}) {
    n->add_loaded_packages("d1");
    n->add_loaded_packages("d2");
  }
  Register(x4);
  Register(one);
  EXPECT_EQ(DeviceClass(x4.device()), "H200 x4");
  EXPECT_EQ(DeviceClass(one.device()), "H200");
  // The prior: the steps run over 4 GPUs at the target efficiency, the fixed part on one.
  const auto& o = c().options().costs;
  const JobSpec probe = Bf16("probe");
  const double single = c().costs().RunSeconds(one.device(), probe);
  const double multi = c().costs().RunSeconds(x4.device(), probe);
  EXPECT_NEAR(single - o.prior_job_seconds,
              (multi - o.prior_job_seconds) * 4 * o.prior_parallel_efficiency, 1e-9);

  JobSpec latency = Bf16("latency");
  latency.set_priority(c().options().latency_priority);
  MustSubmit(latency);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a-x4", "latency", 1u)));
  ASSERT_TRUE(c().Result("a-x4", Finished("latency", 3, 0, "resident")).ok());
  MustSubmit(Bf16("throughput-1"));  // priority 0: the free single GPU, though x4 is faster
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-one", "throughput-1", 1u)));
  ASSERT_TRUE(c().Result("b-one", Finished("throughput-1", 8, 0, "resident")).ok());
  MustSubmit(Bf16("throughput-2"));  // 8 s x 1 GPU beats 3 s x 4 GPUs
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-one", "throughput-2", 1u)));
  // b-one is busy for 8 s more, then 8 s: 16 s x 1 GPU loses to x4's 3 s x 4 GPUs.
  MustSubmit(Bf16("throughput-3"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a-x4", "throughput-3", 1u)));

  // With latency_priority 0 every job is latency-critical: a priority-0 job takes the free,
  // faster multi-GPU node instead of the single GPU.
  CoordinatorOptions all_latency;
  all_latency.latency_priority = 0;
  Make(all_latency);  // same store: new node ids, so the recovered jobs keep a-x4 and b-one
  x4.set_node_id("c-x4");
  one.set_node_id("d-one");
  Register(x4);
  Register(one);
  MustSubmit(Bf16("t"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("c-x4", "t", 1u)));
}

TEST_F(CoordinatorTest, AMultiGpuRegistrationIsCheckedAndShown) {
  NodeInfo too_many = Gpu("n1", "H200", 132);
  too_many.mutable_device()->set_gpu_count(kMaxGpusPerNode + 1);
  kiln::v1::RegisterNode m;
  *m.mutable_info() = too_many;
  auto ack = c().RegisterNode("n1", m);
  ASSERT_FALSE(ack.ok());
  EXPECT_THAT(std::string(ack.status().message()), HasSubstr("register_node.info.device.gpu_count"));
  // A cpu node's count is its CPU ranks (kiln-node --device cpu --gpus 0,1): taken too.
  NodeInfo cpu = Node("n2", "cpu");
  cpu.mutable_device()->set_gpu_count(2);
  Register(cpu);
  EXPECT_EQ(DeviceClass(cpu.device()), "cpu x2");
  NodeInfo x2 = Gpu("n3", "H100", 132);
  x2.mutable_device()->set_gpu_count(2);
  Register(x2);
  std::map<std::string, uint32_t> listed;
  const auto nodes = c().ListNodes();
  for (const auto& n : nodes.nodes()) listed[n.info().node_id()] = n.info().device().gpu_count();
  EXPECT_THAT(listed, ElementsAre(Pair("n2", 2u), Pair("n3", 2u)));
}

// A multi-GPU node whose rank group failed says so in its heartbeat (node/README.md "A multi-GPU
// node") before the UNAVAILABLE result of the job it was running: that job moves to another
// node, and nothing more is placed on the broken node, though it stays registered.
TEST_F(CoordinatorTest, AMultiGpuNodeWhoseGroupFailedGetsNoJobsAndItsJobMovesOn) {
  NodeInfo x2 = Gpu("a-x2", "H100", 132);  // warm and twice as fast: it would get every job
  x2.mutable_device()->set_gpu_count(2);
  x2.add_loaded_packages("d1");
  x2.add_loaded_packages("d2");
  Register(x2);
  JobSpec latency = Bf16("j1");
  latency.set_priority(c().options().latency_priority);
  MustSubmit(latency);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a-x2", "j1", 1u)));
  Register(Gpu("b-one", "H100", 132));
  kiln::v1::Heartbeat hb;
  hb.add_running_jobs("j1");
  hb.set_unhealthy("model flux-tiny (fp32): sequence parallel group '0' of 2 ranks (cuda:0, "
                   "cuda:1) failed: rank 0: collective failed; restart the node");
  ASSERT_TRUE(c().Heartbeat("a-x2", hb).ok());
  EXPECT_TRUE(Logged("node a-x2 takes no jobs: model flux-tiny (fp32): sequence parallel group"));
  ASSERT_TRUE(Result("a-x2", "j1", false, 1, "UNAVAILABLE").ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-one", "j1", 2u)));
  // b-one (cold) is busy; a-x2 is warm, faster and free, but unhealthy: the job waits.
  JobSpec next = Bf16("j2");
  next.set_priority(c().options().latency_priority);
  MustSubmit(next);
  EXPECT_THAT(Assigned(), IsEmpty());
  EXPECT_EQ(StateOf("a-x2"), kiln::v1::NODE_STATE_READY);
  ASSERT_TRUE(Result("b-one", "j1").ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-one", "j2", 1u)));
}

TEST_F(CoordinatorTest, HeldJobsAreLookedAtAgainWhenTheirNodeOverruns) {
  NodeInfo warm = Gpu("b-warm", "H100", 132);
  warm.add_loaded_packages("d1");
  warm.add_loaded_packages("d2");
  Register(Gpu("a-cold", "H100", 132));
  Register(warm);
  MustSubmit(Bf16("j1"));
  MustSubmit(Bf16("j2"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-warm", "j1", 1u)));
  // j1 runs far past its expected time: b-warm's wait is counted from now on as the overrun
  // floor, so j2 keeps waiting for it...
  for (int i = 0; i < 60; ++i) {
    clock_.AdvanceMs(1000);
    kiln::v1::Heartbeat hb;  // still warm, still running j1
    hb.add_running_jobs("j1");
    hb.add_loaded_packages("d1");
    hb.add_loaded_packages("d2");
    ASSERT_TRUE(c().Heartbeat("b-warm", hb).ok());
    Beat("a-cold");
    c().Tick();
  }
  EXPECT_THAT(Assigned(), IsEmpty());
  // ...until b-warm is declared dead: then j1 goes to a-cold and j2 waits behind it.
  Advance(5'000, {"a-cold"});
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a-cold", "j1", 2u)));
}

// ---- Prefetch slots (NodeInfo.job_slots: the running job plus those a node takes ahead)

NodeInfo WithSlots(NodeInfo info, uint32_t slots) {
  info.set_job_slots(slots);
  return info;
}

TEST_F(CoordinatorTest, ANodeWithAPrefetchSlotTakesTheNextJobBeforeItsRunningOneEnds) {
  kiln::v1::RegisterNode too_many;
  *too_many.mutable_info() = WithSlots(Node("greedy"), 9);  // more than max_job_slots_per_node
  auto refused = c().RegisterNode("greedy", too_many);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("register_node.info.job_slots: 9 is more than 8"));

  Register(WithSlots(Node("n1"), 2));
  for (const char* id : {"j1", "j2", "j3"}) MustSubmit(Spec(id));
  // j1 runs, j2 is prefetched; j3 waits for a slot.
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u),
                                      std::make_tuple("n1", "j2", 1u)));
  EXPECT_EQ(Job("j2").state(), kiln::v1::JOB_STATE_RUNNING);
  EXPECT_EQ(Job("j3").error(), "waiting: the nodes that can run it are busy");
  ASSERT_TRUE(Result("n1", "j1").ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j3", 1u)));
  // A node that declares no slots holds max_jobs_per_node (1).
  Register(Node("old"));
  MustSubmit(Spec("j4"));
  MustSubmit(Spec("j5"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("old", "j4", 1u)));
}

TEST_F(CoordinatorTest, APrefetchedJobWaitsForTheRunningOneAndPlacementCountsTheWait) {
  NodeInfo warm = WithSlots(Gpu("b-warm", "H100", 132), 2);
  warm.add_loaded_packages("d1");
  warm.add_loaded_packages("d2");
  Register(WithSlots(Gpu("a-cold", "H100", 132), 2));
  Register(warm);
  MustSubmit(Bf16("j1"));
  ASSERT_TRUE(c().Result("b-warm", Finished("j1", 8, 0, "resident")).ok());  // 8 s a job
  Assigned();
  // b-warm: j2 runs (ends in 8 s), j3 is prefetched behind it (16 s); j4 would end in 24 s
  // there, sooner than on a-cold (shared store prior 20 s + 8 s), so it is held for b-warm;
  // j5 (32 s) goes to a-cold. Were the prefetched job's wait not counted, j5 too would wait.
  for (int i = 2; i <= 5; ++i) MustSubmit(Bf16("j" + std::to_string(i)));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-warm", "j2", 1u),
                                      std::make_tuple("b-warm", "j3", 1u),
                                      std::make_tuple("a-cold", "j5", 1u)));
  EXPECT_TRUE(Logged("job j3 assigned to node b-warm (attempt 1, packages loaded); expected to "
                     "take 16.0 s"));
  EXPECT_EQ(Job("j4").state(), kiln::v1::JOB_STATE_QUEUED);
}

// Both issue-14 terms at once: prefetch slots (each node holds 2 jobs, and a job taken ahead
// counts the wait for the running one) and the LoRA term (a node whose weights hold the job's
// set needs no switch; one with the LoRA on disk needs prior_lora_switch_seconds, 0.5 s).
TEST_F(CoordinatorTest, PlacementCountsPrefetchSlotsAndPrefersTheNodeWithTheLoraApplied) {
  auto warm = [](const std::string& id) {
    NodeInfo n = WithSlots(Gpu(id, "H100", 132), 2);
    n.add_loaded_packages("d1");
    n.add_loaded_packages("d2");
    n.add_loras("style");
    return n;
  };
  NodeInfo applied = warm("b-lora");  // sorts second: the LoRA term must beat the id tie-break
  (*applied.mutable_applied_loras())[std::string(kModel) + "/bf16"] = "style@1";
  Register(warm("a-base"));
  Register(applied);
  MustSubmit(Bf16("j1"));  // no LoRA: a-base (b-lora would switch back to the base weights)
  ASSERT_TRUE(c().Result("a-base", Finished("j1", 8, 0, "resident")).ok());  // 8 s a job
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a-base", "j1", 1u)));
  // With style: j2 on b-lora ends in 8 s, on a-base in 8.5; j3: a-base 8.5 beats b-lora's
  // prefetch slot (16); j4: b-lora's prefetch (16) beats a-base's (17); j5: a-base's prefetch.
  // Both nodes are then full: j6 waits.
  for (int i = 2; i <= 6; ++i) {
    JobSpec spec = Bf16("j" + std::to_string(i));
    spec.add_loras()->set_name("style");
    MustSubmit(spec);
  }
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b-lora", "j2", 1u),
                                      std::make_tuple("a-base", "j3", 1u),
                                      std::make_tuple("b-lora", "j4", 1u),
                                      std::make_tuple("a-base", "j5", 1u)));
  EXPECT_EQ(Job("j6").state(), kiln::v1::JOB_STATE_QUEUED);
}

// Batching (NodeInfo.max_batch): a batching node that holds a job not yet denoising takes a
// batch-compatible job into the same batch (it finishes with it) rather than leaving it to an
// equally fast node; a full batch, a job already denoising, another step count, or a node that
// would finish the job sooner elsewhere end the preference.
NodeInfo Batching(const std::string& id) {
  NodeInfo n = WithSlots(Gpu(id, "H100", 132), 3);
  n.add_loaded_packages("d1");
  n.add_loaded_packages("d2");
  n.set_max_batch(2);
  return n;
}

kiln::v1::JobProgress Denoising(const std::string& job_id) {
  kiln::v1::JobProgress p;
  p.set_job_id(job_id);
  p.set_phase("denoising");
  p.set_step(1);
  p.set_total_steps(4);
  return p;
}

TEST_F(CoordinatorTest, ABatchingNodeTakesACompatibleJobIntoTheBatchItHolds) {
  Register(Batching("a"));
  Register(Batching("b"));
  MustSubmit(Bf16("j0"));
  ASSERT_TRUE(c().Result("a", Finished("j0", 8, 0, "resident")).ok());  // 8 s a job
  Assigned();
  // j1 → b (idle longest); j2 joins j1's batch on b (ends with it in 8 s, as on a); b's batch
  // is full: j3 → a (8 s, b's next slot 16 s); j4 joins j3's batch on a. Another step count
  // cannot join: j5 goes by expected finish alone. Without the preference j2 would go to a (the
  // least busy of two equally fast nodes) and no batch would form.
  for (const char* id : {"j1", "j2", "j3", "j4"}) MustSubmit(Bf16(id));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b", "j1", 1u), std::make_tuple("b", "j2", 1u),
                                      std::make_tuple("a", "j3", 1u), std::make_tuple("a", "j4", 1u)));
  EXPECT_TRUE(Logged("job j2 assigned to node b (attempt 1, packages loaded); expected to take "
                     "8.0 s"));
  JobSpec other = Bf16("j5");
  other.set_steps(other.steps() + 1);
  MustSubmit(other);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a", "j5", 1u)));  // a's prefetch slot
}

TEST_F(CoordinatorTest, ABatchHostLosesToANodeThatFinishesTheJobSooner) {
  Register(Batching("a"));
  MustSubmit(Bf16("j0"));
  ASSERT_TRUE(c().Result("a", Finished("j0", 8, 0, "resident")).ok());  // 8 s a job
  MustSubmit(Bf16("j1"));
  ASSERT_TRUE(c().Progress("a", Denoising("j1")).ok());
  MustSubmit(Bf16("j2"));  // j1 denoises: j2 cannot join it; it is prefetched, ends in 16 s
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a", "j0", 1u), std::make_tuple("a", "j1", 1u),
                                      std::make_tuple("a", "j2", 1u)));
  EXPECT_TRUE(Logged("job j2 assigned to node a (attempt 1, packages loaded); expected to take "
                     "16.0 s"));
  // j3 could join j2's batch on a (16 s), but b, idle, finishes it in 8 s.
  Register(Batching("b"));
  MustSubmit(Bf16("j3"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("b", "j3", 1u)));
}

TEST_F(CoordinatorTest, APrefetchedJobIsCancelledRequeuedAndTimedOutLikeARunningOne) {
  CoordinatorOptions o;
  o.run_timeout_factor = 1e-6;  // every job's timeout is run_timeout_min_ms
  o.run_timeout_min_ms = 20'000;
  Make(o);
  Register(WithSlots(Node("n1"), 2));
  for (const char* id : {"j1", "j2", "j3"}) MustSubmit(Spec(id));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u),
                                      std::make_tuple("n1", "j2", 1u)));
  // Cancel the prefetched j2: the node is told, and its slot frees when the node answers.
  kiln::v1::CancelRequest cancel;
  cancel.set_job_id("j2");
  auto r = c().Cancel(cancel);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->job().error(), "CANCELLED: cancelled by a client while running on n1");
  auto others = Others();
  ASSERT_EQ(others.size(), 1u);
  EXPECT_EQ(others[0].envelope.cancel_job().job_id(), "j2");
  EXPECT_THAT(Assigned(), IsEmpty());
  ASSERT_TRUE(Result("n1", "j2", false, 1, "CANCELLED").ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j3", 1u)));

  // n1 dies holding j1 (running) and j3 (prefetched): both go to n2.
  Register(WithSlots(Node("n2"), 2));
  Advance(4000, {"n2"});
  EXPECT_EQ(StateOf("n1"), kiln::v1::NODE_STATE_DEAD);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n2", "j1", 2u),
                                      std::make_tuple("n2", "j3", 2u)));

  // n2 never answers: both pass the run timeout, are requeued and n2 is marked suspect.
  Advance(21'000, {"n2"});
  EXPECT_EQ(StateOf("n2"), kiln::v1::NODE_STATE_DRAINING);
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(Job("j3").state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(metrics_.run_timeouts.Value(), 2);
  std::set<std::string> cancelled;
  for (const auto& m : Others()) {
    if (m.envelope.has_cancel_job()) cancelled.insert(m.envelope.cancel_job().job_id());
  }
  EXPECT_THAT(cancelled, ElementsAre("j1", "j3"));
}

TEST_F(CoordinatorTest, HigherPriorityFirstThenSubmitOrder) {
  Register(Node("n1"));
  MustSubmit(Spec("busy"));
  MustSubmit(Spec("low-a", 0));
  MustSubmit(Spec("high-b", 5));
  MustSubmit(Spec("low-c", 0));
  MustSubmit(Spec("high-d", 5));
  MustSubmit(Spec("neg-e", -3));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "busy", 1u)));
  std::vector<std::string> order;
  std::string running = "busy";
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(Result("n1", running).ok());
    auto a = Assigned();
    ASSERT_EQ(a.size(), 1u);
    running = std::get<1>(a[0]);
    order.push_back(running);
  }
  EXPECT_THAT(order, ElementsAre("high-b", "high-d", "low-a", "low-c", "neg-e"));
}

// ---- Node failures

TEST_F(CoordinatorTest, DeadNodesJobIsRequeuedAndCompletesElsewhere) {
  Register(Node("n1"));
  Register(Node("n2"));
  MustSubmit(Spec("j1"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u)));

  // n2 keeps heartbeating, n1 falls silent: dead after 3 intervals (3000 ms), not before.
  Advance(3000, {"n2"});
  EXPECT_EQ(StateOf("n1"), kiln::v1::NODE_STATE_READY);
  Advance(1000, {"n2"});
  EXPECT_EQ(StateOf("n1"), kiln::v1::NODE_STATE_DEAD);
  EXPECT_TRUE(Logged("node n1 is dead"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n2", "j1", 2u)));
  JobInfo j = Job("j1");
  EXPECT_EQ(j.state(), kiln::v1::JOB_STATE_RUNNING);
  EXPECT_EQ(j.node_id(), "n2");
  EXPECT_EQ(j.attempts(), 2u);
  EXPECT_EQ(metrics_.jobs_requeued.Value(), 1);
  EXPECT_EQ(metrics_.nodes_dead.Value(), 1);
  EXPECT_EQ(metrics_.nodes_ready.Value(), 1);

  ASSERT_TRUE(Result("n2", "j1", true, 2).ok());
  j = Job("j1");
  EXPECT_EQ(j.state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(j.node_id(), "n2");
  EXPECT_EQ(j.png(), std::string("\x89PNG fake", 9));
  EXPECT_EQ(j.step(), 4u);
  EXPECT_EQ(j.packages().at("transformer"), "local");
  EXPECT_GT(j.finished_unix_ms(), 0);
  EXPECT_EQ(metrics_.jobs_succeeded.Value(), 1);
  EXPECT_EQ(metrics_.run_seconds.Collect().histogram.sample_count, 1u);
  EXPECT_EQ(metrics_.queue_seconds.Collect().histogram.sample_count, 2u);  // two assignments

  // The dead node's messages are refused until it registers again.
  kiln::v1::Heartbeat hb;
  EXPECT_EQ(c().Heartbeat("n1", hb).code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(CoordinatorTest, LateResultFromAFormerAssigneeIsIgnoredAndCounted) {
  Register(Node("n1"));
  Register(Node("n2"));
  MustSubmit(Spec("j1"));
  Assigned();
  Advance(4000, {"n2"});  // n1 dies; j1 → n2
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n2", "j1", 2u)));

  // From the dead node: refused (it must register again) and counted.
  EXPECT_EQ(Result("n1", "j1", true, 1).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(metrics_.stale_results.Value(), 1);
  // From the same node once it is back: ignored, counted.
  Register(Node("n1"));
  EXPECT_TRUE(Result("n1", "j1", true, 1).ok());
  EXPECT_EQ(metrics_.stale_results.Value(), 2);
  EXPECT_TRUE(Logged("ignored a stale result for job j1 from node n1"));
  // A failure from the assignee for another attempt: ignored too.
  EXPECT_TRUE(Result("n2", "j1", false, 1, "INTERNAL").ok());
  EXPECT_EQ(metrics_.stale_results.Value(), 3);
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_RUNNING);
  EXPECT_EQ(Job("j1").node_id(), "n2");
  // Stale progress is ignored as well.
  kiln::v1::JobProgress p;
  p.set_job_id("j1");
  p.set_step(3);
  EXPECT_TRUE(c().Progress("n1", p).ok());
  EXPECT_EQ(Job("j1").step(), 0u);
  EXPECT_EQ(metrics_.stale_progress.Value(), 1);

  // A success from the assignee counts whatever attempt it names (a node that was given a job
  // again while still running it reports the attempt it started).
  ASSERT_TRUE(Result("n2", "j1", true, 1).ok());
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(metrics_.stale_results.Value(), 3);
}

TEST_F(CoordinatorTest, AfterMaxAttemptsTheJobFailsWithTheReason) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  for (uint32_t attempt = 1; attempt <= 3; ++attempt) {
    EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", attempt)));
    Advance(4000);  // n1 dies
    EXPECT_EQ(StateOf("n1"), kiln::v1::NODE_STATE_DEAD);
    if (attempt < 3) {
      EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_QUEUED);
      EXPECT_EQ(Job("j1").error(),
                absl::StrCat("waiting: requeued after node n1 died while running it (attempt ",
                             attempt, " of 3)"));
      Register(Node("n1"));  // it comes back
    }
  }
  JobInfo j = Job("j1");
  EXPECT_EQ(j.state(), kiln::v1::JOB_STATE_FAILED);
  EXPECT_EQ(j.error(), "UNAVAILABLE: node n1 died while running it (3 attempts)");
  EXPECT_EQ(j.attempts(), 3u);
  EXPECT_EQ(metrics_.jobs_failed.Value(), 1);
  EXPECT_EQ(metrics_.jobs_requeued.Value(), 2);
  EXPECT_TRUE(Logged("job j1 failed: UNAVAILABLE: node n1 died while running it (3 attempts)"));
}

TEST_F(CoordinatorTest, RegisteringAgainKeepsJobsUntilHeartbeatsSayOtherwise) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  Assigned();
  // Reconnected: it still runs j1, as its heartbeats say.
  Register(Node("n1"));
  EXPECT_TRUE(Logged("node n1 registered again"));
  EXPECT_THAT(Assigned(), IsEmpty());
  clock_.AdvanceMs(3500);
  Beat("n1", {"j1"});
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_RUNNING);
  // Restarted under the same id: its heartbeats no longer list j1 → requeued and placed again.
  Register(Node("n1"));
  Beat("n1", {});
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 2u)));
  EXPECT_THAT(Job("j1").error(), IsEmpty());
  EXPECT_TRUE(Logged("job j1 requeued: node n1 stopped reporting it (attempt 1 of 3)"));
}

TEST_F(CoordinatorTest, LeavingGivesUpTheNodesJobs) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  Assigned();

  ASSERT_TRUE(c().Deregister("n1", [] {
                  kiln::v1::Deregister d;
                  d.set_reason("SIGTERM");
                  return d;
                }())
                  .ok());
  EXPECT_EQ(StateOf("n1"), kiln::v1::NODE_STATE_LEFT);
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(Job("j1").error(),
            "waiting: requeued after node n1 left while running it (attempt 1 of 3)");
  EXPECT_EQ(metrics_.nodes_left.Value(), 1);
}

TEST_F(CoordinatorTest, RetryableNodeFailureRequeuesOthersFail) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  Assigned();
  ASSERT_TRUE(Result("n1", "j1", false, 1, "RESOURCE_EXHAUSTED").ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 2u)));
  ASSERT_TRUE(Result("n1", "j1", false, 2, "INVALID_ARGUMENT").ok());
  JobInfo j = Job("j1");
  EXPECT_EQ(j.state(), kiln::v1::JOB_STATE_FAILED);
  EXPECT_EQ(j.error(), "INVALID_ARGUMENT: it broke (on node n1)");
  EXPECT_GT(j.run_seconds(), -1);
}

TEST_F(CoordinatorTest, NodeWithABrokenDiskGetsNoJobsAndItsFailedJobMovesToAHealthyNode) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u)));
  Register(Node("n2"));  // busy with nothing
  // n1's disk fills while it runs j1: its heartbeat says so before the failed result arrives.
  kiln::v1::Heartbeat hb;
  hb.add_running_jobs("j1");
  hb.set_unhealthy("package directory /p: write: No space left on device; free space there");
  ASSERT_TRUE(c().Heartbeat("n1", hb).ok());
  EXPECT_TRUE(Logged("node n1 takes no jobs: package directory /p"));
  ASSERT_TRUE(Result("n1", "j1", false, 1, "RESOURCE_EXHAUSTED").ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n2", "j1", 2u)));
  ASSERT_TRUE(Result("n2", "j1").ok());
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_SUCCEEDED);
  // While n1 says it is unhealthy nothing goes there, even with n2 busy.
  MustSubmit(Spec("j2"));
  MustSubmit(Spec("j3"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n2", "j2", 1u)));
  // Its disk works again: the next heartbeat clears it and the queued job goes there.
  hb.Clear();
  ASSERT_TRUE(c().Heartbeat("n1", hb).ok());
  c().Tick();
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j3", 1u)));
  EXPECT_TRUE(Logged("node n1 is healthy again"));
}

TEST_F(CoordinatorTest, HeartbeatsReconcileRunningJobs) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  Assigned();
  // A heartbeat sent before the AssignJob arrived does not list j1: within the grace period.
  Beat("n1", {});
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_RUNNING);
  // Still not listed 3 intervals later: the assignment was lost → requeued (and placed again).
  clock_.AdvanceMs(3001);
  Beat("n1", {});
  EXPECT_EQ(metrics_.jobs_requeued.Value(), 1);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 2u)));
  // A job the node runs but does not hold (e.g. from before a requeue): told to stop.
  Beat("n1", {"j1", "ghost"});
  auto others = Others();
  ASSERT_EQ(others.size(), 1u);
  EXPECT_EQ(others[0].peer, "n1");
  EXPECT_EQ(others[0].envelope.cancel_job().job_id(), "ghost");
}

TEST_F(CoordinatorTest, CoordinatorHeartbeatsLiveNodes) {
  Register(Node("n1"));
  Register(Node("n2"));
  ASSERT_TRUE(c().Deregister("n2", {}).ok());
  MustSubmit(Spec("j1"));
  Assigned();
  c().Tick();
  auto others = Others();
  ASSERT_EQ(others.size(), 1u);
  EXPECT_EQ(others[0].peer, "n1");
  ASSERT_TRUE(others[0].envelope.has_heartbeat());
  EXPECT_THAT(others[0].envelope.heartbeat().running_jobs(), ElementsAre("j1"));
  clock_.AdvanceMs(500);
  Beat("n1", {"j1"});
  c().Tick();
  EXPECT_THAT(Others(), IsEmpty());  // not due yet
  clock_.AdvanceMs(500);
  c().Tick();
  EXPECT_EQ(Others().size(), 1u);
}

// ---- Client operations

TEST_F(CoordinatorTest, CancelQueuedAndRunning) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  MustSubmit(Spec("j2"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u)));

  kiln::v1::CancelRequest cancel;
  cancel.set_job_id("j2");
  auto r = c().Cancel(cancel);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->job().state(), kiln::v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(r->job().error(), "CANCELLED: cancelled by a client");
  EXPECT_EQ(c().queue_depth(), 0u);
  EXPECT_THAT(Others(), IsEmpty());  // nothing to tell a node
  ASSERT_TRUE(c().Cancel(cancel).ok());  // idempotent

  cancel.set_job_id("j1");
  r = c().Cancel(cancel);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->job().state(), kiln::v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(r->job().error(), "CANCELLED: cancelled by a client while running on n1");
  auto others = Others();
  ASSERT_EQ(others.size(), 1u);
  EXPECT_EQ(others[0].peer, "n1");
  EXPECT_EQ(others[0].envelope.cancel_job().job_id(), "j1");
  EXPECT_EQ(metrics_.jobs_cancelled.Value(), 2);

  // n1 is still winding j1 down: a new job waits until n1 reports back.
  MustSubmit(Spec("j3"));
  EXPECT_THAT(Assigned(), IsEmpty());
  ASSERT_TRUE(Result("n1", "j1", false, 1, "CANCELLED").ok());
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_CANCELLED);  // the late result changes nothing
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j3", 1u)));

  ASSERT_TRUE(Result("n1", "j3").ok());
  cancel.set_job_id("j3");
  EXPECT_EQ(c().Cancel(cancel).status().code(), absl::StatusCode::kFailedPrecondition);
  cancel.set_job_id("nope");
  EXPECT_EQ(c().Cancel(cancel).status().code(), absl::StatusCode::kNotFound);
  cancel.set_job_id("");
  EXPECT_EQ(c().Cancel(cancel).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CoordinatorTest, DrainStopsNewWorkButLetsTheRunningJobFinish) {
  Register(Node("n1"));
  Register(Node("n2"));
  MustSubmit(Spec("j1"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u)));
  kiln::v1::DrainRequest drain;
  drain.set_node_id("n1");
  auto r = c().Drain(drain);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->node().state(), kiln::v1::NODE_STATE_DRAINING);
  EXPECT_THAT(r->node().running_jobs(), ElementsAre("j1"));
  EXPECT_TRUE(c().Drain(drain).ok());  // idempotent
  EXPECT_EQ(metrics_.nodes_draining.Value(), 1);

  MustSubmit(Spec("j2"));
  MustSubmit(Spec("j3"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n2", "j2", 1u)));
  ASSERT_TRUE(Result("n1", "j1").ok());  // the draining node's result is accepted
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_THAT(Assigned(), IsEmpty());  // ... but it gets nothing new
  EXPECT_EQ(Job("j3").state(), kiln::v1::JOB_STATE_QUEUED);
  // A draining node that stays silent still dies.
  Advance(4000, {"n2"});
  EXPECT_EQ(StateOf("n1"), kiln::v1::NODE_STATE_DEAD);
  EXPECT_EQ(c().Drain(drain).status().code(), absl::StatusCode::kFailedPrecondition);
  drain.set_node_id("n9");
  EXPECT_EQ(c().Drain(drain).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CoordinatorTest, QueuedJobPastItsDeadlineFails) {
  Register(Node("n1"));
  MustSubmit(Spec("busy"));
  JobSpec spec = Spec("j1");
  spec.set_deadline_unix_ms(clock_.UnixMs() + 2500);
  MustSubmit(spec);
  JobSpec later = Spec("j2");
  later.set_deadline_unix_ms(clock_.UnixMs() + 60000);
  MustSubmit(later);
  Advance(2000, {"n1"});
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_QUEUED);
  Advance(1000, {"n1"});
  JobInfo j = Job("j1");
  EXPECT_EQ(j.state(), kiln::v1::JOB_STATE_FAILED);
  EXPECT_THAT(j.error(), StartsWith("DEADLINE_EXCEEDED: not started before its deadline"));
  EXPECT_EQ(c().queue_depth(), 1u);
  // A job that started before its deadline is not stopped by it.
  ASSERT_TRUE(Result("n1", "busy").ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "busy", 1u),
                                      std::make_tuple("n1", "j2", 1u)));
}

TEST_F(CoordinatorTest, StatusIncludesThePngOnlyWhenAsked) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  ASSERT_TRUE(Result("n1", "j1").ok());
  kiln::v1::StatusRequest req;
  req.set_job_id("j1");
  auto r = c().Status(req);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->job().state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_TRUE(r->job().png().empty());
  req.set_include_png(true);
  EXPECT_EQ(c().Status(req)->job().png(), std::string("\x89PNG fake", 9));
  req.set_job_id("nope");
  EXPECT_EQ(c().Status(req).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CoordinatorTest, WaitAnswersOnCompletionOnTimeoutAndStreamsProgress) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  MustSubmit(Spec("j2"));
  Assigned();

  kiln::v1::WaitRequest w;
  w.set_job_id("j1");
  w.set_timeout_ms(10000);
  w.set_include_png(true);
  auto r = c().Wait(w, ReplyTo{"client-a", "r1"});
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());  // answered later
  w.set_include_png(false);
  w.set_stream_progress(true);
  r = c().Wait(w, ReplyTo{"client-b", "r2"});
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_FALSE((*r)->final());  // the current state, more to come
  EXPECT_EQ((*r)->job().state(), kiln::v1::JOB_STATE_RUNNING);
  kiln::v1::WaitRequest w2;
  w2.set_job_id("j2");
  w2.set_timeout_ms(1500);
  ASSERT_TRUE(c().Wait(w2, ReplyTo{"client-c", "r3"}).ok());
  EXPECT_EQ(c().pending_waits(), 3u);

  // Progress goes only to the streaming waiter.
  kiln::v1::JobProgress p;
  p.set_job_id("j1");
  p.set_step(2);
  p.set_total_steps(4);
  p.set_phase("denoising");
  ASSERT_TRUE(c().Progress("n1", p).ok());
  auto out = ClientReplies();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].socket, Outgoing::Socket::kClient);
  EXPECT_EQ(out[0].peer, "client-b");
  EXPECT_EQ(out[0].envelope.request_id(), "r2");
  EXPECT_FALSE(out[0].envelope.job().final());
  EXPECT_EQ(out[0].envelope.job().job().step(), 2u);
  EXPECT_EQ(Job("j1").step(), 2u);
  // The node's phase is carried into JobInfo, for the waiter and the store.
  EXPECT_EQ(out[0].envelope.job().job().phase(), "denoising");
  EXPECT_EQ(Job("j1").phase(), "denoising");

  // j2's wait times out with its current state.
  Advance(1000, {"n1"});
  EXPECT_THAT(ClientReplies(), IsEmpty());
  Advance(1000, {"n1"});
  out = ClientReplies();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].peer, "client-c");
  EXPECT_TRUE(out[0].envelope.job().final());
  EXPECT_EQ(out[0].envelope.job().job().state(), kiln::v1::JOB_STATE_QUEUED);

  // j1 finishes: both j1 waiters get a final reply; the PNG only where asked.
  ASSERT_TRUE(Result("n1", "j1").ok());
  out = ClientReplies();
  ASSERT_EQ(out.size(), 2u);
  for (const auto& o : out) {
    EXPECT_TRUE(o.envelope.job().final());
    EXPECT_EQ(o.envelope.job().job().state(), kiln::v1::JOB_STATE_SUCCEEDED);
    EXPECT_EQ(o.envelope.job().job().png().empty(), o.peer == "client-b") << o.peer;
  }
  EXPECT_EQ(c().pending_waits(), 0u);

  // A finished job, or timeout 0: answered at once.
  w.set_stream_progress(false);
  w.set_include_png(true);
  r = c().Wait(w, ReplyTo{"client-a", "r4"});
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_TRUE((*r)->final());
  EXPECT_FALSE((*r)->job().png().empty());
  w2.set_timeout_ms(0);
  r = c().Wait(w2, ReplyTo{"client-a", "r5"});
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_TRUE((*r)->final());
  w2.set_job_id("nope");
  EXPECT_EQ(c().Wait(w2, ReplyTo{}).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CoordinatorTest, WaitStreamsRequeuesAndPendingWaitsAreBounded) {
  CoordinatorOptions o;
  o.max_pending_waits = 2;
  Make(o);
  Register(Node("n1"));
  Register(Node("n2"));
  MustSubmit(Spec("j1"));
  Assigned();
  kiln::v1::WaitRequest w;
  w.set_job_id("j1");
  w.set_timeout_ms(60000);
  w.set_stream_progress(true);
  ASSERT_TRUE(c().Wait(w, ReplyTo{"a", "1"}).ok());
  ASSERT_TRUE(c().Wait(w, ReplyTo{"b", "2"}).ok());
  EXPECT_EQ(c().Wait(w, ReplyTo{"c", "3"}).status().code(),
            absl::StatusCode::kResourceExhausted);
  Advance(4000, {"n2"});  // n1 dies: streaming waiters see QUEUED then RUNNING on n2
  std::vector<std::string> seen;
  for (const auto& out : Others()) {
    if (out.socket != Outgoing::Socket::kClient || out.peer != "a") continue;
    const auto& job = out.envelope.job().job();
    seen.push_back(absl::StrCat(kiln::v1::JobState_Name(job.state()), "@", job.node_id()));
  }
  EXPECT_THAT(seen, ElementsAre("JOB_STATE_QUEUED@", "JOB_STATE_RUNNING@n2"));
}

TEST_F(CoordinatorTest, ListNodesShowsEveryNode) {
  Register(Node("n2"));
  NodeInfo gpu = Node("n1", "cuda");
  gpu.mutable_device()->set_name("NVIDIA H100 80GB HBM3");
  gpu.mutable_device()->set_mig_profile("3g.40gb");
  Register(gpu);
  MustSubmit(Spec("j1"));
  ASSERT_TRUE(Result("n1", "j1").ok());
  auto nodes = c().ListNodes();
  ASSERT_EQ(nodes.nodes_size(), 2);
  EXPECT_EQ(nodes.nodes(0).info().node_id(), "n1");
  EXPECT_EQ(nodes.nodes(0).info().device().mig_profile(), "3g.40gb");
  EXPECT_EQ(nodes.nodes(0).jobs_done(), 1u);
  EXPECT_EQ(nodes.nodes(0).state(), kiln::v1::NODE_STATE_READY);
  EXPECT_EQ(nodes.nodes(0).last_seen_unix_ms(), clock_.UnixMs());
  EXPECT_TRUE(Logged("node n1 registered (cuda NVIDIA H100 80GB HBM3 MIG 3g.40gb"));
}

TEST_F(CoordinatorTest, BadRegistrationsAreRefused) {
  kiln::v1::RegisterNode m;
  *m.mutable_info() = Node("n1");
  auto r = c().RegisterNode("n2", m);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ErrorField(r.status()), "register_node.info.node_id");
  r = c().RegisterNode(std::string("\0abcd", 5), m);  // a DEALER without a routing id
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("routing id"));
  m.mutable_info()->mutable_device()->set_kind("tpu");
  r = c().RegisterNode("n1", m);
  EXPECT_EQ(ErrorField(r.status()), "register_node.info.device.kind");
  *m.mutable_info() = Node("n1");
  m.mutable_info()->clear_models();
  EXPECT_EQ(ErrorField(c().RegisterNode("n1", m).status()), "register_node.info.models");
  // node_id may be left empty: the socket identity is the node id.
  *m.mutable_info() = Node("");
  ASSERT_TRUE(c().RegisterNode("n3", m).ok());
  EXPECT_EQ(c().ListNodes().nodes(0).info().node_id(), "n3");
  // Messages from a node that never registered.
  EXPECT_EQ(c().Heartbeat("stranger", {}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(c().Progress("stranger", {}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(c().Deregister("stranger", {}).code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(CoordinatorTest, NodeTableIsBoundedAndEvictsDeadNodesFirst) {
  CoordinatorOptions o;
  o.max_nodes = 2;
  Make(o);
  Register(Node("n1"));
  Register(Node("n2"));
  kiln::v1::RegisterNode m;
  *m.mutable_info() = Node("n3");
  EXPECT_EQ(c().RegisterNode("n3", m).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(c().Deregister("n1", {}).ok());
  ASSERT_TRUE(c().RegisterNode("n3", m).ok());
  auto nodes = c().ListNodes();
  ASSERT_EQ(nodes.nodes_size(), 2);
  EXPECT_EQ(nodes.nodes(0).info().node_id(), "n2");
  EXPECT_EQ(nodes.nodes(1).info().node_id(), "n3");
}

TEST_F(CoordinatorTest, RecoversUnfinishedJobsFromTheStore) {
  JobInfo running;
  *running.mutable_spec() = Spec("was-running");
  running.set_state(kiln::v1::JOB_STATE_RUNNING);
  running.set_node_id("old-node");
  running.set_attempts(1);
  ASSERT_TRUE(store_.Put(running).ok());
  JobInfo queued;
  *queued.mutable_spec() = Spec("was-queued");
  queued.set_state(kiln::v1::JOB_STATE_QUEUED);
  ASSERT_TRUE(store_.Put(queued).ok());
  Make(CoordinatorOptions{});
  // The running job stays on old-node for now; the queued one is placed.
  EXPECT_EQ(c().queue_depth(), 1u);
  EXPECT_EQ(Job("was-running").state(), kiln::v1::JOB_STATE_RUNNING);
  Register(Node("n1"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "was-queued", 1u)));
  // old-node never comes back: after the grace the job is requeued and runs elsewhere.
  ASSERT_TRUE(Result("n1", "was-queued").ok());
  Advance(3 * c().options().heartbeat_interval_ms + 1, {"n1"});
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "was-running", 2u)));
  EXPECT_THAT(Job("was-running").error(), IsEmpty());
}

TEST_F(CoordinatorTest, ANodeThatComesBackAfterARestartKeepsItsJob) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u)));
  MustSubmit(Spec("j2"));  // queued behind it
  Make(CoordinatorOptions{});  // the coordinator restarts on the same store
  EXPECT_EQ(c().queue_depth(), 1u);
  // n1 is unknown to the new coordinator: its heartbeat is refused, it registers again, lists
  // j1 and keeps it.
  kiln::v1::Heartbeat hb;
  hb.add_running_jobs("j1");
  EXPECT_EQ(c().Heartbeat("n1", hb).code(), absl::StatusCode::kFailedPrecondition);
  Register(Node("n1"));
  Advance(5 * c().options().heartbeat_interval_ms, {"n1"});
  EXPECT_THAT(Assigned(), IsEmpty());
  EXPECT_THAT(RunningOn("n1"), ElementsAre("j1"));
  ASSERT_TRUE(Result("n1", "j1").ok());
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(Job("j1").attempts(), 1u);
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j2", 1u)));
}

TEST_F(CoordinatorTest, AResultSentBeforeRegisteringAgainIsAccepted) {
  Register(Node("n1"));
  MustSubmit(Spec("j1"));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "j1", 1u)));
  Make(CoordinatorOptions{});
  ASSERT_TRUE(Result("n1", "j1").ok());
  EXPECT_EQ(Job("j1").state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(Job("j1").png(), std::string("\x89PNG fake", 9));
  // A second copy of it is stale.
  Register(Node("n1"));
  ASSERT_TRUE(Result("n1", "j1").ok());
  EXPECT_EQ(metrics_.stale_results.Value(), 1);
  EXPECT_EQ(metrics_.jobs_succeeded.Value(), 1);
}

TEST_F(CoordinatorTest, AQueuedJobStoredByALostReplyIsAdoptedOnResubmit) {
  Register(Node("n1"));
  Register(Node("n2"));
  JobInfo stored;  // what a Create whose reply was lost left behind
  *stored.mutable_spec() = Spec("lost-reply");
  stored.set_state(kiln::v1::JOB_STATE_QUEUED);
  ASSERT_TRUE(store_.Put(stored).ok());
  auto r = Submit(Spec("lost-reply"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->created());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "lost-reply", 1u)));
}

// A JobStore that fails on demand, as a Redis-backed one may.
class FlakyStore : public JobStore {
 public:
  bool fail_reads = false;
  bool fail_creates = false;
  bool fail_updates = false;
  absl::StatusOr<CreateResult> Create(const JobInfo& job) override {
    if (fail_creates) return absl::UnavailableError("store down");
    return inner_.Create(job);
  }
  absl::StatusOr<JobInfo> Get(const std::string& id) const override {
    if (fail_reads) return absl::UnavailableError("store down");
    return inner_.Get(id);
  }
  absl::Status Put(const JobInfo& job) override { return inner_.Put(job); }
  absl::StatusOr<JobInfo> Update(
      const std::string& id, const std::function<absl::Status(JobInfo&)>& mutate) override {
    if (fail_updates) return absl::UnavailableError("store down");
    return inner_.Update(id, mutate);
  }
  absl::StatusOr<std::vector<JobInfo>> List(kiln::v1::JobState state) const override {
    if (fail_reads) return absl::UnavailableError("store down");
    return inner_.List(state);
  }

 private:
  InMemoryJobStore inner_;
};

TEST_F(CoordinatorTest, SubmitBatchAnswersAsSubmitsInTurn) {
  Register(Node("n1"));
  MustSubmit(Spec("old"));  // takes n1
  Assigned();
  JobSpec changed = Spec("old");
  changed.set_prompt("something else");
  JobSpec bad = Spec("bad");
  bad.set_width(17);
  JobSpec unknown = Spec("unknown");
  unknown.set_model("no-such-model");
  std::vector<kiln::v1::SubmitRequest> requests(7);
  const JobSpec specs[] = {Spec("a"), bad, Spec("old"), changed, unknown, Spec("b"), Spec("a")};
  std::vector<const kiln::v1::SubmitRequest*> pointers;
  for (size_t i = 0; i < requests.size(); ++i) {
    *requests[i].mutable_spec() = specs[i];
    pointers.push_back(&requests[i]);
  }
  auto replies = c().SubmitBatch(pointers);
  ASSERT_EQ(replies.size(), 7u);
  ASSERT_TRUE(replies[0].ok()) << replies[0].status();
  EXPECT_TRUE(replies[0]->created());
  EXPECT_TRUE(replies[0]->final());
  EXPECT_EQ(replies[0]->job().state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(replies[1].status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ErrorField(replies[1].status()), "spec.width");
  ASSERT_TRUE(replies[2].ok());
  EXPECT_FALSE(replies[2]->created());
  EXPECT_EQ(replies[2]->job().state(), kiln::v1::JOB_STATE_RUNNING);
  EXPECT_EQ(replies[3].status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(replies[4].status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(replies[5].ok());
  EXPECT_TRUE(replies[5]->created());
  ASSERT_TRUE(replies[6].ok());  // "a" again in the same batch finds the first
  EXPECT_FALSE(replies[6]->created());
  EXPECT_EQ(c().queue_depth(), 2u);
  EXPECT_EQ(metrics_.submissions_created.Value(), 3);
  EXPECT_EQ(metrics_.submissions_duplicate.Value(), 2);
  EXPECT_EQ(metrics_.submissions_rejected.Value(), 3);
  // n1 frees: the batch's jobs run in submit order.
  ASSERT_TRUE(Result("n1", "old").ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("n1", "a", 1u)));
}

TEST_F(CoordinatorTest, SubmitBatchWithTheStoreDownAcceptsNothing) {
  FlakyStore store;
  auto created = Coordinator::Create(CoordinatorOptions{}, store, clock_, metrics_);
  ASSERT_TRUE(created.ok());
  Coordinator& c = **created;
  kiln::v1::RegisterNode reg;
  *reg.mutable_info() = Node("n1");
  ASSERT_TRUE(c.RegisterNode("n1", reg).ok());
  std::vector<kiln::v1::SubmitRequest> requests(3);
  std::vector<const kiln::v1::SubmitRequest*> pointers;
  for (size_t i = 0; i < requests.size(); ++i) {
    *requests[i].mutable_spec() = Spec(absl::StrCat("j", i));
    pointers.push_back(&requests[i]);
  }
  store.fail_creates = true;
  for (const auto& r : c.SubmitBatch(pointers)) {
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("was not accepted"));
  }
  EXPECT_EQ(c.queue_depth(), 0u);
  for (const auto& out : c.TakeOutgoing()) EXPECT_FALSE(out.envelope.has_assign());
  store.fail_creates = false;
  for (const auto& r : c.SubmitBatch(pointers)) EXPECT_TRUE(r.ok()) << r.status();
}

TEST_F(CoordinatorTest, StoreFailuresAreReportedCountedAndRetried) {
  FlakyStore store;
  store.fail_reads = true;
  EXPECT_EQ(Coordinator::Create(CoordinatorOptions{}, store, clock_, metrics_).status().code(),
            absl::StatusCode::kUnavailable);  // cannot recover the queue
  store.fail_reads = false;
  auto created = Coordinator::Create(CoordinatorOptions{}, store, clock_, metrics_);
  ASSERT_TRUE(created.ok());
  Coordinator& c = **created;
  kiln::v1::RegisterNode reg;
  *reg.mutable_info() = Node("n1");
  ASSERT_TRUE(c.RegisterNode("n1", reg).ok());
  kiln::v1::SubmitRequest submit;
  *submit.mutable_spec() = Spec("j1");

  store.fail_reads = true;
  EXPECT_EQ(c.Submit(submit).status().code(), absl::StatusCode::kUnavailable);
  store.fail_reads = false;
  store.fail_creates = true;
  EXPECT_EQ(c.Submit(submit).status().code(), absl::StatusCode::kUnavailable);
  store.fail_creates = false;
  EXPECT_EQ(metrics_.submissions_rejected.Value(), 2);

  // Accepted, but the assignment cannot be written: the job stays queued and nothing is sent.
  store.fail_updates = true;
  auto reply = c.Submit(submit);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->job().state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(metrics_.store_errors.Value(), 1);
  for (const auto& out : c.TakeOutgoing()) EXPECT_FALSE(out.envelope.has_assign());
  // The store is back: the next event places it.
  store.fail_updates = false;
  ASSERT_TRUE(c.Heartbeat("n1", {}).ok());
  auto outgoing = c.TakeOutgoing();
  ASSERT_EQ(outgoing.size(), 1u);
  EXPECT_EQ(outgoing[0].envelope.assign().spec().job_id(), "j1");

  // Submits while the store is down are refused with a message that says so.
  store.fail_reads = true;
  *submit.mutable_spec() = Spec("j2");
  auto refused = c.Submit(submit);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("was not accepted"));
  store.fail_reads = false;

  // A result the store refuses leaves the job on its node; when the node lets go of it, it is
  // requeued and runs again: its result is applied once.
  store.fail_updates = true;
  kiln::v1::JobResult result;
  result.set_job_id("j1");
  result.set_ok(true);
  result.set_png("png");
  ASSERT_TRUE(c.Result("n1", result).ok());
  store.fail_updates = false;
  EXPECT_EQ(store.Get("j1")->state(), kiln::v1::JOB_STATE_RUNNING);
  for (int i = 0; i < 5; ++i) {
    clock_.AdvanceMs(c.options().heartbeat_interval_ms);
    ASSERT_TRUE(c.Heartbeat("n1", {}).ok());
    c.Tick();
  }
  bool reassigned = false;
  for (const auto& out : c.TakeOutgoing()) {
    reassigned |= out.envelope.has_assign() && out.envelope.assign().spec().job_id() == "j1";
  }
  EXPECT_TRUE(reassigned);
  result.set_attempt(2);
  ASSERT_TRUE(c.Result("n1", result).ok());
  EXPECT_EQ(store.Get("j1")->state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(metrics_.jobs_succeeded.Value(), 1);
}

TEST_F(CoordinatorTest, OptionsAreValidated) {
  CoordinatorOptions o;
  o.heartbeat_interval_ms = 0;
  EXPECT_EQ(ErrorField(o.Validate()), "heartbeat_interval_ms");
  o = {};
  o.max_attempts = 0;
  EXPECT_EQ(ErrorField(o.Validate()), "max_attempts");
  o = {};
  o.max_jobs_per_node = 0;
  EXPECT_EQ(ErrorField(o.Validate()), "max_jobs_per_node");
  auto created = Coordinator::Create(o, store_, clock_, metrics_);
  EXPECT_EQ(created.status().code(), absl::StatusCode::kInvalidArgument);
  o = {};
  o.placement_lookahead = 0;
  EXPECT_EQ(ErrorField(o.Validate()), "placement_lookahead");
  o = {};
  o.costs.learning_rate = 2;
  EXPECT_EQ(ErrorField(o.Validate()), "costs.learning_rate");
  EXPECT_THAT(std::string(o.Validate().message()), StartsWith("costs.learning_rate: "));
}

TEST_F(CoordinatorTest, RoundRobinBaselineTakesTheNextFreeNode) {
  CoordinatorOptions o = LongJobs();
  o.placement = PlacementPolicy::kRoundRobin;
  Make(o);
  for (const char* n : {"a", "b", "c"}) Register(Node(n));
  for (const char* id : {"j1", "j2", "j3", "j4"}) MustSubmit(Spec(id));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a", "j1", 1u),
                                      std::make_tuple("b", "j2", 1u),
                                      std::make_tuple("c", "j3", 1u)));
  ASSERT_TRUE(Result("a", "j1").ok());
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a", "j4", 1u)));  // wraps around
}

TEST_F(CoordinatorTest, LeastBusyBaselineIgnoresCosts) {
  CoordinatorOptions o;
  o.placement = PlacementPolicy::kLeastBusy;
  o.max_jobs_per_node = 2;
  Make(o);
  Register(Node("a"));
  Register(Node("b"));
  for (const char* id : {"k1", "k2", "k3"}) MustSubmit(Spec(id));
  EXPECT_THAT(Assigned(), ElementsAre(std::make_tuple("a", "k1", 1u),
                                      std::make_tuple("b", "k2", 1u),
                                      std::make_tuple("a", "k3", 1u)));
}


// ---- Placement's lazy scan against the reference

// Both coordinators see the same random life of a fleet (nodes of four run-time classes that
// register, change packages, finish and fail jobs, leave and die; jobs of twelve kinds); one
// scans each kind's nodes lazily (the default), the other puts every capable node in the heaps
// at once (placement_full_scan). They must give every job to the same node at every step.
struct Twin {
  // `stored`: jobs in the store before the coordinator starts (it recovers them).
  explicit Twin(CoordinatorOptions options, const std::vector<JobInfo>& stored = {})
      : metrics(registry) {
    for (const JobInfo& job : stored) EXPECT_TRUE(store.Put(job).ok());
    auto made = Coordinator::Create(options, store, clock, metrics, [](const std::string&) {});
    EXPECT_TRUE(made.ok()) << made.status();
    c = std::move(*made);
  }
  // (node, job, attempt) of every AssignJob queued since the last call.
  std::vector<std::tuple<std::string, std::string, uint32_t>> Assigned() {
    std::vector<std::tuple<std::string, std::string, uint32_t>> out;
    for (auto& o : c->TakeOutgoing()) {
      if (o.socket == Outgoing::Socket::kNode && o.envelope.has_assign()) {
        out.emplace_back(o.peer, o.envelope.assign().spec().job_id(),
                         o.envelope.assign().attempt());
      }
    }
    return out;
  }
  FakeClock clock;
  InMemoryJobStore store;
  prometheus::Registry registry;
  CoordinatorMetrics metrics;
  std::unique_ptr<Coordinator> c;
};

// The lazy scan over the placement view kept between passes (updated as nodes register, leave,
// die, drain, are uncordoned, removed, turn unhealthy, and are given or freed of jobs) against
// the reference that builds the view and every heap from scratch in every pass.
TEST(PlacementScanTest, LazyScanPlacesLikeTheFullBuildAfterRandomUpdates) {
  // Busy: the queue is rarely empty. Idle: few submits, so nodes are often free when they are
  // drained, removed or turn unhealthy (what a stale view would give a job to).
  for (const auto& [max_jobs, idle] : {std::pair{1, false}, std::pair{2, false}, std::pair{1, true},
                                       std::pair{2, true}}) {
    SCOPED_TRACE(absl::StrCat("max_jobs_per_node ", max_jobs, idle ? " idle" : " busy"));
    CoordinatorOptions options;
    options.max_jobs_per_node = max_jobs;
    options.placement_lookahead = 64;
    CoordinatorOptions full = options;
    full.placement_full_scan = true;
    Twin lazy(options), ref(full);
    std::mt19937_64 rng(9 + max_jobs + (idle ? 100 : 0));
    auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
    const std::vector<std::string> models = {"m1", "m2"};
    const std::vector<std::string> precisions = {"bf16", "fp8", "fp32"};
    const std::vector<uint32_t> sizes = {256, 512};
    struct Device {
      std::string kind, name, mig;
      uint32_t sms;
      uint32_t gpus = 0;  // DeviceInfo.gpu_count: multi-GPU nodes rank throughput jobs by GPUs
    };
    const std::vector<Device> devices = {{"cuda", "NVIDIA H100", "", 132},
                                         {"cuda", "NVIDIA H200", "", 132},
                                         {"cuda", "NVIDIA H100", "3g.40gb", 60},
                                         {"cpu", "", "", 0},
                                         {"cuda", "NVIDIA H200", "", 132, 4},
                                         {"cuda", "NVIDIA H100", "", 132, 2}};
    auto digest = [](const std::string& m, const std::string& p, uint32_t size, int part) {
      return absl::StrCat(m, "-", p, "-", size, "-", part);
    };
    // A node's packages, changed by heartbeats.
    auto random_packages = [&](kiln::v1::Heartbeat& hb) {
      for (const auto& m : models) {
        for (const auto& p : precisions) {
          for (uint32_t size : sizes) {
            for (int part = 0; part < 2; ++part) {
              const int r = static_cast<int>(pick(6));
              if (r == 0) hb.add_loaded_packages(digest(m, p, size, part));
              if (r <= 1) hb.add_packages(digest(m, p, size, part));
            }
          }
        }
      }
    };
    auto random_node = [&](const std::string& id) {
      NodeInfo info;
      info.set_node_id(id);
      const Device& d = devices[pick(devices.size())];
      info.mutable_device()->set_kind(d.kind);
      info.mutable_device()->set_name(d.name);
      info.mutable_device()->set_mig_profile(d.mig);
      info.mutable_device()->set_sm_count(d.sms);
      info.mutable_device()->set_gpu_count(d.gpus);
      if (d.kind == "cuda") info.mutable_device()->set_compute_capability("9.0");
      info.set_can_compile(pick(4) != 0);
      for (const auto& m : models) {
        if (pick(5) == 0) continue;
        info.add_models(m);
        if (pick(3) == 0) continue;  // declares nothing: serves every kind of m, cold
        for (const auto& p : precisions) {
          for (uint32_t size : sizes) {
            if (pick(3) == 0) continue;
            auto& set = (*info.mutable_package_sets())[PackageSetKey(m, p, size, size)];
            set.add_digests(digest(m, p, size, 0));
            set.add_digests(digest(m, p, size, 1));
          }
        }
      }
      kiln::v1::Heartbeat hb;
      random_packages(hb);
      *info.mutable_loaded_packages() = hb.loaded_packages();
      *info.mutable_packages() = hb.packages();
      return info;
    };
    std::map<std::string, std::pair<std::string, uint32_t>> running;  // job → (node, attempt)
    int next_job = 0;
    size_t assigned = 0;
    for (int step = 0; step < 4000; ++step) {
      const std::string node_id = absl::StrCat("n", pick(40));
      const size_t what = pick(112);
      auto both = [&](auto&& f) {
        const absl::Status a = f(*lazy.c);
        const absl::Status b = f(*ref.c);
        EXPECT_EQ(a.code(), b.code()) << step;
      };
      if (what < 8) {
        kiln::v1::RegisterNode m;
        *m.mutable_info() = random_node(node_id);
        both([&](Coordinator& c) { return c.RegisterNode(node_id, m).status(); });
      } else if (what < 10) {
        both([&](Coordinator& c) { return c.Deregister(node_id, kiln::v1::Deregister()); });
      } else if (what >= 100 && what < 103) {
        kiln::v1::DrainRequest req;
        req.set_node_id(node_id);
        both([&](Coordinator& c) { return c.Drain(req).status(); });
      } else if (what >= 103 && what < 106) {
        kiln::v1::UncordonRequest req;
        req.set_node_id(node_id);
        both([&](Coordinator& c) { return c.Uncordon(req).status(); });
      } else if (what >= 106 && what < 108) {
        kiln::v1::RemoveNodeRequest req;
        req.set_node_id(node_id);
        req.set_force(pick(2) == 0);
        both([&](Coordinator& c) { return c.RemoveNode(req).status(); });
      } else if (what >= 108 && what < 110) {
        // Its disk turns bad or good again; it keeps reporting every job it runs.
        kiln::v1::Heartbeat hb;
        for (const auto& [job, where] : running) {
          if (where.first == node_id) hb.add_running_jobs(job);
        }
        if (pick(2) == 0) hb.set_unhealthy("package directory is full");
        both([&](Coordinator& c) { return c.Heartbeat(node_id, hb); });
      } else if (what >= 110) {
        // Cancel a running job (its slot stays taken until the node reports) or a queued one.
        kiln::v1::CancelRequest req;
        if (!running.empty() && pick(2) == 0) {
          auto it = std::next(running.begin(), static_cast<long>(pick(running.size())));
          req.set_job_id(it->first);
        } else {
          req.set_job_id(absl::StrCat("j", pick(static_cast<size_t>(next_job) + 1)));
        }
        both([&](Coordinator& c) { return c.Cancel(req).status(); });
      } else if (what < 30) {
        kiln::v1::Heartbeat hb;
        for (const auto& [job, where] : running) {
          if (where.first == node_id && pick(20) != 0) hb.add_running_jobs(job);
        }
        if (pick(3) == 0) random_packages(hb);
        both([&](Coordinator& c) { return c.Heartbeat(node_id, hb); });
      } else if (what < 60 && !running.empty()) {
        auto it = std::next(running.begin(), static_cast<long>(pick(running.size())));
        kiln::v1::JobResult r;
        if (pick(8) == 0) {
          r.set_job_id(it->first);
          r.set_ok(false);
          r.set_error_code("INTERNAL");
          r.set_error("it broke");
        } else {
          static const char* kWhere[] = {"resident", "local", "shared", "compiled"};
          r = Finished(it->first, 1 + static_cast<double>(pick(300)) / 10,
                       static_cast<double>(pick(200)) / 10, kWhere[pick(4)]);
        }
        r.set_attempt(it->second.second);
        const std::string on = it->second.first;
        both([&](Coordinator& c) { return c.Result(on, r); });
        running.erase(it);
      } else if (what < 90 && (!idle || pick(6) == 0)) {
        JobSpec spec;
        spec.set_job_id(absl::StrCat("j", next_job++));
        spec.set_model(models[pick(models.size())]);
        spec.set_prompt("a lighthouse");
        const uint32_t size = sizes[pick(sizes.size())];
        spec.set_width(size);
        spec.set_height(size);
        spec.set_steps(1 + static_cast<uint32_t>(pick(30)));
        spec.set_seed(1);
        const size_t p = pick(precisions.size() + 1);
        if (p < precisions.size()) spec.set_precision(precisions[p]);
        spec.set_priority(static_cast<int32_t>(pick(3)));
        kiln::v1::SubmitRequest req;
        *req.mutable_spec() = spec;
        both([&](Coordinator& c) { return c.Submit(req).status(); });
      } else {
        if (idle) {
          // Most nodes keep beating (listing what they run), so many stay READY while time
          // passes; the others die.
          for (int n = 0; n < 40; ++n) {
            if (pick(8) == 0) continue;
            const std::string id = absl::StrCat("n", n);
            kiln::v1::Heartbeat hb;
            for (const auto& [job, where] : running) {
              if (where.first == id) hb.add_running_jobs(job);
            }
            both([&](Coordinator& c) {
              const absl::Status s = c.Heartbeat(id, hb);
              return s.code() == absl::StatusCode::kFailedPrecondition ? absl::OkStatus() : s;
            });
          }
        }
        const int64_t ms = static_cast<int64_t>(pick(2500));
        lazy.clock.AdvanceMs(ms);
        ref.clock.AdvanceMs(ms);
        lazy.c->Tick();
        ref.c->Tick();
      }
      const auto a = lazy.Assigned();
      const auto b = ref.Assigned();
      ASSERT_EQ(a, b) << "step " << step;
      ASSERT_EQ(lazy.c->queue_depth(), ref.c->queue_depth()) << "step " << step;
      for (const auto& [node, job, attempt] : a) running[job] = {node, attempt};
      assigned += a.size();
    }
    EXPECT_GT(assigned, idle ? 200u : 500u);  // the twins did place jobs
  }
}

// Jobs recovered as RUNNING after a restart have no expected end: placement estimates it from
// the cost model as it is at each pass (it learns while they run), so their nodes are re-read
// every pass. The incremental view must follow that as the reference does.
TEST(PlacementScanTest, RecoveredRunningJobsPlaceLikeTheFullBuild) {
  for (int max_jobs : {1, 2}) {
    SCOPED_TRACE(absl::StrCat("max_jobs_per_node ", max_jobs));
    auto spec = [](const std::string& id, uint32_t size, uint32_t steps) {
      JobSpec s;
      s.set_job_id(id);
      s.set_model(kModel);
      s.set_prompt("a lighthouse");
      s.set_width(size);
      s.set_height(size);
      s.set_steps(steps);
      s.set_seed(1);
      s.set_precision("bf16");
      return s;
    };
    std::vector<JobInfo> stored;
    std::map<std::string, std::pair<std::string, uint32_t>> running;  // job → (node, attempt)
    for (int i = 0; i < 10; ++i) {
      JobInfo job;
      *job.mutable_spec() = spec(absl::StrCat("r", i), i % 2 ? 512 : 256, 5 + 3 * i);
      job.set_state(kiln::v1::JOB_STATE_RUNNING);
      job.set_node_id(absl::StrCat("n", i));
      job.set_attempts(1);
      stored.push_back(job);
      running[job.spec().job_id()] = {job.node_id(), 1};
    }
    for (int i = 0; i < 30; ++i) {
      JobInfo job;
      *job.mutable_spec() = spec(absl::StrCat("q", i), i % 3 ? 512 : 256, 1 + i % 20);
      job.set_state(kiln::v1::JOB_STATE_QUEUED);
      stored.push_back(job);
    }
    CoordinatorOptions options;
    options.max_jobs_per_node = max_jobs;
    CoordinatorOptions full = options;
    full.placement_full_scan = true;
    Twin lazy(options, stored), ref(full, stored);
    std::mt19937_64 rng(77 + max_jobs);
    auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
    auto both = [&](auto&& f) {
      const absl::Status a = f(*lazy.c);
      const absl::Status b = f(*ref.c);
      EXPECT_EQ(a.code(), b.code());
    };
    auto heartbeat = [&](const std::string& id) {
      kiln::v1::Heartbeat hb;
      for (const auto& [job, where] : running) {
        if (where.first == id) hb.add_running_jobs(job);
      }
      both([&](Coordinator& c) { return c.Heartbeat(id, hb); });
    };
    size_t assigned = 0;
    auto compare = [&](int step) {
      const auto a = lazy.Assigned();
      const auto b = ref.Assigned();
      EXPECT_EQ(a, b) << "step " << step;
      EXPECT_EQ(lazy.c->queue_depth(), ref.c->queue_depth()) << "step " << step;
      for (const auto& [node, job, attempt] : a) running[job] = {node, attempt};
      assigned += a.size();
      return a == b;
    };
    // The nodes come back (the first ten claim their jobs), two device classes.
    for (int i = 0; i < 16; ++i) {
      const std::string id = absl::StrCat("n", i);
      kiln::v1::RegisterNode m;
      *m.mutable_info() =
          i % 2 ? Gpu(id, "NVIDIA H100", 132) : Gpu(id, "NVIDIA H100", 60, "3g.40gb");
      m.mutable_info()->clear_package_sets();
      both([&](Coordinator& c) { return c.RegisterNode(id, m).status(); });
      heartbeat(id);
      ASSERT_TRUE(compare(-1));
    }
    int next = 0;
    for (int step = 0; step < 1500; ++step) {
      const size_t what = pick(10);
      if (what < 4 && !running.empty()) {
        // A result, recovered jobs first: each teaches the cost model, which moves the
        // estimated end of the recovered jobs still running.
        auto it = running.begin();
        if (pick(2) == 0) std::advance(it, static_cast<long>(pick(running.size())));
        static const char* kWhere[] = {"resident", "local", "shared", "compiled"};
        kiln::v1::JobResult r = Finished(it->first, 1 + static_cast<double>(pick(300)) / 10,
                                         static_cast<double>(pick(100)) / 10, kWhere[pick(4)]);
        r.set_attempt(it->second.second);
        const std::string on = it->second.first;
        both([&](Coordinator& c) { return c.Result(on, r); });
        running.erase(it);
      } else if (what < 7) {
        kiln::v1::SubmitRequest req;
        *req.mutable_spec() = spec(absl::StrCat("s", next++), pick(2) ? 512 : 256,
                                   1 + static_cast<uint32_t>(pick(30)));
        both([&](Coordinator& c) { return c.Submit(req).status(); });
      } else {
        const int64_t ms = static_cast<int64_t>(pick(1500));
        lazy.clock.AdvanceMs(ms);
        ref.clock.AdvanceMs(ms);
        for (int i = 0; i < 16; ++i) heartbeat(absl::StrCat("n", i));
        lazy.c->Tick();
        ref.c->Tick();
      }
      ASSERT_TRUE(compare(step));
    }
    EXPECT_GT(assigned, 300u);
  }
}

}  // namespace
}  // namespace kiln::coordinator
