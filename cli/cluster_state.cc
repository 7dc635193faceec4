#include "cli/cluster_state.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kiln::cli {
namespace {

using nlohmann::json;

absl::Status Errno(const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

// Reads j[key] into *out if present; InvalidArgument naming the field on a type mismatch.
template <typename T>
absl::Status Read(const json& j, const char* key, T* out, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  try {
    *out = it->get<T>();
  } catch (const json::exception&) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, key, ": unexpected type ", it->type_name()));
  }
  return absl::OkStatus();
}

}  // namespace

json ClusterState::ToJson() const {
  json j;
  j["version"] = version;
  j["state"] = state;
  j["state_dir"] = state_dir;
  j["shared_cache"] = shared_cache;
  j["redis_url"] = redis_url;
  j["advertise"] = advertise;
  j["models"] = models;
  j["device"] = device;
  j["precision"] = precision;
  j["heartbeat_ms"] = heartbeat_ms;
  j["max_batch"] = max_batch;
  j["gpus_per_node"] = gpus_per_node;
  j["batch_wait_ms"] = batch_wait_ms;
  j["compile"] = compile;
  j["compile_options"] = compile_options;
  j["keys_dir"] = keys_dir;
  j["detached"] = detached;
  j["supervisor_pid"] = supervisor_pid;
  j["started_unix_ms"] = started_unix_ms;
  j["stopped_unix_ms"] = stopped_unix_ms;
  // Top-level shortcuts for scripts: where clients connect, where nodes connect.
  j["client_endpoint"] = coordinator.client_endpoint;
  j["node_endpoint"] = coordinator.node_endpoint;
  j["coordinator"] = {{"pid", coordinator.pid},
                      {"client_endpoint", coordinator.client_endpoint},
                      {"node_endpoint", coordinator.node_endpoint},
                      {"metrics_url", coordinator.metrics_url},
                      {"log", coordinator.log}};
  j["redis"] = {{"pid", redis.pid}, {"port", redis.port}, {"dir", redis.dir}, {"log", redis.log}};
  j["nodes"] = json::array();
  for (const auto& n : nodes) {
    j["nodes"].push_back({{"node_id", n.node_id},
                          {"pid", n.pid},
                          {"state", n.state},
                          {"metrics_url", n.metrics_url},
                          {"package_dir", n.package_dir},
                          {"status_file", n.status_file},
                          {"log", n.log},
                          {"gpu", n.gpu}});
  }
  return j;
}

absl::StatusOr<ClusterState> ClusterState::FromJson(const json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("cluster.json: not a JSON object");
  ClusterState s;
  const std::string top = "";
  for (auto st :
       {Read(j, "version", &s.version, top), Read(j, "state", &s.state, top),
        Read(j, "state_dir", &s.state_dir, top), Read(j, "shared_cache", &s.shared_cache, top),
        Read(j, "redis_url", &s.redis_url, top), Read(j, "advertise", &s.advertise, top),
        Read(j, "models", &s.models, top), Read(j, "device", &s.device, top),
        Read(j, "precision", &s.precision, top), Read(j, "heartbeat_ms", &s.heartbeat_ms, top),
        Read(j, "max_batch", &s.max_batch, top), Read(j, "batch_wait_ms", &s.batch_wait_ms, top),
        Read(j, "gpus_per_node", &s.gpus_per_node, top),
        Read(j, "compile", &s.compile, top), Read(j, "compile_options", &s.compile_options, top),
        Read(j, "detached", &s.detached, top), Read(j, "keys_dir", &s.keys_dir, top),
        Read(j, "supervisor_pid", &s.supervisor_pid, top),
        Read(j, "started_unix_ms", &s.started_unix_ms, top),
        Read(j, "stopped_unix_ms", &s.stopped_unix_ms, top)}) {
    if (!st.ok()) return st;
  }
  if (s.version != kClusterStateVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("version: ", s.version, " (this kiln reads ", kClusterStateVersion, ")"));
  }
  auto c = j.find("coordinator");
  if (c == j.end() || !c->is_object()) return absl::InvalidArgumentError("coordinator: missing");
  const std::string cw = "coordinator.";
  for (auto st : {Read(*c, "pid", &s.coordinator.pid, cw),
                  Read(*c, "client_endpoint", &s.coordinator.client_endpoint, cw),
                  Read(*c, "node_endpoint", &s.coordinator.node_endpoint, cw),
                  Read(*c, "metrics_url", &s.coordinator.metrics_url, cw),
                  Read(*c, "log", &s.coordinator.log, cw)}) {
    if (!st.ok()) return st;
  }
  if (auto r = j.find("redis"); r != j.end() && !r->is_null()) {
    if (!r->is_object()) return absl::InvalidArgumentError("redis: not an object");
    const std::string rw = "redis.";
    for (auto st : {Read(*r, "pid", &s.redis.pid, rw), Read(*r, "port", &s.redis.port, rw),
                    Read(*r, "dir", &s.redis.dir, rw), Read(*r, "log", &s.redis.log, rw)}) {
      if (!st.ok()) return st;
    }
  }
  auto nodes = j.find("nodes");
  if (nodes != j.end()) {
    if (!nodes->is_array()) return absl::InvalidArgumentError("nodes: not an array");
    for (size_t i = 0; i < nodes->size(); ++i) {
      const json& nj = (*nodes)[i];
      const std::string nw = absl::StrCat("nodes[", i, "].");
      if (!nj.is_object()) return absl::InvalidArgumentError(nw + ": not an object");
      NodeProcess n;
      for (auto st : {Read(nj, "node_id", &n.node_id, nw), Read(nj, "pid", &n.pid, nw),
                      Read(nj, "state", &n.state, nw), Read(nj, "metrics_url", &n.metrics_url, nw),
                      Read(nj, "package_dir", &n.package_dir, nw),
                      Read(nj, "status_file", &n.status_file, nw), Read(nj, "log", &n.log, nw),
                      Read(nj, "gpu", &n.gpu, nw)}) {
        if (!st.ok()) return st;
      }
      if (n.node_id.empty()) return absl::InvalidArgumentError(nw + "node_id: missing");
      s.nodes.push_back(std::move(n));
    }
  }
  return s;
}

std::string ClusterFilePath(const std::string& state_dir) { return state_dir + "/cluster.json"; }

absl::StatusOr<ClusterState> LoadClusterState(const std::string& state_dir) {
  const std::string path = ClusterFilePath(state_dir);
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("no local cluster state at ", path));
  std::stringstream text;
  text << in.rdbuf();
  json j = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not JSON"));
  auto s = ClusterState::FromJson(j);
  if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", s.status().message()));
  return s;
}

absl::Status SaveClusterState(const ClusterState& state) {
  return WriteFileAtomically(ClusterFilePath(state.state_dir), state.ToJson().dump(2) + "\n");
}

absl::StatusOr<std::unique_ptr<StateLock>> StateLock::Acquire(const std::string& state_dir,
                                                              int timeout_ms) {
  const std::string path = state_dir + "/.lock";
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Errno(absl::StrCat("cannot open ", path));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK && errno != EINTR) {
      auto s = Errno(absl::StrCat("cannot lock ", path));
      close(fd);
      return s;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      close(fd);
      return absl::DeadlineExceededError(
          absl::StrCat("another kiln command holds ", path, " (waited ", timeout_ms / 1000, "s)"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return std::unique_ptr<StateLock>(new StateLock(fd));
}

StateLock::~StateLock() {
  flock(fd_, LOCK_UN);
  close(fd_);
}

}  // namespace kiln::cli
