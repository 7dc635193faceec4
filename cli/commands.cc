#include "cli/commands.h"

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <limits>
#include <memory>

#include "absl/random/random.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cli/args.h"
#include "cli/cluster_state.h"
#include "cli/coordinator_client.h"
#include "cli/signing_key.h"
#include "cli/format.h"
#include "cli/local_cluster.h"
#include "common/clock.h"
#include "common/job_spec.h"
#include "common/log.h"
#include "common/status.h"
#include "common/version.h"
#include "common/wire.h"
#include "nlohmann/json.hpp"

namespace kiln::cli {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr char kDefaultStateDir[] = ".kiln/cluster";
// A long wait is a series of Wait requests of this length. A coordinator that dies mid-wait is
// noticed at once (its connection closes) or after one chunk plus the request timeout (a host
// that vanished); the client then retries the wait on the next endpoint.
constexpr uint32_t kWaitChunkMs = 15000;

// Usage errors say how to get help.
int UsageError(Io& io, const absl::Status& status, const CommandSpec* spec) {
  io.err << "kiln: error: " << status.message() << "\n";
  io.err << (spec ? absl::StrCat("run `kiln help ", spec->name, "` for its flags")
                  : std::string("run `kiln help` for the commands"))
         << "\n";
  return kExitUsage;
}

int Fail(Io& io, const absl::Status& status) {
  PrintError(io.err, status);
  return ExitCodeFor(status);
}

std::string StateDir(const CommandLine& cl) { return cl.Get("state-dir", kDefaultStateDir); }

// --coordinator, else $KILN_COORDINATOR, else the local cluster's cluster.json.
absl::StatusOr<std::string> ResolveCoordinator(const CommandLine& cl, Io& io) {
  if (cl.Has("coordinator")) return cl.Get("coordinator");
  if (std::string env = io.getenv("KILN_COORDINATOR"); !env.empty()) return env;
  const std::string state_dir = StateDir(cl);
  auto state = LoadClusterState(state_dir);
  if (absl::IsNotFound(state.status())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "no coordinator to talk to: pass --coordinator ENDPOINT, set KILN_COORDINATOR, or start "
        "a local cluster with `kiln up` (there is no ",
        ClusterFilePath(state_dir), ")"));
  }
  if (!state.ok()) return state.status();
  if (state->state == "down" || state->coordinator.client_endpoint.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the local cluster in ", state_dir, " is down (start it with `kiln up`)"));
  }
  return state->coordinator.client_endpoint;
}

// The client's CURVE keys: --key/--server-key, else $KILN_KEY/$KILN_SERVER_KEY, else the local
// cluster's admin key when STATE/cluster.json has keys and `endpoint` is that cluster's
// coordinator (an endpoint given by --coordinator or $KILN_COORDINATOR that is some other
// coordinator gets no key of this cluster's); plaintext with --insecure-plaintext or when none of
// these applies.
absl::StatusOr<CurveClient> ResolveCurve(const CommandLine& cl, Io& io,
                                         const std::string& endpoint) {
  if (cl.Has("insecure-plaintext")) return CurveClient{};
  std::string key = cl.Get("key", io.getenv("KILN_KEY"));
  std::string server = cl.Get("server-key", io.getenv("KILN_SERVER_KEY"));
  if (key.empty() && server.empty()) {
    auto state = LoadClusterState(StateDir(cl));
    if (!state.ok() || state->keys_dir.empty()) return CurveClient{};
    if (endpoint == state->coordinator.client_endpoint) return AdminCurveClient(*state);
    io.err << "kiln: " << endpoint << " is not the coordinator of the local cluster in "
           << StateDir(cl) << ", so its admin key is not used (plaintext; pass --key and "
           << "--server-key for a CURVE coordinator)\n";
    return CurveClient{};
  }
  return LoadCurveClient(key, server, "--key", "--server-key");
}

absl::StatusOr<std::unique_ptr<CoordinatorClient>> Connect(const CommandLine& cl, Io& io) {
  auto endpoint = ResolveCoordinator(cl, io);
  if (!endpoint.ok()) return endpoint.status();
  auto timeout_s = cl.GetDouble("request-timeout", 10);
  if (!timeout_s.ok()) return timeout_s.status();
  if (*timeout_s <= 0) {
    return absl::InvalidArgumentError("--request-timeout: must be positive");
  }
  auto retry_for_s = cl.GetDouble("retry-for", 60);
  if (!retry_for_s.ok()) return retry_for_s.status();
  if (*retry_for_s < 0) return absl::InvalidArgumentError("--retry-for: must be >= 0");
  ClientOptions options;
  options.endpoint = *endpoint;
  auto curve = ResolveCurve(cl, io, *endpoint);
  if (!curve.ok()) return curve.status();
  options.curve = *curve;
  options.request_timeout_ms = static_cast<int>(*timeout_s * 1000);
  options.failover.retry_for_ms = static_cast<int64_t>(*retry_for_s * 1000);
  // A note per retry, so a failover or restart is visible but not an error.
  options.on_retry = [&io](const absl::Status& error, const std::string& next, int64_t delay_ms) {
    io.err << absl::StrFormat("kiln: %s; retrying on %s in %.1fs\n", error.message(), next,
                              delay_ms / 1000.0);
  };
  return CoordinatorClient::Connect(options);
}

std::string NewJobId() {
  absl::BitGen gen;
  return absl::StrFormat("job-%d-%06x", UnixMs(), absl::Uniform<uint32_t>(gen, 0, 1u << 24));
}

// The JobSpec from the spec flags. Numbers are parsed here; everything else is the
// coordinator's to validate, so its errors name the field.
absl::StatusOr<kiln::v1::JobSpec> SpecFromFlags(const CommandLine& cl) {
  constexpr int64_t kU32 = std::numeric_limits<uint32_t>::max();
  kiln::v1::JobSpec spec;
  spec.set_job_id(cl.Get("job-id", NewJobId()));
  spec.set_model(cl.Get("model", "flux-tiny"));
  spec.set_prompt(cl.Get("prompt"));
  auto width = cl.GetInt("width", 256, 0, kU32);
  auto height = cl.GetInt("height", 256, 0, kU32);
  auto steps = cl.GetInt("steps", 28, 0, kU32);
  auto seed = cl.GetUint64("seed", 0);
  auto guidance = cl.GetDouble("guidance", 0);
  auto priority = cl.GetInt("priority", 0, std::numeric_limits<int32_t>::min(),
                            std::numeric_limits<int32_t>::max());
  for (const absl::Status& s : {width.status(), height.status(), steps.status(), seed.status(),
                                guidance.status(), priority.status()}) {
    if (!s.ok()) return s;
  }
  spec.set_width(static_cast<uint32_t>(*width));
  spec.set_height(static_cast<uint32_t>(*height));
  spec.set_steps(static_cast<uint32_t>(*steps));
  spec.set_seed(*seed);
  spec.set_guidance(static_cast<float>(*guidance));
  spec.set_priority(static_cast<int32_t>(*priority));
  spec.set_precision(cl.Get("precision"));
  for (const auto& text : cl.All("lora")) {
    auto choice = kiln::ParseLoraChoice("--lora", text);
    if (!choice.ok()) return choice.status();
    auto* lora = spec.add_loras();
    lora->set_name(choice->name);
    lora->set_scale(static_cast<float>(choice->scale));
  }
  return spec;
}

absl::Status WritePng(const std::string& path, const std::string& png) {
  if (png.empty()) {
    return absl::DataLossError("the job succeeded but the coordinator sent no image");
  }
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    fs::create_directories(parent, ec);
    if (ec)
      return absl::InternalError(
          absl::StrCat("cannot create ", parent.string(), ": ", ec.message()));
  }
  return WriteFileAtomically(path, png);
}

std::string AbsolutePath(const std::string& path) {
  std::error_code ec;
  auto p = fs::absolute(path, ec);
  return ec ? path : p.lexically_normal().string();
}

// Waits (in chunks) until the job is finished or `timeout_s` (0 = no limit) has passed,
// showing progress unless `quiet`. DeadlineExceeded when the job is still not finished.
absl::StatusOr<kiln::v1::JobInfo> WaitForJob(CoordinatorClient& client, const std::string& job_id,
                                             double timeout_s, bool include_png, bool quiet,
                                             Io& io) {
  ProgressBar bar(io.err, io.err_is_terminal, job_id);
  const int64_t start = SteadyMs();
  const int64_t limit_ms = timeout_s > 0 ? static_cast<int64_t>(timeout_s * 1000) : -1;
  ProgressFn on_progress = nullptr;
  if (!quiet) on_progress = [&](const kiln::v1::JobInfo& job) { bar.Update(job); };
  while (true) {
    uint32_t chunk = kWaitChunkMs;
    if (limit_ms >= 0) {
      chunk = static_cast<uint32_t>(
          std::clamp<int64_t>(limit_ms - (SteadyMs() - start), 0, kWaitChunkMs));
    }
    auto job = client.Wait(job_id, chunk, include_png, on_progress);
    if (!job.ok()) {
      if (!quiet) bar.Finish();
      return job.status();
    }
    if (!quiet) bar.Update(*job);
    if (IsTerminal(job->state())) {
      if (!quiet) bar.Finish();
      return job;
    }
    if (limit_ms >= 0 && SteadyMs() - start >= limit_ms) {
      if (!quiet) bar.Finish();
      return absl::DeadlineExceededError(absl::StrFormat("job %s is still %s after %.0fs", job_id,
                                                         JobStateName(job->state()), timeout_s));
    }
  }
}

// Prints a finished job (path, JSON or text) and returns the exit status for it.
int ReportFinishedJob(const kiln::v1::JobInfo& job, const CommandLine& cl, Io& io, bool path_only) {
  const bool ok = job.state() == kiln::v1::JOB_STATE_SUCCEEDED;
  const std::string out = cl.Get("out");
  std::string image;
  if (ok && !out.empty()) {
    if (auto s = WritePng(out, job.png()); !s.ok()) return Fail(io, s);
    image = AbsolutePath(out);
  }
  if (cl.Has("json")) {
    json j = JobToJson(job);
    j["image"] = image;
    io.out << j.dump() << "\n";
  } else if (path_only && ok) {
    io.out << image << "\n";
  } else {
    io.out << FormatJob(job);
    if (!image.empty()) io.out << "image      " << image << "\n";
  }
  if (!ok && IsTerminal(job.state())) {
    io.err << "kiln: job " << job.spec().job_id() << " " << JobStateName(job.state())
           << (job.error().empty() ? "" : ": " + job.error()) << "\n";
    return kExitJobFailed;
  }
  return kExitOk;
}

int CmdGenerate(const CommandLine& cl, Io& io) {
  if (!cl.Has("out")) {
    return UsageError(io, absl::InvalidArgumentError("kiln generate: --out FILE.png is required"),
                      cl.spec);
  }
  auto spec = SpecFromFlags(cl);
  if (!spec.ok()) return UsageError(io, spec.status(), cl.spec);
  auto timeout = cl.GetDouble("timeout", 0);
  if (!timeout.ok()) return UsageError(io, timeout.status(), cl.spec);
  auto client = Connect(cl, io);
  if (!client.ok()) return Fail(io, client.status());
  auto reply = (*client)->Submit(*spec);
  if (!reply.ok()) return Fail(io, reply.status());
  if (!reply->created()) {
    io.err << "kiln: job " << spec->job_id() << " already existed; waiting for it\n";
  }
  auto job = WaitForJob(**client, spec->job_id(), *timeout, /*include_png=*/true,
                        cl.Has("no-progress"), io);
  if (!job.ok()) return Fail(io, job.status());
  return ReportFinishedJob(*job, cl, io, /*path_only=*/true);
}

int CmdSubmit(const CommandLine& cl, Io& io) {
  auto spec = SpecFromFlags(cl);
  if (!spec.ok()) return UsageError(io, spec.status(), cl.spec);
  auto client = Connect(cl, io);
  if (!client.ok()) return Fail(io, client.status());
  auto reply = (*client)->Submit(*spec);
  if (!reply.ok()) return Fail(io, reply.status());
  if (cl.Has("json")) {
    json j = JobToJson(reply->job());
    j["created"] = reply->created();
    io.out << j.dump() << "\n";
  } else {
    io.out << spec->job_id() << "\n";
    if (!reply->created()) {
      io.err << "kiln: job " << spec->job_id() << " already existed (state "
             << JobStateName(reply->job().state()) << "); nothing new was submitted\n";
    }
  }
  return kExitOk;
}

int CmdStatus(const CommandLine& cl, Io& io) {
  auto client = Connect(cl, io);
  if (!client.ok()) return Fail(io, client.status());
  // --json reports png_bytes, the image's real size: ask for the image to count it.
  auto job = (*client)->Status(cl.positional[0], /*include_png=*/cl.Has("out") || cl.Has("json"));
  if (!job.ok()) return Fail(io, job.status());
  if (cl.Has("out") && job->state() == kiln::v1::JOB_STATE_SUCCEEDED) {
    return ReportFinishedJob(*job, cl, io, /*path_only=*/false) == kExitOk ? kExitOk : kExitFailure;
  }
  if (cl.Has("json")) {
    io.out << JobToJson(*job).dump() << "\n";
  } else {
    io.out << FormatJob(*job);
  }
  return kExitOk;
}

int CmdWait(const CommandLine& cl, Io& io) {
  auto timeout = cl.GetDouble("timeout", 0);
  if (!timeout.ok()) return UsageError(io, timeout.status(), cl.spec);
  auto client = Connect(cl, io);
  if (!client.ok()) return Fail(io, client.status());
  auto job = WaitForJob(**client, cl.positional[0], *timeout, /*include_png=*/cl.Has("out"),
                        cl.Has("no-progress"), io);
  if (!job.ok()) return Fail(io, job.status());
  return ReportFinishedJob(*job, cl, io, /*path_only=*/false);
}

int CmdCancel(const CommandLine& cl, Io& io) {
  auto client = Connect(cl, io);
  if (!client.ok()) return Fail(io, client.status());
  auto job = (*client)->Cancel(cl.positional[0]);
  if (!job.ok()) return Fail(io, job.status());
  if (cl.Has("json")) {
    io.out << JobToJson(*job).dump() << "\n";
  } else {
    io.out << job->spec().job_id() << " " << JobStateName(job->state()) << "\n";
  }
  return kExitOk;
}

int CmdNodes(const CommandLine& cl, Io& io) {
  auto client = Connect(cl, io);
  if (!client.ok()) return Fail(io, client.status());
  auto nodes = (*client)->ListNodes();
  if (!nodes.ok()) return Fail(io, nodes.status());
  if (cl.Has("json")) {
    json j = {{"nodes", json::array()}};
    for (const auto& n : nodes->nodes()) j["nodes"].push_back(NodeToJson(n));
    io.out << j.dump() << "\n";
  } else {
    io.out << FormatNodesTable(*nodes, UnixMs());
  }
  return kExitOk;
}

int CmdKeys(const CommandLine& cl, Io& io) {
  if (cl.positional[0] != "new") {
    return UsageError(io,
                      absl::InvalidArgumentError(absl::StrCat(
                          "unknown keys subcommand '", cl.positional[0], "' (want: new NAME)")),
                      cl.spec);
  }
  const std::string& name = cl.positional[1];
  const std::string dir = cl.Get("dir", ".");
  auto pair = NewCurveKeyPair();
  if (!pair.ok()) return Fail(io, pair.status());
  if (auto s = WriteCurveKeyFiles(dir, name, *pair, cl.Has("force")); !s.ok()) {
    return Fail(io, s);
  }
  io.out << dir << "/" << name << ".key (secret, 0600)\n"
         << dir << "/" << name << ".pub  public-key = \"" << pair->public_key << "\"\n";
  return kExitOk;
}

int CmdDrain(const CommandLine& cl, Io& io) {
  auto client = Connect(cl, io);
  if (!client.ok()) return Fail(io, client.status());
  auto node = (*client)->Drain(cl.positional[0]);
  if (!node.ok()) return Fail(io, node.status());
  if (cl.Has("json")) {
    io.out << NodeToJson(*node).dump() << "\n";
  } else {
    io.out << node->info().node_id() << " " << NodeStateName(node->state());
    if (!node->running_jobs().empty()) {
      io.out << " (finishing " << absl::StrJoin(node->running_jobs(), ", ") << ")";
    }
    io.out << "\n";
  }
  return kExitOk;
}

int CmdUncordon(const CommandLine& cl, Io& io) {
  auto client = Connect(cl, io);
  if (!client.ok()) return Fail(io, client.status());
  auto node = (*client)->Uncordon(cl.positional[0]);
  if (!node.ok()) return Fail(io, node.status());
  if (cl.Has("json")) {
    io.out << NodeToJson(*node).dump() << "\n";
  } else {
    io.out << node->info().node_id() << " " << NodeStateName(node->state()) << "\n";
  }
  return kExitOk;
}

int CmdRemoveNode(const CommandLine& cl, Io& io) {
  RemoveNodeOptions options;
  options.state_dir = StateDir(cl);
  options.node_id = cl.positional[0];
  options.force = cl.Has("force");
  auto timeout = cl.GetDouble("timeout", 120);
  if (!timeout.ok()) return UsageError(io, timeout.status(), cl.spec);
  options.grace_ms = static_cast<int>(*timeout * 1000);
  auto client = Connect(cl, io);
  if (!client.ok()) return Fail(io, client.status());
  auto removed = RemoveNode(options, **client, io.err);
  if (!removed.ok()) return Fail(io, removed.status());
  const bool known = !removed->node.info().node_id().empty();
  if (cl.Has("json")) {
    json j = {{"node_id", options.node_id},
              {"node", known ? NodeToJson(removed->node) : json(nullptr)},
              {"requeued_jobs", removed->requeued_jobs},
              {"local", removed->local},
              {"stopped_pid", removed->stopped_pid}};
    io.out << j.dump() << "\n";
  } else {
    io.out << options.node_id << " removed";
    if (removed->stopped_pid > 0) io.out << " (process " << removed->stopped_pid << " stopped)";
    if (!removed->requeued_jobs.empty()) {
      io.out << "; requeued " << absl::StrJoin(removed->requeued_jobs, ", ");
    }
    io.out << "\n";
  }
  const auto state = removed->node.state();
  if (!removed->local &&
      (state == kiln::v1::NODE_STATE_READY || state == kiln::v1::NODE_STATE_DRAINING)) {
    io.err << "kiln: note: " << options.node_id
           << " was live; if its process still runs it registers again at its next heartbeat "
              "(stop it first)\n";
  }
  return kExitOk;
}

absl::StatusOr<std::map<std::string, std::string>> ParseModels(
    const std::vector<std::string>& values) {
  std::map<std::string, std::string> models;
  for (const auto& value : values) {
    for (absl::string_view entry : absl::StrSplit(value, ',', absl::SkipEmpty())) {
      std::pair<std::string, std::string> kv = absl::StrSplit(entry, absl::MaxSplits('=', 1));
      if (kv.first.empty() || kv.second.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("--models: '", entry, "' is not NAME=DIR"));
      }
      models[kv.first] = kv.second;
    }
  }
  if (models.empty()) {
    return absl::InvalidArgumentError(
        "--models NAME=DIR is required, e.g. --models flux-tiny=.kiln/models/flux-tiny");
  }
  return models;
}

std::string ClusterSummary(const ClusterState& s) {
  std::string out =
      absl::StrFormat("kiln: cluster up in %s (%d node%s, %s, %s)\n", s.state_dir, s.nodes.size(),
                      s.nodes.size() == 1 ? "" : "s", s.device, s.precision);
  out += absl::StrFormat("  %-12s pid %-7d clients %s  nodes %s  metrics %s\n", "coordinator",
                         s.coordinator.pid, s.coordinator.client_endpoint,
                         s.coordinator.node_endpoint, s.coordinator.metrics_url);
  for (const auto& n : s.nodes) {
    if (n.state != "up") continue;
    out += absl::StrFormat("  %-12s pid %-7d metrics %s  packages %s\n", n.node_id, n.pid,
                           n.metrics_url, n.package_dir);
  }
  // The coordinator serves its status page and Prometheus service discovery beside /metrics.
  std::string base = s.coordinator.metrics_url;
  if (absl::EndsWith(base, "/metrics")) base.resize(base.size() - std::string("/metrics").size());
  out += absl::StrFormat("  status page  %s/status/\n  prometheus   service discovery %s/sd\n", base,
                         base);
  if (!s.redis_url.empty()) {
    out += absl::StrFormat("  redis        %s%s\n", s.redis_url,
                           s.redis.pid > 0 ? absl::StrFormat(" (pid %d, AOF in %s)", s.redis.pid,
                                                             s.redis.dir)
                                           : std::string(""));
  }
  out += absl::StrFormat("  shared cache %s\n  state        %s (logs in %s/logs)\n", s.shared_cache,
                         ClusterFilePath(s.state_dir), s.state_dir);
  return out;
}

int CmdUp(const CommandLine& cl, Io& io) {
  UpOptions options;
  options.state_dir = StateDir(cl);
  auto nodes = cl.GetInt("nodes", 1, 1, 64);
  auto heartbeat = cl.GetInt("heartbeat-ms", 0, 0, 3600000);
  auto attempts = cl.GetInt("max-attempts", 0, 0, 1000);
  auto max_batch = cl.GetInt("max-batch", 1, 1, 4);
  auto batch_wait = cl.GetInt("batch-wait-ms", 0, 0, 10000);
  auto gpus_per_node = cl.GetInt("gpus-per-node", 1, 1, UpOptions::kMaxGpusPerNode);
  auto start_timeout = cl.GetDouble("start-timeout", 60);
  auto models = ParseModels(cl.All("models"));
  for (const absl::Status& s : {nodes.status(), heartbeat.status(), attempts.status(),
                                max_batch.status(), batch_wait.status(),
                                gpus_per_node.status(), start_timeout.status(),
                                models.status()}) {
    if (!s.ok()) return UsageError(io, s, cl.spec);
  }
  options.nodes = static_cast<int>(*nodes);
  options.heartbeat_ms = static_cast<int>(*heartbeat);
  options.max_attempts = static_cast<int>(*attempts);
  options.max_batch = static_cast<int>(*max_batch);
  options.batch_wait_ms = static_cast<int>(*batch_wait);
  options.gpus_per_node = static_cast<int>(*gpus_per_node);
  options.start_timeout_ms = static_cast<int>(*start_timeout * 1000);
  options.models = *models;
  options.device = cl.Get("device", "cpu");
  if (cl.Has("gpus")) {
    options.gpus = absl::StrSplit(cl.Get("gpus"), ',', absl::SkipWhitespace());
  }
  options.precision = cl.Get("precision", "fp32");
  options.compile = !cl.Has("no-compile");
  options.compile_options = cl.Get("compile-options");
  options.detach = cl.Has("detach");
  options.bin_dir = cl.Get("bin-dir");
  options.redis = cl.Get("redis");
  options.advertise = cl.Get("advertise");
  options.insecure_plaintext = cl.Has("insecure-plaintext");
  if (auto s = options.Validate(); !s.ok()) return UsageError(io, s, cl.spec);
  // Foreground: take Ctrl-C synchronously; block before any thread (ZeroMQ's) exists.
  if (!options.detach) BlockShutdownSignals();
  auto state = StartCluster(options, io.err);
  if (!state.ok()) return Fail(io, state.status());
  if (cl.Has("json")) {
    io.out << state->ToJson().dump() << "\n" << std::flush;
  } else {
    io.out << ClusterSummary(*state);
    io.out << "  try          kiln generate --prompt \"a red fox in fresh snow\" --out fox.png"
           << (options.state_dir == kDefaultStateDir ? "" : " --state-dir " + options.state_dir)
           << "\n"
           << std::flush;
  }
  if (options.detach) return kExitOk;
  io.err << "kiln: running in the foreground; Ctrl-C (or `kiln down`) stops the cluster\n";
  auto s = SuperviseCluster(options, io.err);
  if (!s.ok()) return Fail(io, s);
  io.err << "kiln: cluster stopped\n";
  return kExitOk;
}

int CmdDown(const CommandLine& cl, Io& io) {
  DownOptions options;
  options.state_dir = StateDir(cl);
  auto timeout = cl.GetDouble("timeout", 120);
  if (!timeout.ok()) return UsageError(io, timeout.status(), cl.spec);
  options.grace_ms = static_cast<int>(*timeout * 1000);
  if (auto s = StopCluster(options, io.err); !s.ok()) return Fail(io, s);
  io.out << "kiln: cluster in " << AbsolutePath(options.state_dir) << " is down\n";
  return kExitOk;
}

int CmdAddNode(const CommandLine& cl, Io& io) {
  AddNodeOptions options;
  options.state_dir = StateDir(cl);
  options.fresh = cl.Has("fresh");
  options.node_id = cl.Get("node-id");
  if (cl.Has("gpus")) {
    options.gpus = absl::StrSplit(cl.Get("gpus"), ',', absl::SkipWhitespace());
    if (options.gpus.empty()) {
      return UsageError(io, absl::InvalidArgumentError("--gpus: empty list"), cl.spec);
    }
  }
  auto start_timeout = cl.GetDouble("start-timeout", 60);
  if (!start_timeout.ok()) return UsageError(io, start_timeout.status(), cl.spec);
  options.start_timeout_ms = static_cast<int>(*start_timeout * 1000);
  auto node = AddNode(options, io.err);
  if (!node.ok()) return Fail(io, node.status());
  if (cl.Has("json")) {
    io.out << json{{"node_id", node->node_id},
                   {"pid", node->pid},
                   {"metrics_url", node->metrics_url},
                   {"package_dir", node->package_dir},
                   {"log", node->log}}
                  .dump()
           << "\n";
  } else {
    io.out << absl::StrFormat("%s pid %d metrics %s packages %s%s\n", node->node_id, node->pid,
                              node->metrics_url, node->package_dir,
                              options.fresh ? " (fresh: empty)" : "");
  }
  return kExitOk;
}

int CmdHelp(const CommandLine& cl, Io& io) {
  if (cl.positional.empty()) {
    io.out << Usage();
    return kExitOk;
  }
  const CommandSpec* spec = FindCommand(cl.positional[0]);
  if (spec == nullptr) {
    return UsageError(
        io, absl::InvalidArgumentError(absl::StrCat("unknown command '", cl.positional[0], "'")),
        nullptr);
  }
  io.out << CommandUsage(*spec);
  return kExitOk;
}

}  // namespace

int ExitCodeFor(const absl::Status& status) {
  // The shared policy (common/status.h), for commands against a running system: an error that
  // names a field is bad input; FAILED_PRECONDITION (the cluster is down, the job finished) is not.
  // The coordinator's NOT_FOUND (no such job or node) is its own answer, not a mistake in the
  // command line.
  if (absl::IsNotFound(status) && FromCoordinator(status)) return kExitNotFound;
  return kiln::ExitCodeFor(status, ExitContext::kCommand);
}

void PrintError(std::ostream& err, const absl::Status& status) {
  if (FromCoordinator(status)) {
    const std::string field = ErrorField(status);
    absl::string_view message = status.message();
    // Messages often start with the field name already; say it once.
    if (!field.empty() && absl::StartsWith(message, field + ": ")) {
      message.remove_prefix(field.size() + 2);
    }
    err << "kiln: error: " << StatusCodeName(status.code())
        << (field.empty() ? "" : " (field " + field + ")") << ": " << message << "\n";
  } else {
    err << "kiln: error: " << status.message() << "\n";
  }
}

int Run(const std::vector<std::string>& argv, Io& io) {
  std::vector<std::string> args = argv;
  // The process log (common/log.h) of `kiln` itself; what `kiln` prints for people (results,
  // progress, errors) goes to io.out / io.err as before.
  LogOptions log_options;
  log_options.program = "kiln";
  auto log_format = TakeLogFormat(&args);
  if (!log_format.ok()) return UsageError(io, log_format.status(), nullptr);
  if (!log_format->empty()) {
    auto format = ParseLogFormat(*log_format);
    if (!format.ok()) return UsageError(io, format.status(), nullptr);
    log_options.format = *format;
  }
  ConfigureLogging(std::move(log_options));
  if (args.empty()) {
    io.err << Usage();
    return kExitUsage;
  }
  // --help and --version answer on stdout with status 0, like every kiln executable
  // (common/flags.h); `kiln COMMAND --help` shows that command's usage.
  if (args[0] == "--help" || args[0] == "-h") {
    io.out << Usage();
    return kExitOk;
  }
  if (args[0] == "--version") {
    io.out << VersionText("kiln");
    return kExitOk;
  }
  if (const CommandSpec* spec = FindCommand(args[0]); spec != nullptr) {
    for (size_t i = 1; i < args.size() && args[i] != "--"; ++i) {
      if (args[i] == "--help" || args[i] == "-h") {
        io.out << CommandUsage(*spec);
        return kExitOk;
      }
    }
  }
  auto cl = ParseCommandLine(args);
  if (!cl.ok()) {
    const CommandSpec* spec = FindCommand(args[0]);
    return UsageError(io, cl.status(), spec);
  }
  const std::string& name = cl->spec->name;
  if (name == "up") return CmdUp(*cl, io);
  if (name == "down") return CmdDown(*cl, io);
  if (name == "add-node") return CmdAddNode(*cl, io);
  if (name == "generate") return CmdGenerate(*cl, io);
  if (name == "submit") return CmdSubmit(*cl, io);
  if (name == "status") return CmdStatus(*cl, io);
  if (name == "wait") return CmdWait(*cl, io);
  if (name == "cancel") return CmdCancel(*cl, io);
  if (name == "nodes") return CmdNodes(*cl, io);
  if (name == "drain") return CmdDrain(*cl, io);
  if (name == "uncordon") return CmdUncordon(*cl, io);
  if (name == "remove-node") return CmdRemoveNode(*cl, io);
  if (name == "keys") return CmdKeys(*cl, io);
  if (name == "signing-key") return CmdSigningKey(*cl, io);
  return CmdHelp(*cl, io);
}

int Main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  Io io{std::cout, std::cerr,
        [](const std::string& name) {
          const char* v = std::getenv(name.c_str());
          return std::string(v ? v : "");
        },
        isatty(STDERR_FILENO) == 1};
  return Run(args, io);
}

}  // namespace kiln::cli
