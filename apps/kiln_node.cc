// kiln-node: one GPU (or MIG slice, or CPU) serving jobs for a kiln coordinator.
//   kiln-node --coordinator tcp://HOST:PORT --model flux-tiny=DIR [--model other=DIR2] [flags]
// Exit status: 0 after a graceful stop (SIGTERM/SIGINT: the running job finishes and its result
// is sent, then the node deregisters), 2 bad flags or an unusable model/device, 1 other failure.
// Logs go to stderr (common/log.h), one timestamped line per event; --log_format json for JSON.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/curve_keys.h"
#include "common/advertise.h"
#include "common/exit.h"
#include "common/flags.h"
#include "common/files.h"
#include "common/log.h"
#include "common/log_flags.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "node/health.h"
#include "node/node_factory.h"
#include "pipeline/flux_pipeline.h"

ABSL_FLAG(std::string, coordinator, "",
          "the coordinator's node endpoint, tcp://HOST:PORT, or every coordinator's as a comma "
          "list (tried in turn) (required)");
ABSL_FLAG(std::string, node_id, "", "node id (default: HOSTNAME-PID)");
ABSL_FLAG(std::string, key, "",
          "this node's CURVE key pair (NAME.key from `kiln keys new`); its public key must be in "
          "the coordinator's --node_keys. Required unless --insecure_plaintext");
ABSL_FLAG(std::string, coordinator_key, "",
          "the coordinator's CURVE public key (coordinator.pub)");
ABSL_FLAG(bool, insecure_plaintext, false,
          "connect without CURVE (the coordinator must run with --insecure_plaintext too; "
          "development only)");
ABSL_FLAG(std::vector<std::string>, model, {},
          "NAME=DIR of a served model (diffusers layout); repeatable, or comma-separated");
ABSL_FLAG(std::vector<std::string>, models, {}, "same as --model");
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda or cuda:N");
ABSL_FLAG(std::string, gpus, "",
          "device indices, comma-separated (e.g. 0,1): one node spreads each job over them "
          "(sequence parallel, one rank per device, 2..16) and registers once with their count; "
          "needs --device cuda (or cpu: CPU ranks, for tests). Default: the one --device");
ABSL_FLAG(double, group_timeout_s, 600,
          "with --gpus: bound on the rank group's start and on each collective, seconds (above "
          "a rank's load of its transformer set once a job starts)");
ABSL_FLAG(std::string, precision, "fp32", "default precision for jobs that name none");
ABSL_FLAG(std::vector<std::string>, precisions, {},
          "precisions served (comma-separated; default: --precision only)");
ABSL_FLAG(std::string, package_dir, "",
          "node-local package directory (default: $KILN_PACKAGE_DIR, else .kiln/packages)");
ABSL_FLAG(int64_t, package_dir_max_bytes, 0,
          "evict least-recently-used packages beyond this many bytes (0: unbounded)");
ABSL_FLAG(std::string, shared_cache, "", "shared package cache directory (\"\": none)");
ABSL_FLAG(std::vector<std::string>, lora_dir, {},
          "LoRA directories (comma list) searched in order for a job's NAME.safetensors and its "
          "digest NAME.safetensors.sha256; the shared cache's loras/ is searched last");
ABSL_FLAG(std::string, resolutions, "",
          "allowed WIDTHxHEIGHT buckets, comma-separated (default: the pipeline's)");
ABSL_FLAG(std::string, metrics, "127.0.0.1:0", "HOST:PORT to serve /metrics on (port 0: any)");
ABSL_FLAG(std::string, advertise, "",
          "host other machines reach this node at; its registered metrics URL carries it");
ABSL_FLAG(int, heartbeat_ms, 1000, "heartbeat interval until the coordinator sets one (ms)");
ABSL_FLAG(int, job_slots, 2,
          "jobs held at once: the running one plus those taken ahead (2: one prefetched job, "
          "encoded beside the running denoise; 1: none)");
ABSL_FLAG(int, max_batch, 1,
          "run up to N encoded jobs of the same model, precision, size, steps and LoRA set as "
          "one batch (1..4; batches of 1, 2 or 4; 1: no batching); job slots become at least N+1");
ABSL_FLAG(int, batch_wait_ms, 0,
          "with --max_batch > 1: wait up to this long (ms) for a full batch before running a "
          "smaller one (0: never wait; the most a batch delays its first job)");
ABSL_FLAG(bool, no_compile, false, "never compile a missing package (the job fails instead)");
ABSL_FLAG(std::string, compiler, "", "kiln-compile executable (default: beside kiln-node)");
ABSL_FLAG(std::string, trusted_keys, "",
          "comma list of .pub files and directories of .pub files: load only packages signed by "
          "one of these keys (\"\": signatures not checked, development only)");
ABSL_FLAG(std::string, signing_key, "",
          "signing key file (kiln signing-key new) to sign the packages this node compiles");
ABSL_FLAG(std::string, revocation_file, "",
          "extra revocation list (lines 'key HEX' / 'package SHA256'), read before every load");
ABSL_FLAG(int64_t, disk_check_ms, 5000,
          "probe the package directory (write + fsync + delete) this often; while it fails the "
          "node is not ready and takes no jobs (ms, > 0; also after every failed job)");
ABSL_FLAG(std::string, compile_options, "",
          "JSON object handed to kiln-compile and part of every package key (default: kiln's "
          "defaults); give every node of a cluster the same");
ABSL_FLAG(int, gpu_telemetry_interval_ms, 1000,
          "cuda nodes: sample the GPU through NVML every this many ms (0: off)");
ABSL_FLAG(std::string, status_file, "",
          "after registering, write {node_id, metrics_url, pid} here (atomically)");

namespace {

// absl flags keep only the last occurrence of a flag: join every --model/--models value into one
// comma-separated --model so that the flag is repeatable.
std::vector<std::string> JoinModelFlags(int argc, char** argv) {
  std::vector<std::string> args, values;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    bool taken = false;
    for (const std::string name : {"--model", "--models", "-model", "-models"}) {
      if (a == name && i + 1 < argc) {
        values.push_back(argv[++i]);
        taken = true;
      } else if (a.rfind(name + "=", 0) == 0) {
        values.push_back(a.substr(name.size() + 1));
        taken = true;
      }
      if (taken) break;
    }
    if (!taken) args.push_back(a);
  }
  if (!values.empty()) {
    std::string joined;
    for (const auto& v : values) joined += (joined.empty() ? "" : ",") + v;
    args.push_back("--model=" + joined);
  }
  return args;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> joined = JoinModelFlags(argc, argv);
  const std::vector<std::string> rest = kiln::ParseFlagsOrExit(
      joined, "kiln-node",
      "kiln-node --coordinator tcp://HOST:PORT --model NAME=DIR [--model NAME=DIR ...] [flags]");
  if (auto s = kiln::InitLoggingFromFlags("kiln-node"); !s.ok()) return kiln::FailMain(s);
  if (auto s = kiln::NoPositionalArguments(rest); !s.ok()) return kiln::FailMain(s);

  kiln::node::NodeProcessOptions process;
  kiln::node::NodeOptions& options = process.node;
  options.coordinator = absl::GetFlag(FLAGS_coordinator);
  if (options.coordinator.empty()) {
    return kiln::FailMain(absl::InvalidArgumentError("--coordinator is required"));
  }
  if (absl::GetFlag(FLAGS_insecure_plaintext)) {
    if (!absl::GetFlag(FLAGS_key).empty() || !absl::GetFlag(FLAGS_coordinator_key).empty()) {
      return kiln::FailMain(
          absl::InvalidArgumentError("--insecure_plaintext excludes --key and --coordinator_key"));
    }
    kiln::LogWarning("main",
                     "INSECURE: --insecure_plaintext: the connection to the coordinator is neither "
                     "encrypted nor authenticated. Development only.");
  } else {
    if (absl::GetFlag(FLAGS_key).empty() || absl::GetFlag(FLAGS_coordinator_key).empty()) {
      return kiln::FailMain(absl::InvalidArgumentError(
          "--key and --coordinator_key are required (CURVE), or --insecure_plaintext for "
          "development"));
    }
    auto curve = kiln::LoadCurveClient(absl::GetFlag(FLAGS_key),
                                       absl::GetFlag(FLAGS_coordinator_key), "--key",
                                       "--coordinator_key");
    if (!curve.ok()) return kiln::FailMain(curve.status());
    options.curve = *curve;
  }
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  options.hostname = host;
  options.node_id = absl::GetFlag(FLAGS_node_id);
  if (options.node_id.empty()) options.node_id = absl::StrCat(host, "-", getpid());
  std::vector<std::string> models = absl::GetFlag(FLAGS_model);
  for (const auto& m : absl::GetFlag(FLAGS_models)) models.push_back(m);
  if (models.empty()) {
    return kiln::FailMain(absl::InvalidArgumentError("at least one --model NAME=DIR is required"));
  }
  for (const auto& m : models) {
    const auto eq = m.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == m.size()) {
      return kiln::FailMain(
          absl::InvalidArgumentError(absl::StrCat("--model '", m, "': want NAME=DIR")));
    }
    const std::string name = m.substr(0, eq);
    if (options.models.count(name)) {
      return kiln::FailMain(
          absl::InvalidArgumentError(absl::StrCat("--model ", name, ": given twice")));
    }
    options.models[name] = m.substr(eq + 1);
  }
  options.device = absl::GetFlag(FLAGS_device);
  auto gpus = kiln::node::ParseGpus(absl::GetFlag(FLAGS_gpus));
  if (!gpus.ok()) return kiln::FailMain(gpus.status());
  options.gpus = *std::move(gpus);
  options.group_timeout_seconds = absl::GetFlag(FLAGS_group_timeout_s);
  options.precision = absl::GetFlag(FLAGS_precision);
  options.precisions = absl::GetFlag(FLAGS_precisions);
  options.package_dir = absl::GetFlag(FLAGS_package_dir);
  if (options.package_dir.empty()) {
    const char* env = std::getenv("KILN_PACKAGE_DIR");
    options.package_dir = env && *env ? env : ".kiln/packages";
  }
  options.package_dir_max_bytes = absl::GetFlag(FLAGS_package_dir_max_bytes);
  options.job_slots = absl::GetFlag(FLAGS_job_slots);
  options.batching.max_batch = absl::GetFlag(FLAGS_max_batch);
  options.batching.batch_wait_ms = absl::GetFlag(FLAGS_batch_wait_ms);
  options.shared_cache_dir = absl::GetFlag(FLAGS_shared_cache);
  options.lora_dirs = absl::GetFlag(FLAGS_lora_dir);
  if (!absl::GetFlag(FLAGS_resolutions).empty()) {
    auto r = kiln::pipeline::ParseResolutions(absl::GetFlag(FLAGS_resolutions));
    if (!r.ok()) {
      return kiln::FailMain(
          absl::InvalidArgumentError(absl::StrCat("--resolutions: ", r.status().message())));
    }
    options.resolutions = *r;
  }
  if (const std::string co = absl::GetFlag(FLAGS_compile_options); !co.empty()) {
    auto parsed = kiln::pipeline::ParseCompileOptions(co);
    if (!parsed.ok()) return kiln::FailMain(parsed.status());
    options.compile_options = *std::move(parsed);
  }
  options.link.heartbeat_interval_ms = absl::GetFlag(FLAGS_heartbeat_ms);
  options.allow_compile = !absl::GetFlag(FLAGS_no_compile);
  options.compiler_path = absl::GetFlag(FLAGS_compiler);
  options.trusted_keys = absl::GetFlag(FLAGS_trusted_keys);
  options.signing_key = absl::GetFlag(FLAGS_signing_key);
  options.revocation_file = absl::GetFlag(FLAGS_revocation_file);
  options.disk_check_interval_ms = absl::GetFlag(FLAGS_disk_check_ms);
  if (auto s = options.Validate(); !s.ok()) return kiln::FailMain(s);
  process.metrics_address = absl::GetFlag(FLAGS_metrics);
  process.advertise_host = absl::GetFlag(FLAGS_advertise);
  if (auto s = kiln::ValidateAdvertiseHost(process.advertise_host, "--advertise"); !s.ok()) {
    return kiln::FailMain(s);
  }
  if (const char* v = std::getenv("CUDA_VISIBLE_DEVICES")) process.cuda_visible_devices = v;
  process.gpu_telemetry_interval_ms = absl::GetFlag(FLAGS_gpu_telemetry_interval_ms);

  // SIGTERM/SIGINT are taken synchronously by this thread (sigtimedwait below): block them
  // before any thread starts, so that every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto node = kiln::node::CreateNodeProcess(std::move(process));
  if (!node.ok()) return kiln::FailMain(node.status());
  kiln::node::NodeAgent& agent = *node->agent;
  const kiln::node::NodeOptions& running = agent.options();
  const kiln::v1::DeviceInfo& device = running.device_info;
  // /readyz: registered and not stopping. Set before the metrics URL is logged: whoever reads
  // the URL from the log must never find the server without its readiness.
  std::atomic<bool> draining{false};
  node->metrics->SetReadiness([&agent, &draining] {
    return kiln::node::NodeReadiness(agent.registered_once(), draining.load(), agent.done(),
                                     agent.health_status());
  });
  absl::Cleanup unready = [&node] {  // before the agent goes, on every return
    node->metrics->SetReadiness([] { return absl::UnavailableError("stopped"); });
  };
  kiln::LogInfo("main",
                absl::StrCat(running.node_id, " on ", device.kind(),
                             device.name().empty() ? "" : " (" + device.name() + ")",
                             device.mig_profile().empty() ? "" : " MIG " + device.mig_profile(),
                             "; metrics ", running.metrics_url));
  if (auto s = agent.Start(); !s.ok()) return kiln::FailMain(s);

  const std::string status_file = absl::GetFlag(FLAGS_status_file);
  bool status_written = false, stopping = false;
  while (!agent.done()) {
    const timespec tick = {0, 100 * 1000 * 1000};
    const int sig = sigtimedwait(&signals, nullptr, &tick);
    if (sig == SIGTERM || sig == SIGINT) {
      if (!stopping) {
        kiln::LogInfo("main", absl::StrCat(strsignal(sig),
                                           ": finishing the current job, then deregistering"));
      }
      stopping = true;
      draining = true;
      agent.Stop();
    }
    if (!status_written && !status_file.empty() && agent.registered_once()) {
      nlohmann::json j = {{"node_id", running.node_id},
                          {"metrics_url", running.metrics_url},
                          {"pid", getpid()}};
      if (auto s = kiln::WriteFileAtomically(status_file, j.dump() + "\n"); !s.ok()) {
        kiln::LogWarning("main", absl::StrCat("status file: ", s.message()));
      }
      status_written = true;
    }
  }
  agent.Wait();
  const absl::Status s = agent.status();
  if (!s.ok()) {
    kiln::LogError("main", s.message());
    return kiln::kExitFailure;  // the node ran and failed: not its flags
  }
  return kiln::kExitOk;
}
