// libFuzzer target: the node's message handling. Frames from the coordinator are decoded as
// NodeAgent decodes them (kiln::Decode; failures go to OnBadFrame) and handed to the real
// NodeSession (fake channel, fake clock, a JobRunner that only queues, a catalog serving one
// model), with Tick() and drains in between. Every message must be handled without a crash, and
// everything the session sends must encode and decode.
//
// Input: the op stream of fuzz_support.h. op & 3: 0 = a frame from the coordinator; 1 = the
// clock moves (op >> 2) * 50 ms and Tick() runs; 2 = the runner finishes its oldest job (a
// result through the outbox, ok when op >> 2 is even) and Tick() runs; 3 = Drain() when
// op >> 2 == 63, else Tick() only.
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/wire.h"
#include "node/catalog.h"
#include "node/job_runner.h"
#include "node/node_metrics.h"
#include "node/node_options.h"
#include "node/node_session.h"
#include "node/outbox.h"
#include "prometheus/registry.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

using kiln::v1::Envelope;
using namespace kiln::node;

class FuzzChannel : public CoordinatorChannel {
 public:
  void Connect(const std::string&) override { connected = true; }
  void Disconnect() override { connected = false; }
  bool Send(const Envelope& env) override {
    if (!connected) return false;
    FUZZ_CHECK(kiln::Decode(kiln::Encode(env)).ok());
    return true;
  }
  bool connected = false;
};

// Queues jobs and never runs them; the fuzzer finishes them through the outbox.
class QueueRunner : public JobRunner {
 public:
  bool Enqueue(Job job) override {
    for (const auto& j : queued) {
      if (j.spec.job_id() == job.spec.job_id()) return false;
    }
    if (queued.size() >= 8) return false;
    queued.push_back(std::move(job));
    return true;
  }
  CancelOutcome Cancel(const std::string& job_id) override {
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
    for (const auto& j : queued) out.push_back(j.spec.job_id());
    return out;
  }
  std::vector<std::string> LoadedPackages() const override { return {"p1"}; }
  bool idle() const override { return queued.empty(); }

  std::deque<Job> queued;
};

// Never called: the runner above runs nothing.
class NoGenerator : public Generator {
 public:
  absl::StatusOr<kiln::pipeline::GenerateResult> Generate(
      const kiln::pipeline::GenerateRequest&, const kiln::pipeline::ProgressFn&) override {
    return absl::UnimplementedError("fuzz");
  }
  std::vector<std::string> DigestsFor(int, int) const override { return {"d1", "d2"}; }
  std::vector<std::string> LoadedDigests() const override { return {}; }
};

struct World {
  World() {
    options.node_id = "node-f";
    options.coordinator = "tcp://127.0.0.1:1,tcp://127.0.0.1:2";
    options.resolutions = {{64, 32}, {256, 256}};
    options.metrics_url = "http://127.0.0.1:1/metrics";
    options.hostname = "host-f";
    options.link.heartbeat_interval_ms = 100;
    options.drain_timeout_ms = 1000;
    options.device_info.set_kind("cpu");
    options.device_info.set_name("fuzz cpu");
    FUZZ_CHECK(options.Validate().ok());
    catalog = std::make_unique<ModelCatalog>("fp32", options.resolutions);
    catalog->Add("tiny", "fp32", std::make_unique<NoGenerator>());
    metrics = std::make_unique<NodeMetrics>(registry, options.node_id, options.device,
                                            options.device_info);
  }
  NodeOptions options;
  std::unique_ptr<ModelCatalog> catalog;
  prometheus::Registry registry;
  std::unique_ptr<NodeMetrics> metrics;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static World* world = new World();  // options, catalog and metrics outlive every input
  auto outbox = Outbox::Create();
  FUZZ_CHECK(outbox.ok());
  QueueRunner runner;
  FuzzChannel channel;
  kiln::FakeClock clock;
  NodeSession session(world->options, *world->catalog, runner, **outbox, /*packages=*/nullptr,
                      *world->metrics, clock, channel, [](const std::string&) {});
  session.Tick();

  kiln::fuzz::OpReader reader(data, size);
  kiln::fuzz::Op op;
  while (reader.Next(&op) && !session.finished()) {
    const int arg = op.op >> 2;
    switch (op.op & 3) {
      case 0: {
        auto env = kiln::Decode(op.payload);
        if (env.ok()) {
          session.OnMessage(*env);
        } else {
          session.OnBadFrame(env.status());
        }
        break;
      }
      case 1:
        clock.AdvanceMs(static_cast<int64_t>(arg) * 50);
        session.Tick();
        break;
      case 2:
        if (!runner.queued.empty()) {
          Envelope result;
          result.mutable_result()->set_job_id(runner.queued.front().spec.job_id());
          result.mutable_result()->set_attempt(runner.queued.front().attempt);
          result.mutable_result()->set_ok(arg % 2 == 0);
          if (arg % 2 != 0) {
            result.mutable_result()->set_error_code("INTERNAL");
            result.mutable_result()->set_error("fuzz");
          }
          runner.queued.pop_front();
          (*outbox)->Push(std::move(result));
        }
        session.Tick();
        break;
      case 3:
        if (arg == 63) session.Drain();
        session.Tick();
        break;
    }
    FUZZ_CHECK(session.MsUntilNextEvent() >= 0);
  }
  return 0;
}
