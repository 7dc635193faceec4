// libFuzzer target: the coordinator's message handling. Frames from up to four clients and four
// nodes are decoded as CoordinatorServer decodes them (kiln::Decode) and handed to the real
// Coordinator (in-memory job store, fake clock) through its public methods, dispatched by body
// type on the client or node side as the server does; time moves in between. Every call must
// answer with a Status, never crash; every message the coordinator queues must encode and decode.
//
// Input: the op stream of fuzz_support.h. op & 3: 0 = a frame on the client socket from client
// op >> 2 & 3; 1 = a frame on the node socket from node op >> 2 & 3; 2 = the clock moves
// (op >> 2) * 100 ms and Tick() runs; 3 = Tick() only, or with op & 16 the connection of client
// op >> 2 & 3 goes away (DropWaitsOf, as the server does on its disconnect).
#include <cstdint>
#include <memory>
#include <string>

#include "common/clock.h"
#include "common/wire.h"
#include "coordinator/coordinator.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/job_store.h"
#include "prometheus/registry.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

using kiln::v1::Envelope;
using namespace kiln::coordinator;

template <typename T>
void CheckReply(const absl::StatusOr<T>& reply) {
  // An error is answered with an ErrorReply, which must itself go through the wire.
  if (!reply.ok()) FUZZ_CHECK(kiln::Decode(kiln::Encode(kiln::ErrorEnvelope(reply.status(), ""))).ok());
}

void Client(Coordinator& c, const std::string& peer, const Envelope& env) {
  switch (env.body_case()) {
    case Envelope::kSubmit: return CheckReply(c.Submit(env.submit()));
    case Envelope::kStatus: return CheckReply(c.Status(env.status()));
    case Envelope::kWait: return CheckReply(c.Wait(env.wait(), ReplyTo{peer, env.request_id()}));
    case Envelope::kCancel: return CheckReply(c.Cancel(env.cancel()));
    case Envelope::kListNodes: (void)c.ListNodes(); return;
    case Envelope::kDrain: return CheckReply(c.Drain(env.drain()));
    default: return;  // the server answers UNIMPLEMENTED without calling the coordinator
  }
}

void Node(Coordinator& c, const std::string& node_id, const Envelope& env) {
  switch (env.body_case()) {
    case Envelope::kRegisterNode: return CheckReply(c.RegisterNode(node_id, env.register_node()));
    case Envelope::kHeartbeat: (void)c.Heartbeat(node_id, env.heartbeat()); return;
    case Envelope::kProgress: (void)c.Progress(node_id, env.progress()); return;
    case Envelope::kResult: (void)c.Result(node_id, env.result()); return;
    case Envelope::kDeregister: (void)c.Deregister(node_id, env.deregister()); return;
    default: return;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // One registry and metrics for every input: building them (some twenty families, histograms
  // with their buckets) cost more than most inputs. The Coordinator only writes them (the model
  // label set they bound is the one piece of state, and it does not steer the coordinator);
  // the Coordinator, its store and clock are fresh for each input.
  static prometheus::Registry& registry = *new prometheus::Registry();
  static CoordinatorMetrics& metrics = *new CoordinatorMetrics(registry);
  InMemoryJobStore store(/*max_finished_jobs=*/16);
  kiln::FakeClock clock;
  CoordinatorOptions options;
  options.heartbeat_interval_ms = 100;
  options.max_queued_jobs = 64;
  options.max_nodes = 8;
  options.max_pending_waits = 64;
  auto coordinator = Coordinator::Create(options, store, clock, metrics, [](const std::string&) {});
  FUZZ_CHECK(coordinator.ok());
  Coordinator& c = **coordinator;

  kiln::fuzz::OpReader reader(data, size);
  kiln::fuzz::Op op;
  while (reader.Next(&op)) {
    const int peer = op.op >> 2 & 3;
    switch (op.op & 3) {
      case 0:
      case 1: {
        auto env = kiln::Decode(op.payload);
        if (!env.ok()) break;  // answered with an ErrorReply and counted by the server
        if ((op.op & 3) == 0) {
          Client(c, "client-" + std::to_string(peer), *env);
        } else {
          Node(c, "node-" + std::to_string(peer), *env);
        }
        break;
      }
      case 2:
        clock.AdvanceMs(static_cast<int64_t>(op.op >> 2) * 100);
        c.Tick();
        break;
      case 3:
        if (op.op & 16) {
          const size_t before = c.pending_waits();
          const size_t dropped = c.DropWaitsOf("client-" + std::to_string(peer));
          FUZZ_CHECK(dropped <= before && c.pending_waits() == before - dropped);
        } else {
          c.Tick();
        }
        break;
    }
    for (auto& out : c.TakeOutgoing()) {
      auto back = kiln::Decode(kiln::Encode(std::move(out.envelope)));
      FUZZ_CHECK(back.ok());
    }
  }
  (void)c.ListNodes();
  return 0;
}
