// The local cluster's state file, STATE/cluster.json: every process of a cluster started by
// `kiln up` (endpoints, metrics URLs, pids, logs, package directories), read by `kiln down`,
// `kiln add-node` and by client commands looking for the coordinator. Written atomically (write,
// fsync, rename); read-modify-write under an exclusive lock on STATE/.lock (StateLock).
// Thread-compatible.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/files.h"
#include "nlohmann/json.hpp"

namespace kiln::cli {

inline constexpr int kClusterStateVersion = 1;

struct CoordinatorProcess {
  int pid = 0;                  // 0 once stopped
  std::string client_endpoint;  // clients connect here, e.g. "tcp://127.0.0.1:40123"
  std::string node_endpoint;    // nodes connect here
  std::string metrics_url;      // "http://127.0.0.1:PORT/metrics"
  std::string log;              // STATE/logs/coordinator.log
};

// `kiln up --redis local`: the redis-server the cluster runs (AOF, appendfsync always).
struct RedisProcess {
  int pid = 0;           // 0 once stopped, or when kiln started none
  int port = 0;          // on 127.0.0.1
  std::string dir;       // STATE/redis: the AOF files
  std::string log;       // STATE/logs/redis.log
};

struct NodeProcess {
  std::string node_id;  // "node-1", ...
  int pid = 0;          // 0 once stopped
  std::string metrics_url;
  std::string package_dir;   // STATE/nodes/<id>/packages: the node-local package tier
  std::string status_file;   // STATE/nodes/<id>/status.json, written by kiln-node
  std::string log;           // STATE/logs/<id>.log
  std::string state = "up";  // "up", "stopped", "exited" (found dead)
  // `kiln up --gpus`: the GPU index or MIG UUID this node is given (CUDA_VISIBLE_DEVICES, and
  // --device cuda:0), or with --gpus-per-node N its N indexes ("0,1"; --device cuda --gpus
  // 0,..,N-1); "" for a node on the cluster's device.
  std::string gpu;
};

struct ClusterState {
  int version = kClusterStateVersion;
  std::string state = "up";  // "up" or "down"
  std::string state_dir;     // absolute
  // The shared package tier of every node: STATE/shared-cache, or in cluster mode the Redis URL.
  std::string shared_cache;
  std::string redis_url;  // cluster mode: every coordinator's --redis ("" = jobs in memory)
  // `kiln up --advertise HOST`: the coordinator and the nodes bind every interface and advertise
  // HOST (their --advertise); "" = loopback only.
  std::string advertise;
  std::map<std::string, std::string> models;  // name → absolute model directory
  std::string device = "cpu";
  std::string precision = "fp32";
  int heartbeat_ms = 0;  // 0: the coordinator's default
  int max_batch = 1;      // every node's --max_batch (1: no batching)
  int gpus_per_node = 1;  // `kiln up --gpus-per-node`: each node's ranks (kiln-node --gpus)
  int batch_wait_ms = 0;  // every node's --batch_wait_ms
  bool compile = true;   // nodes may compile missing packages
  std::string compile_options;  // JSON object given to every node (--compile_options); "" = default
  bool detached = false;
  // CURVE keys of this cluster (cli/local_cluster.h: KeysLayout): STATE/keys; "" = plaintext
  // (`kiln up --insecure-plaintext`).
  std::string keys_dir;
  int supervisor_pid = 0;  // the foreground `kiln up`, 0 when detached
  int64_t started_unix_ms = 0;
  int64_t stopped_unix_ms = 0;
  CoordinatorProcess coordinator;
  RedisProcess redis;  // pid 0 unless `kiln up --redis local`
  std::vector<NodeProcess> nodes;

  nlohmann::json ToJson() const;
  // InvalidArgument naming the first missing or mistyped field.
  static absl::StatusOr<ClusterState> FromJson(const nlohmann::json& j);
};

// STATE/cluster.json
std::string ClusterFilePath(const std::string& state_dir);

// NotFound if there is no cluster.json; InvalidArgument if it does not parse.
absl::StatusOr<ClusterState> LoadClusterState(const std::string& state_dir);
// Writes STATE/cluster.json atomically (temporary file, fsync, rename, fsync of the directory).
absl::Status SaveClusterState(const ClusterState& state);

// Writes `contents` to `path` atomically (same steps; common/files.h). Used for cluster.json and
// PNGs.
using kiln::WriteFileAtomically;

// An exclusive flock on STATE/.lock, released on destruction. Serialises `up`, `add-node` and
// `down` of one state directory.
class StateLock {
 public:
  // Blocks up to `timeout_ms`; DeadlineExceeded if another kiln command holds it that long.
  static absl::StatusOr<std::unique_ptr<StateLock>> Acquire(const std::string& state_dir,
                                                            int timeout_ms = 30000);
  ~StateLock();
  StateLock(const StateLock&) = delete;
  StateLock& operator=(const StateLock&) = delete;

 private:
  explicit StateLock(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace kiln::cli
