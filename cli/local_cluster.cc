#include "cli/local_cluster.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cli/coordinator_client.h"
#include "cli/process.h"
#include "cli/restart_backoff.h"
#include "common/advertise.h"
#include "cli/signing_key.h"
#include "common/clock.h"
#include "common/files.h"
#include "nlohmann/json.hpp"

namespace kiln::cli {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr char kCoordinatorExe[] = "kiln-coordinator";
constexpr char kNodeExe[] = "kiln-node";
constexpr char kRedisExe[] = "redis-server";
constexpr int kPollMs = 100;

std::string Absolute(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::absolute(path, ec);
  return ec ? path : p.lexically_normal().string();
}

absl::Status MakeDirs(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  return absl::OkStatus();
}

void RemoveFile(const std::string& path) {
  std::error_code ec;
  fs::remove(path, ec);
}

absl::Status WithLog(const absl::Status& status, const std::string& log_path) {
  std::string tail = TailOfFile(log_path, 1500);
  if (tail.empty()) return status;
  return absl::Status(status.code(),
                      absl::StrCat(status.message(), "\n--- last lines of ", log_path, " ---\n",
                                   tail, tail.back() == '\n' ? "" : "\n", "---"));
}

// Waits until `path` holds a JSON object written by process `pid` (kiln-coordinator's endpoints
// file, kiln-node's status file). Fails early, with its log, if the process exits first.
absl::StatusOr<json> WaitForJsonFile(const std::string& path, pid_t pid, const std::string& exe,
                                     const std::string& what, int timeout_ms,
                                     const std::string& log_path) {
  const int64_t deadline = SteadyMs() + timeout_ms;
  while (true) {
    std::ifstream in(path);
    if (in) {
      std::stringstream text;
      text << in.rdbuf();
      json j = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
      if (!j.is_discarded() && j.is_object()) return j;  // else partly written: read again
    }
    if (!ProcessAlive(pid, exe)) {
      return WithLog(
          absl::UnavailableError(absl::StrCat(what, " (pid ", pid, ") exited before it was ready")),
          log_path);
    }
    if (SteadyMs() > deadline) {
      return WithLog(
          absl::DeadlineExceededError(absl::StrFormat("%s (pid %d) did not write %s within %ds",
                                                      what, pid, path, timeout_ms / 1000)),
          log_path);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(kPollMs));
  }
}

std::string JsonString(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : "";
}

absl::Status CheckBinary(const std::string& bin_dir, const char* exe) {
  const std::string path = bin_dir + "/" + exe;
  if (access(path.c_str(), X_OK) != 0) {
    return absl::NotFoundError(absl::StrCat(
        exe, " not found in ", bin_dir,
        " (build it with `make build`, or point --bin-dir at the directory holding it)"));
  }
  return absl::OkStatus();
}

std::string ModelsFlag(const std::map<std::string, std::string>& models) {
  std::vector<std::string> parts;
  for (const auto& [name, dir] : models) parts.push_back(name + "=" + dir);
  return absl::StrJoin(parts, ",");
}

NodeProcess NewNode(const ClusterState& state, const std::string& node_id) {
  NodeProcess n;
  n.node_id = node_id;
  const std::string dir = state.state_dir + "/nodes/" + node_id;
  n.package_dir = dir + "/packages";
  n.status_file = dir + "/status.json";
  n.log = state.state_dir + "/logs/" + node_id + ".log";
  return n;
}

// The absolute path of `exe` on $PATH; NotFound naming the Debian package otherwise.
absl::StatusOr<std::string> FindOnPath(const std::string& exe, const std::string& package) {
  const char* path = std::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path ? path : "/usr/bin:/bin", ':')) {
    if (dir.empty()) continue;
    const std::string candidate = absl::StrCat(dir, "/", exe);
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return absl::NotFoundError(
      absl::StrCat(exe, " is not on PATH (Debian: apt-get install ", package, ")"));
}

// A TCP port on 127.0.0.1 that was free a moment ago.
absl::StatusOr<int> FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  int port = -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  if (port < 0) return absl::InternalError(absl::StrCat("bind: ", std::strerror(errno)));
  return port;
}

// True when a Redis on 127.0.0.1:`port` answers PING.
bool RedisAnswers(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  timeval timeout{0, 200 * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  bool pong = false;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const char ping[] = "PING\r\n";
    char reply[8] = {};
    if (write(fd, ping, sizeof(ping) - 1) == static_cast<ssize_t>(sizeof(ping) - 1)) {
      pong = read(fd, reply, sizeof(reply)) >= 5 && std::strncmp(reply, "+PONG", 5) == 0;
    }
  }
  close(fd);
  return pong;
}

// `--redis local`: starts redis-server on 127.0.0.1 (state->redis.port, or a free port when 0)
// with its AOF under STATE/redis, and waits until it answers PING. A restart reuses port and
// directory, so the AOF brings every job back.
absl::Status StartRedis(bool die_with_parent, int timeout_ms, ClusterState* state) {
  auto exe = FindOnPath(kRedisExe, "redis-server");
  if (!exe.ok()) return exe.status();
  RedisProcess& redis = state->redis;
  redis.dir = state->state_dir + "/redis";
  redis.log = state->state_dir + "/logs/redis.log";
  if (auto s = MakeDirs(redis.dir); !s.ok()) return s;
  if (redis.port == 0) {
    auto port = FreeLoopbackPort();
    if (!port.ok()) return port.status();
    redis.port = *port;
  }
  SpawnOptions spawn;
  // set-proc-title no: the command line stays "redis-server ...", which is how ProcessAlive
  // recognises it.
  spawn.argv = {*exe, "--port", absl::StrCat(redis.port), "--bind", "127.0.0.1", "--dir",
                redis.dir, "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--set-proc-title", "no"};
  spawn.log_path = redis.log;
  spawn.die_with_parent = die_with_parent;
  auto pid = Spawn(spawn);
  if (!pid.ok()) return pid.status();
  redis.pid = *pid;
  const int64_t deadline = SteadyMs() + timeout_ms;
  while (!RedisAnswers(redis.port)) {
    if (!ProcessAlive(redis.pid, kRedisExe)) {
      return WithLog(absl::UnavailableError(absl::StrCat("redis-server (pid ", redis.pid,
                                                         ") exited before it answered")),
                     redis.log);
    }
    if (SteadyMs() > deadline) {
      return WithLog(absl::DeadlineExceededError(absl::StrFormat(
                         "redis-server (pid %d) did not answer on 127.0.0.1:%d within %ds",
                         redis.pid, redis.port, timeout_ms / 1000)),
                     redis.log);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(kPollMs));
  }
  state->redis_url = absl::StrCat("redis://127.0.0.1:", redis.port, "/0");
  return absl::OkStatus();
}

// "http://127.0.0.1:PORT/metrics" → "127.0.0.1:PORT" (the --metrics flag that binds it again).
std::string MetricsAddress(const std::string& url) {
  std::string address = url;
  if (absl::StartsWith(address, "http://")) address = address.substr(7);
  if (const size_t slash = address.find('/'); slash != std::string::npos) address.resize(slash);
  return address;
}

// Starts the coordinator and waits for its endpoints file; fills state->coordinator (pid first,
// then `save` is called so a failure during the wait still leaves the pid in cluster.json).
// `reuse_endpoints`: bind the endpoints state->coordinator records (a restart: nodes and clients
// know them); else free loopback ports.
// Flags that give kiln-coordinator its keys and allowlists, or plaintext.
std::vector<std::string> CoordinatorKeyFlags(const ClusterState& state) {
  if (state.keys_dir.empty()) return {"--insecure_plaintext"};
  const KeyFiles keys(state.keys_dir);
  return {"--key=" + keys.coordinator_key(), "--node_keys=" + keys.node_dir(),
          "--client_keys=" + keys.client_dir(), "--admin_keys=" + keys.admin_dir()};
}

absl::Status StartCoordinator(const std::string& bin_dir, const UpOptions& options,
                              bool reuse_endpoints, int timeout_ms, ClusterState* state,
                              const std::function<absl::Status()>& save) {
  auto& coord = state->coordinator;
  coord.log = state->state_dir + "/logs/coordinator.log";
  const std::string endpoints_file = state->state_dir + "/coordinator.json";
  RemoveFile(endpoints_file);
  std::ofstream(coord.log, std::ios::app)
      << "=== kiln: starting the coordinator at unix ms " << UnixMs() << " ===\n";
  SpawnOptions spawn;
  // With an advertise address: bind every interface, tell others HOST.
  const std::string bind_host = state->advertise.empty() ? "127.0.0.1" : "0.0.0.0";
  if (reuse_endpoints) {
    spawn.argv = {bin_dir + "/" + kCoordinatorExe,
                  "--client_endpoint=" + kiln::WithHost(coord.client_endpoint, bind_host),
                  "--node_endpoint=" + kiln::WithHost(coord.node_endpoint, bind_host),
                  "--metrics=" + MetricsAddress(kiln::WithHost(coord.metrics_url, bind_host))};
  } else {
    spawn.argv = {bin_dir + "/" + kCoordinatorExe, "--client_endpoint=tcp://" + bind_host + ":0",
                  "--node_endpoint=tcp://" + bind_host + ":0", "--metrics=" + bind_host + ":0"};
  }
  if (!state->advertise.empty()) spawn.argv.push_back("--advertise=" + state->advertise);
  spawn.argv.push_back("--endpoints_file=" + endpoints_file);
  for (std::string& flag : CoordinatorKeyFlags(*state)) spawn.argv.push_back(std::move(flag));
  if (!state->redis_url.empty()) spawn.argv.push_back("--redis=" + state->redis_url);
  if (options.heartbeat_ms > 0) {
    spawn.argv.push_back(absl::StrCat("--heartbeat_ms=", options.heartbeat_ms));
  }
  if (options.max_attempts > 0) {
    spawn.argv.push_back(absl::StrCat("--max_attempts=", options.max_attempts));
  }
  spawn.log_path = coord.log;
  spawn.die_with_parent = !options.detach;
  auto pid = Spawn(spawn);
  if (!pid.ok()) return pid.status();
  coord.pid = *pid;
  if (auto s = save(); !s.ok()) return s;
  auto endpoints = WaitForJsonFile(endpoints_file, coord.pid, kCoordinatorExe, "kiln-coordinator",
                                   timeout_ms, coord.log);
  if (!endpoints.ok()) return endpoints.status();
  coord.client_endpoint = JsonString(*endpoints, "client_endpoint");
  coord.node_endpoint = JsonString(*endpoints, "node_endpoint");
  coord.metrics_url = JsonString(*endpoints, "metrics_url");
  if (coord.client_endpoint.empty() || coord.node_endpoint.empty()) {
    return absl::InternalError(absl::StrCat(
        endpoints_file, " lacks client_endpoint or node_endpoint: ", endpoints->dump()));
  }
  return absl::OkStatus();
}

}  // namespace

NodeLaunch NodeLaunchFor(const std::string& bin_dir, const ClusterState& state,
                         const NodeProcess& node) {
  NodeLaunch launch;
  if (!node.gpu.empty()) launch.env["CUDA_VISIBLE_DEVICES"] = node.gpu;
  // A multi-GPU node sees its GPUs as cuda:0..N-1 (or has N CPU ranks) and spreads each job
  // over all of them.
  const int ranks = std::max(1, state.gpus_per_node);
  std::string device = state.device;
  if (!node.gpu.empty()) device = ranks > 1 ? "cuda" : "cuda:0";
  // LibTorch's OpenMP threads spin at the end of each parallel region by default, and several
  // LibTorch processes on one host (the nodes of `kiln up`, their kiln-compile children) burn
  // each other's time slices: a flux-tiny kiln-run beside two CPU-bound processes took 90.8 s
  // spinning and 15.6 s passive on the 2-core development machine (scripts/test.sh sets the same).
  // An operator's own setting is kept.
  if (getenv("OMP_WAIT_POLICY") == nullptr) launch.env["OMP_WAIT_POLICY"] = "PASSIVE";
  std::vector<std::string>& argv = launch.argv;
  argv = {bin_dir + "/" + kNodeExe,
          "--coordinator=" + state.coordinator.node_endpoint,
          "--node_id=" + node.node_id,
          "--models=" + ModelsFlag(state.models),
          "--device=" + device,
          // "bf16,fp8": the first is the nodes' default, and they serve every one listed.
          "--precision=" + state.precision.substr(0, state.precision.find(',')),
          "--package_dir=" + node.package_dir,
          "--shared_cache=" + state.shared_cache,
          state.advertise.empty() ? "--metrics=127.0.0.1:0" : "--metrics=0.0.0.0:0",
          "--status_file=" + node.status_file};
  if (state.precision.find(',') != std::string::npos) argv.push_back("--precisions=" + state.precision);
  if (ranks > 1) {
    std::vector<int> indexes(ranks);
    std::iota(indexes.begin(), indexes.end(), 0);
    argv.push_back("--gpus=" + absl::StrJoin(indexes, ","));
  }
  if (!state.advertise.empty()) argv.push_back("--advertise=" + state.advertise);
  if (state.heartbeat_ms > 0) argv.push_back(absl::StrCat("--heartbeat_ms=", state.heartbeat_ms));
  if (state.max_batch > 1) {
    argv.push_back(absl::StrCat("--max_batch=", state.max_batch));
    argv.push_back(absl::StrCat("--batch_wait_ms=", state.batch_wait_ms));
  }
  // The cluster's package signing key and trust set (made by kiln up): every node signs what it
  // compiles and loads only what the cluster signed.
  if (::access(ClusterSigningKeyPath(state.state_dir).c_str(), R_OK) == 0) {
    argv.push_back("--signing_key=" + ClusterSigningKeyPath(state.state_dir));
    argv.push_back("--trusted_keys=" + ClusterTrustDir(state.state_dir));
  }
  if (!state.compile) argv.push_back("--no_compile");
  if (!state.compile_options.empty()) argv.push_back("--compile_options=" + state.compile_options);
  if (state.keys_dir.empty()) {
    argv.push_back("--insecure_plaintext");
  } else {
    const KeyFiles keys(state.keys_dir);
    argv.push_back("--key=" + keys.node_key(node.node_id));
    argv.push_back("--coordinator_key=" + keys.coordinator_pub());
  }
  return launch;
}

namespace {

// Starts one node process (not yet waited for).
absl::Status SpawnNode(const std::string& bin_dir, const ClusterState& state, NodeProcess* node,
                       bool die_with_parent) {
  if (auto s = MakeDirs(node->package_dir); !s.ok()) return s;
  if (!state.keys_dir.empty()) {
    const KeyFiles keys(state.keys_dir);
    const std::string pub = keys.node_dir() + "/" + node->node_id + ".pub";
    const bool is_new = !fs::exists(pub);
    if (auto s = ProvisionNodeKey(keys, node->node_id); !s.ok()) return s;
    // The coordinator notices a new allowlist file within a second; SIGHUP makes it re-read at
    // once, before the node's first handshake (a refused handshake is not retried).
    if (is_new && state.coordinator.pid > 0) kill(state.coordinator.pid, SIGHUP);
  }
  RemoveFile(node->status_file);
  std::ofstream(node->log, std::ios::app)
      << "=== kiln: starting " << node->node_id << " at unix ms " << UnixMs() << " ===\n";
  SpawnOptions spawn;
  NodeLaunch launch = NodeLaunchFor(bin_dir, state, *node);
  spawn.argv = std::move(launch.argv);
  spawn.env = std::move(launch.env);
  spawn.log_path = node->log;
  spawn.die_with_parent = die_with_parent;
  auto pid = Spawn(spawn);
  if (!pid.ok()) return pid.status();
  node->pid = *pid;
  node->state = "up";
  node->metrics_url.clear();
  return absl::OkStatus();
}

// Waits for the node's status file, then for the coordinator to list it READY.
absl::Status WaitNodeReady(CoordinatorClient& client, NodeProcess* node, int timeout_ms) {
  const int64_t start = SteadyMs();
  auto status =
      WaitForJsonFile(node->status_file, node->pid, kNodeExe, node->node_id, timeout_ms, node->log);
  if (!status.ok()) return status.status();
  node->metrics_url = JsonString(*status, "metrics_url");
  while (true) {
    auto nodes = client.ListNodes();
    if (nodes.ok()) {
      for (const auto& n : nodes->nodes()) {
        if (n.info().node_id() == node->node_id && n.state() == kiln::v1::NODE_STATE_READY) {
          if (node->metrics_url.empty()) node->metrics_url = n.info().metrics_url();
          return absl::OkStatus();
        }
      }
    }
    if (!ProcessAlive(node->pid, kNodeExe)) {
      return WithLog(
          absl::UnavailableError(absl::StrCat(node->node_id, " (pid ", node->pid, ") exited")),
          node->log);
    }
    if (SteadyMs() - start > timeout_ms) {
      return WithLog(absl::DeadlineExceededError(absl::StrFormat(
                         "%s did not register with the coordinator within %ds%s", node->node_id,
                         timeout_ms / 1000,
                         nodes.ok() ? "" : absl::StrCat(" (", nodes.status().message(), ")"))),
                     node->log);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(kPollMs));
  }
}

absl::StatusOr<std::unique_ptr<CoordinatorClient>> ClientFor(const ClusterState& state) {
  ClientOptions options;
  options.endpoint = state.coordinator.client_endpoint;
  auto curve = AdminCurveClient(state);
  if (!curve.ok()) return curve.status();
  options.curve = *curve;
  options.request_timeout_ms = 5000;
  options.failover.retry_for_ms = 0;  // the callers poll in their own loops
  return CoordinatorClient::Connect(options);
}

// Stops every live process of `state` (nodes first), updates `state` in place.
void StopAll(ClusterState& state, int grace_ms, std::ostream& log) {
  std::vector<NodeProcess*> live;
  for (auto& n : state.nodes) {
    if (n.pid > 0 && ProcessAlive(n.pid, kNodeExe)) {
      (void)SignalProcess(n.pid, SIGTERM, kNodeExe);
      live.push_back(&n);
    } else if (n.pid > 0) {
      n.state = n.state == "up" ? "exited" : n.state;
      n.pid = 0;
    }
  }
  if (!live.empty()) {
    std::vector<std::string> ids;
    for (auto* n : live) ids.push_back(n->node_id);
    log << "kiln: stopping " << absl::StrJoin(ids, ", ")
        << " (SIGTERM; each finishes its running job)\n";
  }
  const int64_t start = SteadyMs();
  for (auto* n : live) {
    const int64_t left = std::max<int64_t>(0, grace_ms - (SteadyMs() - start));
    if (!WaitGone(n->pid, static_cast<int>(left), kNodeExe)) {
      log << "kiln: " << n->node_id << " (pid " << n->pid << ") still running after "
          << grace_ms / 1000 << "s: SIGKILL\n";
      (void)SignalProcess(n->pid, SIGKILL, kNodeExe);
      WaitGone(n->pid, 5000, kNodeExe);
    }
    n->pid = 0;
    n->state = "stopped";
  }
  if (state.coordinator.pid > 0) {
    if (ProcessAlive(state.coordinator.pid, kCoordinatorExe)) {
      log << "kiln: stopping the coordinator (pid " << state.coordinator.pid << ")\n";
      if (!StopProcess(state.coordinator.pid, grace_ms, kCoordinatorExe)) {
        log << "kiln: the coordinator did not exit within " << grace_ms / 1000 << "s: killed\n";
      }
    }
    state.coordinator.pid = 0;
  }
  if (state.redis.pid > 0) {
    if (ProcessAlive(state.redis.pid, kRedisExe)) {
      log << "kiln: stopping redis-server (pid " << state.redis.pid << ")\n";
      if (!StopProcess(state.redis.pid, grace_ms, kRedisExe)) {
        log << "kiln: redis-server did not exit within " << grace_ms / 1000 << "s: killed\n";
      }
    }
    state.redis.pid = 0;
  }
  state.state = "down";
  state.supervisor_pid = 0;
  state.stopped_unix_ms = UnixMs();
}

bool AnyAlive(const ClusterState& state) {
  if (ProcessAlive(state.coordinator.pid, kCoordinatorExe)) return true;
  if (ProcessAlive(state.redis.pid, kRedisExe)) return true;
  for (const auto& n : state.nodes) {
    if (ProcessAlive(n.pid, kNodeExe)) return true;
  }
  return false;
}

int NextNodeNumber(const ClusterState& state) {
  int next = 1;
  for (const auto& n : state.nodes) {
    int k = 0;
    if (n.node_id.rfind("node-", 0) == 0 && absl::SimpleAtoi(n.node_id.substr(5), &k)) {
      next = std::max(next, k + 1);
    }
  }
  return next;
}

}  // namespace

int UpOptions::NodeCount() const {
  return gpus.empty() ? nodes : static_cast<int>(gpus.size()) / std::max(1, gpus_per_node);
}

std::string UpOptions::NodeGpus(int i) const {
  if (gpus.empty()) return "";
  const int per = std::max(1, gpus_per_node);
  std::vector<std::string> mine(gpus.begin() + i * per, gpus.begin() + (i + 1) * per);
  return absl::StrJoin(mine, ",");
}

absl::Status UpOptions::Validate() const {
  if (state_dir.empty()) return absl::InvalidArgumentError("state_dir: empty");
  if (nodes < 1 || nodes > 64) {
    return absl::InvalidArgumentError(absl::StrCat("nodes: ", nodes, " is outside 1..64"));
  }
  if (models.empty()) {
    return absl::InvalidArgumentError("models: at least one NAME=DIR is required");
  }
  for (const auto& [name, dir] : models) {
    if (name.empty() || dir.empty()) {
      return absl::InvalidArgumentError("models: each entry must be NAME=DIR");
    }
    if (!fs::is_directory(dir)) {
      return absl::InvalidArgumentError(
          absl::StrCat("models: ", dir, " (model ", name, ") does not exist"));
    }
    if (!fs::exists(dir + "/model_index.json")) {
      return absl::InvalidArgumentError(
          absl::StrCat("models: ", dir, " (model ", name,
                       ") is not a diffusers model repository (no model_index.json)"));
    }
  }
  if (auto s = kiln::ValidateAdvertiseHost(advertise, "advertise"); !s.ok()) return s;
  if (!redis.empty() && redis != "local" && !absl::StartsWith(redis, "redis://")) {
    return absl::InvalidArgumentError(
        absl::StrCat("redis: '", redis, "' is neither redis://HOST:PORT/DB nor local"));
  }
  if (device.empty()) return absl::InvalidArgumentError("device: empty");
  if (gpus_per_node < 1 || gpus_per_node > kMaxGpusPerNode) {
    return absl::InvalidArgumentError(
        absl::StrCat("gpus_per_node: ", gpus_per_node, " is outside 1..", kMaxGpusPerNode));
  }
  if (gpus_per_node > 1 && gpus.empty() && device != "cpu") {
    return absl::InvalidArgumentError(absl::StrCat(
        "gpus_per_node: ", gpus_per_node, " GPUs per node needs --gpus naming them (device ",
        device, "); only a cpu node takes CPU ranks without"));
  }
  if (!gpus.empty()) {
    if (device != "cuda") {
      return absl::InvalidArgumentError("gpus: needs device cuda (each node gets its GPUs)");
    }
    const int count = static_cast<int>(gpus.size());
    if (count % gpus_per_node != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "gpus: ", count, " GPUs do not make whole nodes of ", gpus_per_node,
          " (--gpus-per-node)"));
    }
    if (nodes != 1 && nodes != count / gpus_per_node) {
      return absl::InvalidArgumentError(absl::StrCat(
          "nodes: ", nodes, " nodes for ", count, " GPUs (--gpus starts one node per ",
          gpus_per_node == 1 ? std::string("GPU") : absl::StrCat(gpus_per_node, " GPUs"), ")"));
    }
    if (auto s = ValidateGpuEntries(gpus, gpus_per_node); !s.ok()) return s;
  }
  if (heartbeat_ms < 0) return absl::InvalidArgumentError("heartbeat_ms: negative");
  if (max_attempts < 0) return absl::InvalidArgumentError("max_attempts: negative");
  if (start_timeout_ms <= 0) return absl::InvalidArgumentError("start_timeout_ms: not positive");
  if (!compile_options.empty() &&
      !json::parse(compile_options, nullptr, /*allow_exceptions=*/false).is_object()) {
    return absl::InvalidArgumentError("compile_options: not a JSON object");
  }
  return absl::OkStatus();
}

absl::Status ValidateGpuEntries(const std::vector<std::string>& gpus, int gpus_per_node) {
  std::set<std::string> seen;
  for (const std::string& g : gpus) {
    const bool index = !g.empty() && std::all_of(g.begin(), g.end(), ::isdigit);
    const bool uuid = absl::StartsWith(g, "MIG-") || absl::StartsWith(g, "GPU-");
    if (!index && !uuid) {
      return absl::InvalidArgumentError(
          absl::StrCat("gpus: '", g, "' is neither a GPU index nor a GPU-/MIG- UUID"));
    }
    if (!seen.insert(g).second) {
      return absl::InvalidArgumentError(absl::StrCat("gpus: ", g, " twice"));
    }
    if (gpus_per_node > 1 && absl::StartsWith(g, "MIG-")) {
      return absl::InvalidArgumentError(absl::StrCat(
          "gpus: ", g, " is a MIG slice; a node over several GPUs (--gpus-per-node ",
          gpus_per_node, ") needs whole GPUs (CUDA shows a process one MIG slice)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> AddNodeGpus(const ClusterState& state, const std::string& node_id,
                                        const std::vector<std::string>& gpus,
                                        const std::function<bool(const NodeProcess&)>& running) {
  const int per = std::max(1, state.gpus_per_node);
  std::vector<std::string> held;  // "GPU (node)" of the other nodes, for the message
  bool gpu_cluster = false;
  std::string previous;  // the GPUs cluster.json gives node_id
  std::map<std::string, std::string> owner;  // GPU → the running node that has it
  for (const NodeProcess& n : state.nodes) {
    if (n.gpu.empty()) continue;
    gpu_cluster = true;
    if (n.node_id == node_id) {
      previous = n.gpu;
      continue;
    }
    if (!running(n)) continue;
    held.push_back(absl::StrCat(n.gpu, " (", n.node_id, ")"));
    for (absl::string_view g : absl::StrSplit(n.gpu, ',')) owner[std::string(g)] = n.node_id;
  }
  const std::string per_text = per == 1 ? "one GPU" : absl::StrCat(per, " GPUs");
  if (gpus.empty()) {
    if (!gpu_cluster || !previous.empty()) return previous;
    return absl::InvalidArgumentError(absl::StrCat(
        "gpus: the cluster in ", state.state_dir, " gives each node its GPUs (kiln up --gpus; ",
        "in use: ", held.empty() ? std::string("none") : absl::StrJoin(held, ", "),
        "); name the new node's ", per_text, " with --gpus, or it would share GPU 0 with "
        "another node"));
  }
  if (state.device != "cuda" && !absl::StartsWith(state.device, "cuda:")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gpus: the cluster in ", state.state_dir, " runs on device ", state.device,
        "; --gpus needs a cuda cluster (kiln up --device cuda)"));
  }
  if (static_cast<int>(gpus.size()) != per) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gpus: ", gpus.size(), " GPUs named; each node of this cluster has ", per_text,
        " (kiln up --gpus-per-node ", per, ")"));
  }
  if (auto s = ValidateGpuEntries(gpus, per); !s.ok()) return s;
  for (const std::string& g : gpus) {
    if (auto it = owner.find(g); it != owner.end()) {
      return absl::InvalidArgumentError(absl::StrCat("gpus: GPU ", g, " is already given to ",
                                                     it->second, ", which is running"));
    }
  }
  return absl::StrJoin(gpus, ",");
}

std::string DefaultBinDir() { return kiln::ExecutableDir(); }

absl::Status ProvisionClusterKeys(const KeyFiles& keys) {
  std::error_code ec;
  fs::create_directories(fs::path(keys.dir).parent_path(), ec);  // the state directory
  for (const std::string& dir : {keys.dir, keys.node_dir(), keys.client_dir(), keys.admin_dir()}) {
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
      return absl::ErrnoToStatus(errno, absl::StrCat("cannot create ", dir));
    }
  }
  for (auto [dir, name] : {std::pair{keys.dir, "coordinator"}, std::pair{keys.admin_dir(), "admin"}}) {
    if (fs::exists(absl::StrCat(dir, "/", name, ".key"))) continue;
    auto pair = NewCurveKeyPair();
    if (!pair.ok()) return pair.status();
    if (auto s = WriteCurveKeyFiles(dir, name, *pair, /*overwrite=*/true); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status ProvisionNodeKey(const KeyFiles& keys, const std::string& node_id) {
  if (fs::exists(keys.node_key(node_id))) return absl::OkStatus();
  auto pair = NewCurveKeyPair();
  if (!pair.ok()) return pair.status();
  return WriteCurveKeyFiles(keys.node_dir(), node_id, *pair, /*overwrite=*/true);
}

absl::StatusOr<CurveClient> AdminCurveClient(const ClusterState& state) {
  if (state.keys_dir.empty()) return CurveClient{};
  const KeyFiles keys(state.keys_dir);
  return LoadCurveClient(keys.admin_key(), keys.coordinator_pub());
}

absl::StatusOr<ClusterState> StartCluster(const UpOptions& options, std::ostream& log) {
  if (auto s = options.Validate(); !s.ok()) return s;
  const std::string bin_dir = Absolute(options.bin_dir.empty() ? DefaultBinDir() : options.bin_dir);
  for (const char* exe : {kCoordinatorExe, kNodeExe}) {
    if (auto s = CheckBinary(bin_dir, exe); !s.ok()) return s;
  }
  ClusterState state;
  state.state_dir = Absolute(options.state_dir);
  const bool local_redis = options.redis == "local";
  state.redis_url = local_redis ? "" : options.redis;
  state.advertise = options.advertise;
  state.shared_cache =
      options.redis.empty() ? state.state_dir + "/shared-cache" : state.redis_url;  // redis: below
  for (const auto& [name, dir] : options.models) state.models[name] = Absolute(dir);
  state.device = options.device;
  state.precision = options.precision;
  state.heartbeat_ms = options.heartbeat_ms;
  state.max_batch = options.max_batch;
  state.gpus_per_node = options.gpus_per_node;
  state.batch_wait_ms = options.batch_wait_ms;
  state.compile = options.compile;
  state.compile_options = options.compile_options;
  state.detached = options.detach;
  if (!options.insecure_plaintext) {
    state.keys_dir = state.state_dir + "/keys";
    if (auto s = ProvisionClusterKeys(KeyFiles(state.keys_dir)); !s.ok()) return s;
  } else {
    log << "kiln: WARNING: --insecure-plaintext: no encryption and no authentication; anyone "
           "who reaches the ports can act as a client (admin) or a node\n";
  }
  state.supervisor_pid = options.detach ? 0 : getpid();
  state.started_unix_ms = UnixMs();
  state.state = "starting";
  if (auto s = MakeDirs(state.state_dir + "/logs"); !s.ok()) return s;
  if (options.redis.empty()) {
    if (auto s = MakeDirs(state.shared_cache); !s.ok()) return s;
  }
  if (auto s = EnsureClusterSigningKey(state.state_dir); !s.ok()) return s;
  auto lock = StateLock::Acquire(state.state_dir);
  if (!lock.ok()) return lock.status();
  if (auto old = LoadClusterState(state.state_dir); old.ok() && AnyAlive(*old)) {
    return absl::FailedPreconditionError(
        absl::StrCat("a cluster is already running in ", state.state_dir, " (coordinator pid ",
                     old->coordinator.pid, ", clients at ", old->coordinator.client_endpoint,
                     "); stop it first with `kiln down --state-dir ", state.state_dir, "`"));
  }

  auto fail = [&](absl::Status status) -> absl::Status {
    log << "kiln: start failed; stopping what was started\n";
    StopAll(state, 10000, log);
    (void)SaveClusterState(state);
    return status;
  };
  if (local_redis) {
    auto started = StartRedis(!options.detach, options.start_timeout_ms, &state);
    (void)SaveClusterState(state);
    if (!started.ok()) return fail(started);
    state.shared_cache = state.redis_url;
    log << "kiln: redis-server up (pid " << state.redis.pid << ", " << state.redis_url
        << ", AOF in " << state.redis.dir << ")\n";
  }
  if (!state.keys_dir.empty()) {  // the first nodes' keys are in the allowlist from the start
    for (int i = 1; i <= options.NodeCount(); ++i) {
      if (auto s = ProvisionNodeKey(KeyFiles(state.keys_dir), absl::StrCat("node-", i)); !s.ok()) {
        return s;
      }
    }
  }
  if (auto s = StartCoordinator(bin_dir, options, /*reuse_endpoints=*/false,
                                options.start_timeout_ms, &state, [&] {
                                  return SaveClusterState(state);
                                });
      !s.ok()) {
    return fail(s);
  }
  log << "kiln: coordinator up (pid " << state.coordinator.pid << ", clients at "
      << state.coordinator.client_endpoint << ")\n";
  if (auto s = SaveClusterState(state); !s.ok()) return fail(s);

  // Nodes: start them all, then wait for each to register.
  for (int i = 1; i <= options.NodeCount(); ++i) {
    state.nodes.push_back(NewNode(state, absl::StrCat("node-", i)));
    state.nodes.back().gpu = options.NodeGpus(i - 1);
    if (auto s = SpawnNode(bin_dir, state, &state.nodes.back(), !options.detach); !s.ok()) {
      return fail(s);
    }
  }
  if (auto s = SaveClusterState(state); !s.ok()) return fail(s);
  auto client = ClientFor(state);
  if (!client.ok()) return fail(client.status());
  for (auto& node : state.nodes) {
    if (auto s = WaitNodeReady(**client, &node, options.start_timeout_ms); !s.ok()) {
      return fail(s);
    }
    log << "kiln: " << node.node_id << " registered (pid " << node.pid << ")\n";
  }
  state.state = "up";
  if (auto s = SaveClusterState(state); !s.ok()) return fail(s);
  return state;
}

absl::StatusOr<NodeProcess> AddNode(const AddNodeOptions& options, std::ostream& log) {
  const std::string state_dir = Absolute(options.state_dir);
  const std::string bin_dir = Absolute(options.bin_dir.empty() ? DefaultBinDir() : options.bin_dir);
  if (!fs::exists(ClusterFilePath(state_dir))) {
    return absl::FailedPreconditionError(
        absl::StrCat("no local cluster in ", state_dir, " (start one with `kiln up`)"));
  }
  auto lock = StateLock::Acquire(state_dir);
  if (!lock.ok()) return lock.status();
  auto state = LoadClusterState(state_dir);
  if (!state.ok()) return state.status();
  const std::string node_id =
      options.node_id.empty() ? absl::StrCat("node-", NextNodeNumber(*state)) : options.node_id;
  // The command line's mistakes first, before what the machine lacks.
  auto gpu = AddNodeGpus(*state, node_id, options.gpus,
                         [](const NodeProcess& n) { return ProcessAlive(n.pid, kNodeExe); });
  if (!gpu.ok()) return gpu.status();
  if (auto s = CheckBinary(bin_dir, kNodeExe); !s.ok()) return s;
  if (state->state != "up" || !ProcessAlive(state->coordinator.pid, kCoordinatorExe)) {
    return absl::FailedPreconditionError(
        absl::StrCat("the cluster in ", state_dir, " is not running (start it with `kiln up`)"));
  }
  for (const auto& n : state->nodes) {
    if (n.node_id == node_id && ProcessAlive(n.pid, kNodeExe)) {
      return absl::AlreadyExistsError(
          absl::StrCat(node_id, " is already running (pid ", n.pid, ")"));
    }
  }
  NodeProcess node = NewNode(*state, node_id);
  node.gpu = *gpu;
  if (options.fresh) {
    std::error_code ec;
    fs::remove_all(node.package_dir, ec);
    if (ec) {
      return absl::InternalError(
          absl::StrCat("cannot empty ", node.package_dir, ": ", ec.message()));
    }
  }
  // Not tied to this short-lived process: the node lives until `kiln down`.
  if (auto s = SpawnNode(bin_dir, *state, &node, /*die_with_parent=*/false); !s.ok()) return s;
  auto client = ClientFor(*state);
  absl::Status ready =
      client.ok() ? WaitNodeReady(**client, &node, options.start_timeout_ms) : client.status();
  if (!ready.ok()) {
    StopProcess(node.pid, 5000, kNodeExe);
    return ready;
  }
  auto& nodes = state->nodes;
  nodes.erase(std::remove_if(nodes.begin(), nodes.end(),
                             [&](const NodeProcess& n) { return n.node_id == node_id; }),
              nodes.end());
  nodes.push_back(node);
  if (auto s = SaveClusterState(*state); !s.ok()) return s;
  log << "kiln: " << node_id << " registered (pid " << node.pid << ")\n";
  return node;
}

absl::StatusOr<RemovedNode> RemoveNode(const RemoveNodeOptions& options, CoordinatorClient& client,
                                       std::ostream& log) {
  const std::string state_dir = Absolute(options.state_dir);
  const std::string& id = options.node_id;
  RemovedNode removed;
  std::unique_ptr<StateLock> lock;
  std::optional<ClusterState> state;
  if (fs::exists(ClusterFilePath(state_dir))) {
    auto acquired = StateLock::Acquire(state_dir);
    if (!acquired.ok()) return acquired.status();
    lock = std::move(*acquired);
    auto loaded = LoadClusterState(state_dir);
    if (!loaded.ok()) return loaded.status();
    state = std::move(*loaded);
  }
  auto local = state ? std::find_if(state->nodes.begin(), state->nodes.end(),
                                    [&](const NodeProcess& n) { return n.node_id == id; })
                     : std::vector<NodeProcess>::iterator();
  removed.local = state && local != state->nodes.end();
  if (removed.local) {
    // Refuse before touching the process when the coordinator would refuse (running jobs).
    auto nodes = client.ListNodes();
    if (!nodes.ok()) return nodes.status();
    for (const auto& n : nodes->nodes()) {
      if (n.info().node_id() != id) continue;
      if (!options.force && !n.running_jobs().empty()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "node ", id, " is running ", n.running_jobs_size(), " job(s) (",
            absl::StrJoin(n.running_jobs(), ", "),
            "); drain it and wait for them, or pass --force to requeue them"));
      }
      if (n.state() == kiln::v1::NODE_STATE_READY) (void)client.Drain(id);  // no new jobs
    }
    const NodeProcess process = *local;
    state->nodes.erase(local);
    if (auto s = SaveClusterState(*state); !s.ok()) return s;
    if (process.pid > 0 && ProcessAlive(process.pid, kNodeExe)) {
      removed.stopped_pid = process.pid;
      if (options.force) {
        log << "kiln: stopping " << id << " (pid " << process.pid << ", SIGKILL: --force)\n";
        (void)SignalProcess(process.pid, SIGKILL, kNodeExe);
        WaitGone(process.pid, 5000, kNodeExe);
      } else {
        log << "kiln: stopping " << id << " (pid " << process.pid << ", SIGTERM)\n";
        if (!StopProcess(process.pid, options.grace_ms, kNodeExe)) {
          log << "kiln: " << id << " did not exit within " << options.grace_ms / 1000
              << "s: killed\n";
        }
      }
    }
  }
  auto reply = client.RemoveNode(id, options.force);
  if (!reply.ok()) {
    // A local node the coordinator never saw (or already forgot): removing it locally is enough.
    if (removed.local && absl::IsNotFound(reply.status())) return removed;
    return reply.status();
  }
  removed.node = reply->node();
  removed.requeued_jobs.assign(reply->requeued_jobs().begin(), reply->requeued_jobs().end());
  return removed;
}

absl::Status StopCluster(const DownOptions& options, std::ostream& log) {
  const std::string state_dir = Absolute(options.state_dir);
  if (!fs::exists(ClusterFilePath(state_dir))) {
    return absl::NotFoundError(absl::StrCat("no local cluster in ", state_dir));
  }
  auto lock = StateLock::Acquire(state_dir);
  if (!lock.ok()) return lock.status();
  auto state = LoadClusterState(state_dir);
  if (!state.ok()) return state.status();
  if (!AnyAlive(*state)) {
    log << "kiln: no cluster is running in " << state_dir << "\n";
  }
  StopAll(*state, options.grace_ms, log);
  return SaveClusterState(*state);
}

void BlockShutdownSignals() {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGCHLD}) sigaddset(&set, sig);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

absl::Status SuperviseCluster(const UpOptions& options, std::ostream& log) {
  const std::string state_dir = Absolute(options.state_dir);
  const std::string bin_dir = Absolute(options.bin_dir.empty() ? DefaultBinDir() : options.bin_dir);
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGCHLD}) sigaddset(&set, sig);
  // Per child ("coordinator" or a node id): its backoff, when it (re)started, when it restarts.
  struct Child {
    RestartBackoff backoff;
    int64_t started_ms = SteadyMs();
    int64_t restart_at_ms = -1;  // >= 0: dead, restart then
  };
  std::map<std::string, Child> children;
  while (true) {
    timespec wait = {0, 200 * 1000 * 1000};
    const int sig = sigtimedwait(&set, nullptr, &wait);
    if (sig == SIGINT || sig == SIGTERM || sig == SIGHUP) {
      log << "\nkiln: " << (sig == SIGINT ? "interrupted" : "terminated")
          << "; stopping the cluster\n";
      DownOptions down;
      down.state_dir = state_dir;
      return StopCluster(down, log);
    }
    auto lock = StateLock::Acquire(state_dir);
    if (!lock.ok()) continue;
    auto state = LoadClusterState(state_dir);
    if (!state.ok()) return state.status();
    if (state->state == "down") {
      log << "kiln: the cluster was stopped (kiln down)\n";
      return absl::OkStatus();
    }
    const int64_t now = SteadyMs();
    bool changed = false;
    // A dead child is restarted after its backoff; the restarted pid goes into cluster.json, so
    // `kiln down` and client commands follow it.
    auto due = [&](const std::string& name, bool alive, const std::string& what, int pid,
                   const std::string& log_path) {
      Child& child = children[name];
      if (alive) return false;
      if (child.restart_at_ms < 0) {
        const int64_t delay = child.backoff.OnExit(child.started_ms, now);
        child.restart_at_ms = now + delay;
        log << absl::StrFormat("kiln: %s (pid %d) exited; restarting it in %.1fs (its log: %s)\n",
                               what, pid, delay / 1000.0, log_path);
      }
      if (now < child.restart_at_ms) return false;
      child.restart_at_ms = -1;
      child.started_ms = now;
      return true;
    };
    auto& redis = state->redis;
    if (redis.pid > 0 || redis.port > 0) {
      if (due("redis", redis.pid > 0 && ProcessAlive(redis.pid, kRedisExe), "redis-server",
              redis.pid, redis.log)) {
        // Same port and directory: the AOF brings every job back.
        if (auto s = StartRedis(/*die_with_parent=*/true, 15000, &*state); s.ok()) {
          log << "kiln: redis-server restarted (pid " << redis.pid << ")\n";
        } else {
          log << "kiln: restarting redis-server failed: " << s.message() << "\n";
          if (redis.pid > 0) StopProcess(redis.pid, 1000, kRedisExe);
          redis.pid = 0;
        }
        changed = true;
      }
    }
    auto& coord = state->coordinator;
    if (due("coordinator", coord.pid > 0 && ProcessAlive(coord.pid, kCoordinatorExe),
            "the coordinator", coord.pid, coord.log)) {
      // Same endpoints: the nodes and clients reconnect to them on their own.
      auto s = StartCoordinator(bin_dir, options, /*reuse_endpoints=*/true, 15000, &*state,
                                [] { return absl::OkStatus(); });
      if (s.ok()) {
        log << "kiln: coordinator restarted (pid " << coord.pid << ", clients at "
            << coord.client_endpoint << ")\n";
      } else {
        log << "kiln: restarting the coordinator failed: " << s.message() << "\n";
        if (coord.pid > 0) StopProcess(coord.pid, 1000, kCoordinatorExe);
        coord.pid = 0;
      }
      changed = true;
    }
    for (auto& n : state->nodes) {
      if (n.state == "stopped") continue;  // stopped on purpose
      if (!due(n.node_id, n.pid > 0 && ProcessAlive(n.pid, kNodeExe), n.node_id, n.pid, n.log)) {
        // A restarted node writes its status file once registered: record its metrics URL.
        if (n.metrics_url.empty() && n.pid > 0) {
          std::ifstream in(n.status_file);
          std::stringstream text;
          text << in.rdbuf();
          json j = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
          if (!j.is_discarded() && j.is_object() && !JsonString(j, "metrics_url").empty()) {
            n.metrics_url = JsonString(j, "metrics_url");
            changed = true;
          }
        }
        continue;
      }
      if (auto s = SpawnNode(bin_dir, *state, &n, /*die_with_parent=*/true); s.ok()) {
        log << "kiln: " << n.node_id << " restarted (pid " << n.pid << ")\n";
      } else {
        log << "kiln: restarting " << n.node_id << " failed: " << s.message() << "\n";
        n.pid = 0;
        n.state = "exited";
      }
      changed = true;
    }
    if (changed) (void)SaveClusterState(*state);
  }
}

}  // namespace kiln::cli
