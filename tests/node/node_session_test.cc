// NodeSession without sockets: a recording CoordinatorChannel, a FakeClock, a real or fake
// JobRunner, a LocalDiskStore over a temp directory. Registration contents, a job's progress and
// result, rejections, protocol errors answered and counted, re-registration when the coordinator
// forgets the node or refuses it, silence → reconnect with backoff, results held across a
// reconnect and sent before heartbeats, a full send queue, cancel, graceful drain and its timeout.
#include "node/node_session.h"

#include <chrono>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <thread>

#include "absl/synchronization/notification.h"
#include "cache/local_disk_store.h"
#include "common/files.h"
#include "common/wire.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "node/worker.h"
#include "tests/node/node_test_support.h"

namespace kiln::node {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using Body = kiln::v1::Envelope::BodyCase;

// Records what the session sends; `accept` = false plays a full send queue.
class FakeChannel : public CoordinatorChannel {
 public:
  void Connect(const std::string& endpoint) override {
    ++connects;
    connected = true;
    endpoints.push_back(endpoint);
  }
  void Disconnect() override {
    ++disconnects;
    connected = false;
  }
  bool Send(const kiln::v1::Envelope& env) override {
    if (!connected || !accept) return false;
    sent.push_back(env);
    return true;
  }

  // Removes and returns the sent messages with body `body`.
  std::vector<kiln::v1::Envelope> Take(Body body) {
    std::vector<kiln::v1::Envelope> out;
    for (auto it = sent.begin(); it != sent.end();) {
      if (it->body_case() == body) {
        out.push_back(*it);
        it = sent.erase(it);
      } else {
        ++it;
      }
    }
    return out;
  }
  std::vector<Body> Bodies() const {
    std::vector<Body> out;
    for (const auto& e : sent) out.push_back(e.body_case());
    return out;
  }

  int connects = 0;

  std::vector<std::string> endpoints;  // each Connect's, in order
  int disconnects = 0;
  bool connected = false;
  bool accept = true;
  std::deque<kiln::v1::Envelope> sent;
};

// A JobRunner that only records; the test finishes jobs by pushing to the outbox as the worker
// would (result queued before the runner turns idle).
class FakeRunner : public JobRunner {
 public:
  explicit FakeRunner(Outbox& outbox) : outbox_(outbox) {}
  bool Enqueue(Job job) override {
    for (const auto& j : queued) {
      if (j.spec.job_id() == job.spec.job_id()) return false;
    }
    if (running == job.spec.job_id()) return false;
    queued.push_back(std::move(job));
    return true;
  }
  CancelOutcome Cancel(const std::string& job_id) override {
    cancels.push_back(job_id);
    if (running == job_id) return CancelOutcome::kStopping;
    for (auto it = queued.begin(); it != queued.end(); ++it) {
      if (it->spec.job_id() == job_id) {
        queued.erase(it);
        return CancelOutcome::kDequeued;
      }
    }
    return CancelOutcome::kNotFound;
  }
  std::vector<Job> TakeQueued() override {
    std::vector<Job> out(queued.begin(), queued.end());
    queued.clear();
    return out;
  }
  std::vector<std::string> ActiveJobIds() const override {
    std::vector<std::string> out;
    if (!running.empty()) out.push_back(running);
    for (const auto& j : queued) out.push_back(j.spec.job_id());
    return out;
  }
  std::vector<std::string> LoadedPackages() const override { return loaded; }
  bool idle() const override { return running.empty() && queued.empty(); }

  // Starts the oldest queued job.
  void StartNext() {
    ASSERT_FALSE(queued.empty());
    running = queued.front().spec.job_id();
    queued.pop_front();
  }
  // Ends the running job with a successful result.
  void FinishRunning() {
    kiln::v1::Envelope env;
    env.mutable_result()->set_job_id(running);
    env.mutable_result()->set_ok(true);
    outbox_.Push(env);
    running.clear();
  }

  std::deque<Job> queued;
  std::string running;
  std::vector<std::string> loaded;
  std::vector<std::string> cancels;

 private:
  Outbox& outbox_;
};

kiln::v1::Envelope Ack(uint32_t interval_ms = 100) {
  kiln::v1::Envelope ack;
  ack.mutable_register_ack()->set_heartbeat_interval_ms(interval_ms);
  return ack;
}

kiln::v1::Envelope Assign(const std::string& id, int steps, const std::string& model = "tiny") {
  kiln::v1::Envelope env;
  auto* spec = env.mutable_assign()->mutable_spec();
  spec->set_job_id(id);
  spec->set_model(model);
  spec->set_prompt("p");
  spec->set_width(64);
  spec->set_height(32);
  spec->set_steps(steps);
  env.mutable_assign()->set_attempt(1);
  return env;
}

// The value of counter `name`; with `outcome`, of its series with that outcome label. -1: none.
double CounterValue(prometheus::Registry& registry, const std::string& name,
                    const std::string& outcome = "") {
  for (const auto& f : registry.Collect()) {
    if (f.name != name) continue;
    for (const auto& m : f.metric) {
      if (outcome.empty()) return m.counter.value;
      for (const auto& l : m.label) {
        if (l.name == "outcome" && l.value == outcome) return m.counter.value;
      }
    }
  }
  return -1;
}

class NodeSessionTest : public ::testing::Test {
 protected:
  NodeSessionTest()
      : outbox_(*Outbox::Create()),
        package_root_(::testing::TempDir() + "/node_session_test_packages"),
        packages_(package_root_) {
    options_.node_id = "node-x";
    options_.coordinator = "tcp://127.0.0.1:1";
    options_.resolutions = {{64, 32}};
    options_.package_dir = package_root_;
    options_.metrics_url = "http://127.0.0.1:1/metrics";
    options_.hostname = "host-x";
    options_.link.heartbeat_interval_ms = 100;
    options_.drain_timeout_ms = 1000;
    options_.device_info.set_kind("cpu");
    options_.device_info.set_name("test cpu");
    (void)kiln::RemoveTree(package_root_);
    catalog_ = std::make_unique<ModelCatalog>("fp32", options_.resolutions);
    auto gen = std::make_unique<testing::FakeGenerator>();
    gen_ = gen.get();
    catalog_->Add("tiny", "fp32", std::move(gen));
    metrics_ = std::make_unique<NodeMetrics>(registry_, options_.node_id, options_.device,
                                             options_.device_info);
  }
  ~NodeSessionTest() override {
    if (worker_) worker_->Shutdown(/*cancel_running=*/true);
  }

  // A session over the real Worker (running the fake generator on its thread).
  void StartWithWorker() {
    worker_ = std::make_unique<Worker>(*catalog_, *outbox_, *metrics_, clock_);
    worker_->Start();
    MakeSession(*worker_);
  }
  // A session over FakeRunner (the test decides when jobs start and end).
  void StartWithFakeRunner() {
    runner_ = std::make_unique<FakeRunner>(*outbox_);
    MakeSession(*runner_);
  }
  void MakeSession(JobRunner& jobs) {
    session_ = std::make_unique<NodeSession>(options_, *catalog_, jobs, *outbox_, &packages_,
                                             *metrics_, clock_, channel_);
  }

  // Ticks (letting the worker thread run) until `done`, or fails after 10 s of real time.
  template <typename Pred>
  bool TickUntil(Pred done) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      session_->Tick();
      if (done()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return false;
  }
  // Connects and registers (RegisterNode taken, RegisterAck given).
  void Register() {
    session_->Tick();
    ASSERT_EQ(channel_.Take(Body::kRegisterNode).size(), 1u);
    session_->OnMessage(Ack());
    ASSERT_TRUE(session_->link().registered());
  }
  std::optional<kiln::v1::JobResult> ResultOf(const std::string& id) {
    for (const auto& e : channel_.Take(Body::kResult)) {
      if (e.result().job_id() == id) return e.result();
    }
    return std::nullopt;
  }

  prometheus::Registry registry_;
  FakeClock clock_;
  NodeOptions options_;
  std::unique_ptr<ModelCatalog> catalog_;
  testing::FakeGenerator* gen_ = nullptr;
  std::unique_ptr<NodeMetrics> metrics_;
  std::unique_ptr<Outbox> outbox_;
  std::string package_root_;
  cache::LocalDiskStore packages_;
  FakeChannel channel_;
  std::unique_ptr<Worker> worker_;
  std::unique_ptr<FakeRunner> runner_;
  std::unique_ptr<NodeSession> session_;
};

TEST_F(NodeSessionTest, RegistersRunsJobsAndStopsGracefully) {
  // Two packages on the local disk; staging and quarantine entries are not packages.
  const std::string a(64, 'a'), b(64, 'b');
  for (const auto& d : {b, a, std::string(".tmp-aaaaaaaaaaaa-1"), std::string("quarantine")}) {
    std::filesystem::create_directories(package_root_ + "/" + d);
  }
  StartWithWorker();
  session_->Tick();
  EXPECT_EQ(channel_.connects, 1);
  auto regs = channel_.Take(Body::kRegisterNode);
  ASSERT_EQ(regs.size(), 1u);
  const auto& info = regs[0].register_node().info();
  EXPECT_EQ(info.node_id(), "node-x");
  EXPECT_EQ(info.device().name(), "test cpu");
  EXPECT_THAT(info.models(), ElementsAre("tiny"));
  EXPECT_TRUE(info.can_compile());
  EXPECT_EQ(info.metrics_url(), "http://127.0.0.1:1/metrics");
  EXPECT_GT(info.pid(), 0u);
  EXPECT_EQ(info.hostname(), "host-x");
  EXPECT_EQ(info.job_slots(), 2u);  // the running job and one prefetched (NodeOptions default)
  EXPECT_THAT(info.packages(), ElementsAre(a, b));
  ASSERT_EQ(info.package_sets().count("tiny/fp32/64x32"), 1u);
  EXPECT_THAT(info.package_sets().at("tiny/fp32/64x32").digests(),
              ElementsAre("m-te-64x32", "m-dit-64x32"));
  EXPECT_FALSE(session_->registered_once());
  session_->OnMessage(Ack());
  EXPECT_TRUE(session_->registered_once());
  session_->Tick();
  EXPECT_THAT(channel_.Take(Body::kHeartbeat), IsEmpty());  // not due yet
  clock_.AdvanceMs(100);
  session_->Tick();
  auto hbs = channel_.Take(Body::kHeartbeat);
  ASSERT_EQ(hbs.size(), 1u);
  EXPECT_THAT(hbs[0].heartbeat().packages(), ElementsAre(a, b));

  session_->OnMessage(Assign("j1", 3));
  std::optional<kiln::v1::JobResult> r;
  ASSERT_TRUE(TickUntil([&] { return (r = ResultOf("j1")).has_value(); }));
  int denoising = 0;
  bool decoding = false;
  for (const auto& e : channel_.Take(Body::kProgress)) {
    if (e.progress().phase() == "denoising") ++denoising;
    if (e.progress().phase() == "decoding") decoding = true;
  }
  EXPECT_EQ(denoising, 4);  // steps 0..3
  EXPECT_TRUE(decoding);
  EXPECT_TRUE(r->ok()) << r->error();
  EXPECT_EQ(r->png().substr(1, 3), "PNG");

  session_->OnMessage(Assign("j2", 2, "nope"));
  r = ResultOf("j2");  // answered at once, without running
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error_code(), "INVALID_ARGUMENT");
  EXPECT_THAT(r->error(), HasSubstr("spec.model"));

  // A heartbeat after the job reports what is loaded.
  clock_.AdvanceMs(100);
  session_->Tick();
  hbs = channel_.Take(Body::kHeartbeat);
  ASSERT_EQ(hbs.size(), 1u);
  EXPECT_EQ(hbs[0].heartbeat().loaded_packages_size(), 1);
  EXPECT_THAT(hbs[0].heartbeat().running_jobs(), IsEmpty());

  session_->Drain();
  session_->Tick();
  EXPECT_EQ(channel_.Take(Body::kDeregister).size(), 1u);
  EXPECT_TRUE(session_->finished());
  EXPECT_TRUE(session_->deregistered());
}

TEST_F(NodeSessionTest, APrefetchedJobIsEncodedWhileOneRunsAndCanBeCancelledOrDrained) {
  options_.job_slots = 3;
  absl::Notification started, release;
  gen_->on_step = [&](int step) {
    if (step == 1 && !started.HasBeenNotified()) {
      started.Notify();
      release.WaitForNotification();
    }
  };
  StartWithWorker();
  session_->Tick();
  auto regs = channel_.Take(Body::kRegisterNode);
  ASSERT_EQ(regs.size(), 1u);
  EXPECT_EQ(regs[0].register_node().info().job_slots(), 3u);
  session_->OnMessage(Ack());

  session_->OnMessage(Assign("j1", 2));
  started.WaitForNotification();
  // A second job while j1 runs: taken, encoded beside j1's denoise, and listed as ours.
  session_->OnMessage(Assign("j2", 2));
  ASSERT_TRUE(TickUntil([&] { return worker_->PrefetchedJobIds() == std::vector<std::string>{"j2"}; }));
  session_->OnMessage(Assign("j3", 2));
  clock_.AdvanceMs(100);
  session_->Tick();
  auto hbs = channel_.Take(Body::kHeartbeat);
  ASSERT_EQ(hbs.size(), 1u);
  EXPECT_THAT(hbs[0].heartbeat().running_jobs(), ElementsAre("j1", "j2", "j3"));
  bool j2_encoded = false;
  for (const auto& e : channel_.Take(Body::kProgress)) {
    if (e.progress().job_id() == "j2" && e.progress().phase() == "text_encoding") j2_encoded = true;
  }
  EXPECT_TRUE(j2_encoded);

  // Cancelling the prefetched job answers it at once; j3 then moves up into the prefetch slot.
  kiln::v1::Envelope cancel;
  cancel.mutable_cancel_job()->set_job_id("j2");
  session_->OnMessage(cancel);
  std::optional<kiln::v1::JobResult> r2;
  ASSERT_TRUE(TickUntil([&] { return (r2 = ResultOf("j2")).has_value(); }));
  EXPECT_EQ(r2->error_code(), "CANCELLED");
  EXPECT_THAT(r2->error(), HasSubstr("before it started"));
  ASSERT_TRUE(TickUntil([&] { return worker_->PrefetchedJobIds() == std::vector<std::string>{"j3"}; }));

  // A drain lets the running job finish and hands back at once the prefetched one and the one
  // queued, after a heartbeat that says the node takes no more jobs and still lists both.
  session_->OnMessage(Assign("j4", 2));
  channel_.sent.clear();
  session_->Drain();
  std::vector<Body> order;
  for (Body b : channel_.Bodies()) {
    if (b != Body::kProgress) order.push_back(b);
  }
  EXPECT_THAT(order, ElementsAre(Body::kHeartbeat, Body::kResult, Body::kResult));
  auto handed_back = channel_.Take(Body::kResult);
  ASSERT_EQ(handed_back.size(), 2u);
  EXPECT_EQ(handed_back[0].result().job_id(), "j3");
  EXPECT_EQ(handed_back[1].result().job_id(), "j4");
  for (const auto& e : handed_back) {
    EXPECT_EQ(e.result().error_code(), "UNAVAILABLE");
    EXPECT_EQ(e.result().error(), "node is shutting down");
  }
  hbs = channel_.Take(Body::kHeartbeat);
  ASSERT_EQ(hbs.size(), 1u);
  EXPECT_EQ(hbs[0].heartbeat().unhealthy(), "node is shutting down");
  EXPECT_THAT(hbs[0].heartbeat().running_jobs(), ElementsAre("j1", "j3", "j4"));
  EXPECT_THAT(worker_->PrefetchedJobIds(), IsEmpty());
  release.Notify();
  std::optional<kiln::v1::JobResult> r1;
  ASSERT_TRUE(TickUntil([&] { return (r1 = ResultOf("j1")).has_value(); }));
  EXPECT_TRUE(r1->ok()) << r1->error();
  ASSERT_TRUE(TickUntil([&] { return session_->finished(); }));
  EXPECT_THAT(channel_.Take(Body::kResult), IsEmpty());  // j3 never ran
  EXPECT_EQ(gen_->calls, 1);
  EXPECT_EQ(channel_.Take(Body::kDeregister).size(), 1u);
}

TEST_F(NodeSessionTest, ProtocolErrorsAreAnsweredCountedAndSurvived) {
  StartWithWorker();
  Register();
  session_->OnBadFrame(absl::InvalidArgumentError("not an Envelope"));
  auto errs = channel_.Take(Body::kError);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_EQ(errs[0].error().code(), "INVALID_ARGUMENT");
  kiln::v1::Envelope status;
  status.set_request_id("r-7");
  status.mutable_status()->set_job_id("x");
  session_->OnMessage(status);
  errs = channel_.Take(Body::kError);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_EQ(errs[0].request_id(), "r-7");
  EXPECT_THAT(errs[0].error().message(), HasSubstr("unexpected message 'status'"));
  // An ErrorReply from the coordinator is logged, never answered.
  session_->OnMessage(ErrorEnvelope(absl::InvalidArgumentError("whatever"), ""));
  session_->Tick();
  EXPECT_THAT(channel_.Take(Body::kError), IsEmpty());
  EXPECT_TRUE(session_->link().registered());

  session_->OnMessage(Assign("after", 1));
  std::optional<kiln::v1::JobResult> r;
  ASSERT_TRUE(TickUntil([&] { return (r = ResultOf("after")).has_value(); }));
  EXPECT_TRUE(r->ok());
  EXPECT_EQ(CounterValue(registry_, "kiln_protocol_errors_total"), 2);
}

TEST_F(NodeSessionTest, RegistersAgainWhenTheCoordinatorForgotIt) {
  StartWithFakeRunner();
  Register();
  clock_.AdvanceMs(100);
  session_->Tick();
  ASSERT_EQ(channel_.Take(Body::kHeartbeat).size(), 1u);
  session_->OnMessage(ErrorEnvelope(
      absl::FailedPreconditionError("node node-x is not registered; send RegisterNode"), ""));
  EXPECT_EQ(channel_.Take(Body::kRegisterNode).size(), 1u);  // on the same connection
  EXPECT_EQ(channel_.connects, 1);
  EXPECT_FALSE(session_->link().registered());
  session_->OnMessage(Ack());
  clock_.AdvanceMs(100);
  session_->Tick();
  EXPECT_EQ(channel_.Take(Body::kHeartbeat).size(), 1u);
}

TEST_F(NodeSessionTest, RefusedRegistrationReconnectsAfterBackoff) {
  StartWithFakeRunner();
  session_->Tick();
  ASSERT_EQ(channel_.Take(Body::kRegisterNode).size(), 1u);
  session_->OnMessage(ErrorEnvelope(absl::ResourceExhaustedError("node table full"), ""));
  EXPECT_EQ(channel_.disconnects, 1);
  EXPECT_THAT(channel_.Take(Body::kError), IsEmpty());  // never answered
  clock_.AdvanceMs(99);
  session_->Tick();
  EXPECT_EQ(channel_.connects, 1);
  clock_.AdvanceMs(1);
  session_->Tick();
  EXPECT_EQ(channel_.connects, 2);
  EXPECT_EQ(channel_.Take(Body::kRegisterNode).size(), 1u);
}

TEST_F(NodeSessionTest, SilenceMeansReconnectWithDoublingBackoff) {
  StartWithFakeRunner();
  Register();
  // Heartbeats go out, nothing comes back: dead after 3 intervals.
  for (int i = 0; i < 2; ++i) {
    clock_.AdvanceMs(100);
    session_->Tick();
  }
  EXPECT_EQ(channel_.disconnects, 0);
  clock_.AdvanceMs(100);
  session_->Tick();
  EXPECT_EQ(channel_.disconnects, 1);
  EXPECT_EQ(CounterValue(registry_, "kiln_node_reconnects_total"), 1);
  EXPECT_EQ(session_->MsUntilNextEvent(), 100);
  clock_.AdvanceMs(100);
  session_->Tick();
  EXPECT_EQ(channel_.connects, 2);
  // No answer to this registration either: dead after 3 intervals, next backoff 200 ms.
  clock_.AdvanceMs(300);
  session_->Tick();
  EXPECT_EQ(channel_.disconnects, 2);
  EXPECT_EQ(session_->MsUntilNextEvent(), 200);
  EXPECT_EQ(CounterValue(registry_, "kiln_node_reconnects_total"), 2);
}

TEST_F(NodeSessionTest, SilenceMovesOnToTheNextCoordinatorEndpoint) {
  options_.coordinator = "tcp://10.0.0.1:5556, tcp://10.0.0.2:5556";
  StartWithFakeRunner();
  Register();  // with the first
  ASSERT_EQ(channel_.endpoints, (std::vector<std::string>{"tcp://10.0.0.1:5556"}));
  // The active one dies: silent for 3 intervals, then the standby's endpoint, quickly.
  clock_.AdvanceMs(300);
  session_->Tick();
  EXPECT_EQ(channel_.disconnects, 1);
  EXPECT_EQ(session_->MsUntilNextEvent(), 100);
  clock_.AdvanceMs(100);
  session_->Tick();
  EXPECT_EQ(channel_.endpoints.back(), "tcp://10.0.0.2:5556");
  ASSERT_EQ(channel_.Take(Body::kRegisterNode).size(), 1u);
  // The standby does not lead yet (binds nothing, so no answer): back to the first.
  clock_.AdvanceMs(300);
  session_->Tick();
  EXPECT_EQ(channel_.disconnects, 2);
  EXPECT_EQ(session_->MsUntilNextEvent(), 100);
  clock_.AdvanceMs(100);
  session_->Tick();
  EXPECT_EQ(channel_.endpoints.back(), "tcp://10.0.0.1:5556");
  // Still silent: a full round without a registration doubles the delay.
  clock_.AdvanceMs(300);
  session_->Tick();
  EXPECT_EQ(session_->MsUntilNextEvent(), 100);
  clock_.AdvanceMs(100);
  session_->Tick();
  EXPECT_EQ(channel_.endpoints.back(), "tcp://10.0.0.2:5556");
  clock_.AdvanceMs(300);
  session_->Tick();
  EXPECT_EQ(session_->MsUntilNextEvent(), 200);
  clock_.AdvanceMs(200);
  session_->Tick();
  EXPECT_EQ(channel_.endpoints.back(), "tcp://10.0.0.1:5556");
  clock_.AdvanceMs(300);
  session_->Tick();
  clock_.AdvanceMs(100);
  session_->Tick();
  EXPECT_EQ(channel_.endpoints.back(), "tcp://10.0.0.2:5556");
  // Now it leads and answers: registered there, heartbeats follow.
  channel_.Take(Body::kRegisterNode);
  session_->OnMessage(Ack());
  EXPECT_TRUE(session_->link().registered());
  EXPECT_EQ(session_->link().endpoint(), "tcp://10.0.0.2:5556");
  EXPECT_EQ(channel_.connects, 6);
}

TEST_F(NodeSessionTest, ResultsWaitForARegisteredCoordinatorAndPrecedeHeartbeats) {
  StartWithFakeRunner();
  Register();
  session_->OnMessage(Assign("j1", 2));
  runner_->StartNext();
  // The coordinator goes silent; the job finishes while the node is disconnected.
  clock_.AdvanceMs(300);
  session_->Tick();
  ASSERT_EQ(channel_.disconnects, 1);
  runner_->FinishRunning();
  session_->Tick();
  EXPECT_EQ(session_->held_results(), 1u);
  // Back: the result goes out once registered, not before.
  clock_.AdvanceMs(100);
  session_->Tick();
  ASSERT_EQ(channel_.connects, 2);
  EXPECT_FALSE(ResultOf("j1"));
  channel_.sent.clear();
  session_->OnMessage(Ack());
  EXPECT_TRUE(ResultOf("j1"));
  EXPECT_EQ(session_->held_results(), 0u);

  // A result finished just before a heartbeat goes out ahead of it.
  session_->OnMessage(Assign("j2", 2));
  runner_->StartNext();
  clock_.AdvanceMs(100);
  runner_->FinishRunning();
  channel_.sent.clear();
  session_->Tick();
  EXPECT_THAT(channel_.Bodies(), ElementsAre(Body::kResult, Body::kHeartbeat));
}

// RegisterNode and heartbeats carry the LoRAs the node can apply and, once a job with LoRAs has
// run, the set merged per "<model>/<precision>" (what placement prefers nodes by).
TEST_F(NodeSessionTest, RegistrationAndHeartbeatsCarryLorasAndTheAppliedSet) {
  gen_->available_loras = {"ink", "style"};
  StartWithWorker();
  session_->Tick();
  auto reg = channel_.Take(Body::kRegisterNode);
  ASSERT_EQ(reg.size(), 1u);
  EXPECT_THAT(reg[0].register_node().info().loras(), ElementsAre("ink", "style"));
  EXPECT_TRUE(reg[0].register_node().info().applied_loras().empty());
  session_->OnMessage(Ack());
  ASSERT_TRUE(session_->link().registered());

  kiln::v1::Envelope assign = Assign("j1", 1);
  assign.mutable_assign()->mutable_spec()->add_loras()->set_name("style");
  session_->OnMessage(assign);
  ASSERT_TRUE(TickUntil([&] { return worker_->idle(); }));
  const auto hb = session_->HeartbeatMessage().heartbeat();
  EXPECT_THAT(hb.loras(), ElementsAre("ink", "style"));
  ASSERT_EQ(hb.applied_loras().size(), 1);
  EXPECT_EQ(hb.applied_loras().at("tiny/fp32"), "style@1");
}

TEST_F(NodeSessionTest, AHeldResultCountsAsRunningInHeartbeats) {
  StartWithFakeRunner();
  Register();
  session_->OnMessage(Assign("j1", 2));
  runner_->StartNext();
  channel_.accept = false;  // the send queue is full
  runner_->FinishRunning();
  session_->Tick();
  EXPECT_EQ(session_->held_results(), 1u);
  channel_.accept = true;
  // Until its result is taken, heartbeats list the job as running (the coordinator keeps it).
  EXPECT_THAT(session_->HeartbeatMessage().heartbeat().running_jobs(), ElementsAre("j1"));
  clock_.AdvanceMs(100);
  session_->Tick();
  EXPECT_TRUE(ResultOf("j1"));
  EXPECT_EQ(session_->held_results(), 0u);
}

TEST_F(NodeSessionTest, CancelGoesToTheRunnerAndDuplicatesAreIgnored) {
  StartWithFakeRunner();
  Register();
  session_->OnMessage(Assign("j1", 2));
  session_->OnMessage(Assign("j1", 2));  // re-sent assignment
  EXPECT_EQ(runner_->queued.size(), 1u);
  kiln::v1::Envelope cancel;
  cancel.mutable_cancel_job()->set_job_id("j1");
  session_->OnMessage(cancel);
  cancel.mutable_cancel_job()->set_job_id("elsewhere");
  session_->OnMessage(cancel);
  EXPECT_THAT(runner_->cancels, ElementsAre("j1", "elsewhere"));
  EXPECT_TRUE(runner_->queued.empty());
  EXPECT_THAT(channel_.Take(Body::kError), IsEmpty());
}

TEST_F(NodeSessionTest, DrainRefusesQueuedAndNewJobsThenDeregisters) {
  StartWithFakeRunner();
  Register();
  session_->OnMessage(Assign("run", 2));
  runner_->StartNext();
  session_->OnMessage(Assign("queued", 2));
  session_->Drain();
  // The coordinator hears first that nothing more is to be placed here (and that both jobs are
  // still ours), then gets the queued one back.
  auto hbs = channel_.Take(Body::kHeartbeat);
  ASSERT_EQ(hbs.size(), 1u);
  EXPECT_EQ(hbs[0].heartbeat().unhealthy(), "node is shutting down");
  EXPECT_THAT(hbs[0].heartbeat().running_jobs(), ElementsAre("run", "queued"));
  auto r = ResultOf("queued");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error_code(), "UNAVAILABLE");
  EXPECT_THAT(r->error(), HasSubstr("shutting down"));
  session_->OnMessage(Assign("late", 2));
  r = ResultOf("late");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error_code(), "UNAVAILABLE");
  EXPECT_EQ(CounterValue(registry_, "kiln_node_jobs_total", "rejected"), 2);
  session_->Tick();
  EXPECT_FALSE(session_->finished());  // the running job is not done
  runner_->FinishRunning();
  session_->Tick();
  EXPECT_TRUE(ResultOf("run"));
  EXPECT_THAT(channel_.Bodies(), ElementsAre(Body::kDeregister));
  EXPECT_TRUE(session_->finished());
}

TEST_F(NodeSessionTest, DrainGivesUpOnResultsNoCoordinatorTakes) {
  StartWithFakeRunner();
  Register();
  session_->OnMessage(Assign("j1", 2));
  runner_->StartNext();
  clock_.AdvanceMs(300);
  session_->Tick();  // coordinator dead
  runner_->FinishRunning();
  session_->Drain();
  session_->Tick();
  EXPECT_FALSE(session_->finished());
  clock_.AdvanceMs(1001);
  session_->Tick();
  EXPECT_TRUE(session_->finished());
  EXPECT_FALSE(session_->deregistered());
  EXPECT_EQ(session_->held_results(), 1u);
}

TEST_F(NodeSessionTest, StopWithoutACoordinatorEndsAtOnce) {
  StartWithFakeRunner();
  session_->Tick();  // connects, registers; nobody answers
  session_->Drain();
  session_->Tick();
  EXPECT_TRUE(session_->finished());
  EXPECT_FALSE(session_->registered_once());
  EXPECT_FALSE(session_->deregistered());
  EXPECT_THAT(channel_.Take(Body::kDeregister), IsEmpty());
}

}  // namespace
}  // namespace kiln::node
