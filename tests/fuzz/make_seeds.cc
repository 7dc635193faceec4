// Writes the seed corpora of the message targets (wire_decode_fuzz, coordinator_fuzz,
// node_session_fuzz) under the folder given as the only argument: corpus/<target>/<name>.
// Run by hand when the protocol changes; its output is committed:
//   build-fuzz/fuzz/kiln_fuzz_seeds tests/fuzz/corpus
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/wire.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

using kiln::v1::Envelope;
using kiln::fuzz::OpRecord;

void Write(const std::string& dir, const std::string& name, const std::string& bytes) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/" + name, std::ios::binary) << bytes;
}

kiln::v1::JobSpec Spec(const std::string& id) {
  kiln::v1::JobSpec spec;
  spec.set_job_id(id);
  spec.set_model("tiny");
  spec.set_prompt("a lighthouse on a cliff at dusk");
  spec.set_width(64);
  spec.set_height(32);
  spec.set_steps(4);
  spec.set_seed(7);
  return spec;
}

std::string E(Envelope env, const std::string& rid = "r1") {
  env.set_request_id(rid);
  return kiln::Encode(std::move(env));
}

Envelope Register(const std::string& node_id) {
  Envelope env;
  auto* info = env.mutable_register_node()->mutable_info();
  info->set_node_id(node_id);
  info->mutable_device()->set_kind("cpu");
  info->mutable_device()->set_name("seed cpu");
  info->add_models("tiny");
  info->add_packages("d1");
  info->set_can_compile(true);
  info->set_hostname("host");
  (*info->mutable_package_sets())["tiny/fp32/64x32"].add_digests("d1");
  return env;
}

// Every message type, filled as the real peers fill them.
std::vector<std::pair<std::string, Envelope>> AllMessages() {
  std::vector<std::pair<std::string, Envelope>> out;
  Envelope e;
  *e.mutable_submit()->mutable_spec() = Spec("job-1");
  out.emplace_back("submit", e);
  e.Clear();
  e.mutable_status()->set_job_id("job-1");
  e.mutable_status()->set_include_png(true);
  out.emplace_back("status", e);
  e.Clear();
  e.mutable_wait()->set_job_id("job-1");
  e.mutable_wait()->set_timeout_ms(500);
  e.mutable_wait()->set_stream_progress(true);
  out.emplace_back("wait", e);
  e.Clear();
  e.mutable_cancel()->set_job_id("job-1");
  out.emplace_back("cancel", e);
  e.Clear();
  e.mutable_list_nodes();
  out.emplace_back("list_nodes", e);
  e.Clear();
  e.mutable_drain()->set_node_id("node-0");
  out.emplace_back("drain", e);
  e.Clear();
  *e.mutable_job()->mutable_job()->mutable_spec() = Spec("job-1");
  e.mutable_job()->mutable_job()->set_state(kiln::v1::JOB_STATE_SUCCEEDED);
  e.mutable_job()->mutable_job()->set_png("\x89PNG");
  (*e.mutable_job()->mutable_job()->mutable_packages())["transformer"] = "local";
  e.mutable_job()->set_final(true);
  out.emplace_back("job_reply", e);
  e.Clear();
  e.mutable_nodes()->add_nodes()->mutable_info()->set_node_id("node-0");
  out.emplace_back("nodes", e);
  e.Clear();
  e.mutable_drain_reply()->mutable_node()->set_state(kiln::v1::NODE_STATE_DRAINING);
  out.emplace_back("drain_reply", e);
  e.Clear();
  e.mutable_error()->set_code("FAILED_PRECONDITION");
  e.mutable_error()->set_message("not registered");
  out.emplace_back("error", e);
  out.emplace_back("register_node", Register("node-0"));
  e.Clear();
  e.mutable_register_ack()->set_heartbeat_interval_ms(100);
  out.emplace_back("register_ack", e);
  e.Clear();
  e.mutable_heartbeat()->add_running_jobs("job-1");
  e.mutable_heartbeat()->add_packages("d1");
  out.emplace_back("heartbeat", e);
  e.Clear();
  *e.mutable_assign()->mutable_spec() = Spec("job-1");
  e.mutable_assign()->set_attempt(1);
  out.emplace_back("assign", e);
  e.Clear();
  e.mutable_progress()->set_job_id("job-1");
  e.mutable_progress()->set_step(2);
  e.mutable_progress()->set_total_steps(4);
  e.mutable_progress()->set_phase("denoising");
  out.emplace_back("progress", e);
  e.Clear();
  e.mutable_result()->set_job_id("job-1");
  e.mutable_result()->set_ok(true);
  e.mutable_result()->set_png("\x89PNG");
  e.mutable_result()->set_attempt(1);
  e.mutable_result()->mutable_cold_start()->set_total_seconds(1.5);
  out.emplace_back("result", e);
  e.Clear();
  e.mutable_cancel_job()->set_job_id("job-1");
  out.emplace_back("cancel_job", e);
  e.Clear();
  e.mutable_deregister()->set_reason("shutdown");
  out.emplace_back("deregister", e);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const std::string root = argv[1];
  const auto messages = AllMessages();
  for (const auto& [name, env] : messages) Write(root + "/wire_decode_fuzz", name, E(env));

  // Coordinator: op 0 = client frame, 1 = node frame, 2 = clock + Tick (peer bits: which one).
  auto msg = [&](const std::string& name) {
    for (const auto& [n, env] : messages) {
      if (n == name) return env;
    }
    std::abort();
  };
  const uint8_t kClient = 0, kNode = 1, kTick = 2 | 1 << 2;  // tick: +100 ms
  std::string life;
  life += OpRecord(kNode, E(msg("register_node")));
  life += OpRecord(kClient, E(msg("submit")));
  life += OpRecord(kClient, E(msg("wait")));
  life += OpRecord(kTick, "");
  life += OpRecord(kNode, E(msg("heartbeat")));
  life += OpRecord(kNode, E(msg("progress")));
  life += OpRecord(kNode, E(msg("result")));
  life += OpRecord(kClient, E(msg("status")));
  life += OpRecord(kClient, E(msg("list_nodes")));
  life += OpRecord(kClient, E(msg("drain")));
  life += OpRecord(kNode, E(msg("deregister")));
  Write(root + "/coordinator_fuzz", "job_lifecycle", life);
  std::string lost;
  lost += OpRecord(kNode, E(msg("register_node")));
  lost += OpRecord(kNode | 1 << 2, E(Register("node-1")));
  lost += OpRecord(kClient, E(msg("submit")));
  lost += OpRecord(kTick, "");
  lost += OpRecord(2 | 20 << 2, "");  // 2 s of silence: the node dies, the job is requeued
  lost += OpRecord(kNode | 1 << 2, E(msg("heartbeat")));
  lost += OpRecord(kClient, E(msg("cancel")));
  lost += OpRecord(kNode, E(msg("result")));
  Write(root + "/coordinator_fuzz", "node_lost", lost);

  // Node: op 0 = coordinator frame, 1 = clock + Tick, 2 = finish oldest job, 3 = Tick / drain.
  std::string node;
  node += OpRecord(0, E(msg("register_ack")));
  node += OpRecord(0, E(msg("assign")));
  node += OpRecord(1 | 2 << 2, "");
  node += OpRecord(0, E(msg("heartbeat")));
  node += OpRecord(2, "");
  node += OpRecord(0, E(msg("cancel_job")));
  node += OpRecord(0, E(msg("error")));
  node += OpRecord(0, E(msg("register_ack")));
  node += OpRecord(0, "not a frame");
  node += OpRecord(3 | 63 << 2, "");
  node += OpRecord(1 | 30 << 2, "");
  Write(root + "/node_session_fuzz", "session", node);
  std::string silent;
  silent += OpRecord(0, E(msg("register_ack")));
  silent += OpRecord(0, E(msg("assign")));
  silent += OpRecord(1 | 63 << 2, "");  // the coordinator goes silent: reconnect elsewhere
  silent += OpRecord(2 | 1 << 2, "");   // the job fails while disconnected: result held
  silent += OpRecord(1 | 63 << 2, "");
  silent += OpRecord(0, E(msg("register_ack")));
  Write(root + "/node_session_fuzz", "reconnect", silent);
  return 0;
}
