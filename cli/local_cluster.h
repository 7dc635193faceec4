// A local cluster on this machine: one kiln-coordinator and N kiln-node child processes sharing
// one package cache, all described by STATE/cluster.json (cli/cluster_state.h). This is what
// `kiln up`, `kiln add-node`, `kiln remove-node` and `kiln down` do; the commands only parse flags and print.
//
// Layout of the state directory:
//   STATE/cluster.json                 every endpoint, metrics URL and pid
//   STATE/coordinator.json             written by kiln-coordinator once bound
//   STATE/shared-cache/                the shared package tier (every node)
//   STATE/nodes/<id>/packages/         one node's local package tier
//   STATE/nodes/<id>/status.json       written by kiln-node once registered
//   STATE/logs/<coordinator|id>.log    each process's stdout and stderr
//   STATE/redis/                       `--redis local`: redis-server's AOF (logs/redis.log)
//
// Called from the main thread of `kiln`. Progress lines go to the `log` stream given.
#pragma once

#include <map>
#include <ostream>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cli/cluster_state.h"
#include "cli/coordinator_client.h"
#include "common/proto/kiln.pb.h"
#include "common/curve_keys.h"

namespace kiln::cli {

struct UpOptions {
  std::string state_dir = ".kiln/cluster";
  int nodes = 1;                              // kiln-node processes to start, >= 1
  std::map<std::string, std::string> models;  // name → model directory; at least one
  std::string device = "cpu";                 // every node's device
  // One node per entry, each given that GPU alone: a CUDA index ("0") or a MIG instance UUID
  // ("MIG-..."), as CUDA_VISIBLE_DEVICES takes them. Needs device "cuda"; then `nodes` is the
  // number of entries (a `nodes` other than 1 must match it).
  std::vector<std::string> gpus;
  // GPUs per node (kiln-node --gpus: one multi-GPU node, sequence parallel; node/README.md), 1..
  // kMaxGpusPerNode. With `gpus`: each run of this many consecutive entries makes one node (no
  // MIG slices: CUDA shows a process one), `nodes` = entries / this. With device "cpu" and no
  // `gpus`: each node has this many CPU ranks (tests and development).
  int gpus_per_node = 1;
  static constexpr int kMaxGpusPerNode = 16;
  std::string precision = "fp32";             // every node's default precision
  int heartbeat_ms = 0;                       // 0: the coordinator's default
  // Every node's batching (kiln-node --max_batch, --batch_wait_ms; node/README.md): 1 = none.
  int max_batch = 1;
  int batch_wait_ms = 0;
  int max_attempts = 0;                       // 0: the coordinator's default
  bool compile = true;                        // nodes may compile packages no tier holds
  std::string compile_options;                // every node's --compile_options JSON; "" = default
  bool detach = false;                        // false: children die with this process
  int start_timeout_ms = 60000;               // per process, until bound / registered
  std::string bin_dir;                        // holds kiln-coordinator and kiln-node
  // Cluster mode: "" keeps jobs in the coordinator's memory; "redis://HOST:PORT/DB" runs the
  // coordinator with --redis and the nodes with that Redis as their shared package tier;
  // "local" does the same with a redis-server started under STATE/redis (AOF, appendfsync
  // always), supervised like the others and stopped by `kiln down`.
  std::string redis;
  // A host name or IPv4 address other hosts reach this one at: the coordinator and the nodes
  // bind every interface (0.0.0.0) and advertise HOST in their endpoints, registration and
  // metrics URLs (their --advertise). "" binds and advertises 127.0.0.1 only.
  std::string advertise;
  // false: CURVE keys made under STATE/keys (KeyFiles) and used by every process; true: plaintext
  // (no authentication; development only).
  bool insecure_plaintext = false;

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;
  // Nodes to start: `nodes`, or with `gpus` one per gpus_per_node of them. Valid options only.
  int NodeCount() const;
  // Node `i`'s (0-based) NodeProcess.gpu: its gpus_per_node entries of `gpus`, comma-separated
  // ("" without `gpus`). Valid options only.
  std::string NodeGpus(int i) const;
};

// A local cluster's CURVE keys, all under ClusterState.keys_dir (STATE/keys, mode 0700):
//   coordinator.key / coordinator.pub   the coordinator's pair
//   nodes/<node id>.key / .pub          one pair per node; nodes/ is the node allowlist
//   admins/admin.key / .pub             the local user's key; admins/ is the admin allowlist
//   clients/                            the client allowlist (empty; `kiln keys new NAME --dir
//                                       STATE/keys/clients` adds a client without a restart)
struct KeyFiles {
  explicit KeyFiles(std::string dir) : dir(std::move(dir)) {}
  std::string dir;
  std::string coordinator_key() const { return dir + "/coordinator.key"; }
  std::string coordinator_pub() const { return dir + "/coordinator.pub"; }
  std::string node_dir() const { return dir + "/nodes"; }
  std::string node_key(const std::string& node_id) const { return node_dir() + "/" + node_id + ".key"; }
  std::string client_dir() const { return dir + "/clients"; }
  std::string admin_dir() const { return dir + "/admins"; }
  std::string admin_key() const { return admin_dir() + "/admin.key"; }
};
// Creates the directories and the coordinator's and admin's pairs that are missing (kept across
// restarts of the cluster).
absl::Status ProvisionClusterKeys(const KeyFiles& keys);
// Creates nodes/<node_id>.key/.pub if missing.
absl::Status ProvisionNodeKey(const KeyFiles& keys, const std::string& node_id);
// The admin's client side for `state` (disabled for a plaintext cluster).
absl::StatusOr<CurveClient> AdminCurveClient(const ClusterState& state);

struct AddNodeOptions {
  std::string state_dir = ".kiln/cluster";
  std::string node_id;  // "" → node-<next number>
  // The new node's GPUs (kiln add-node --gpus; AddNodeGpus): the cluster's gpus_per_node of
  // them, as UpOptions.gpus takes them. Empty: none named.
  std::vector<std::string> gpus;
  bool fresh = false;   // empty the node's local package directory first
  int start_timeout_ms = 60000;
  std::string bin_dir;
};

struct RemoveNodeOptions {
  std::string state_dir = ".kiln/cluster";
  std::string node_id;
  bool force = false;     // remove it while jobs run on it: they are requeued
  int grace_ms = 120000;  // without force: SIGTERM → exit, else SIGKILL
};

// What `kiln remove-node` did.
struct RemovedNode {
  kiln::v1::NodeStatus node;               // the coordinator's entry as it was ("" id: none)
  std::vector<std::string> requeued_jobs;  // with force: the jobs taken off it
  bool local = false;                      // it was a process of the local cluster
  int stopped_pid = 0;                     // the process stopped (0: none was running)
};

// Removes a node from the coordinator's table (RemoveNodeRequest). When the node is a process of
// the local cluster in `state_dir` it is first drained, taken out of cluster.json (a foreground
// `kiln up` does not restart it) and stopped: SIGTERM (it deregisters), or with force SIGKILL
// (its jobs are requeued). FailedPrecondition, with nothing changed, while jobs run on it and
// force is not set. NotFound when neither the coordinator nor the local cluster knows it. A node
// that is not local and still runs registers again at its next heartbeat: stop it first.
absl::StatusOr<RemovedNode> RemoveNode(const RemoveNodeOptions& options, CoordinatorClient& client,
                                       std::ostream& log);

struct DownOptions {
  std::string state_dir = ".kiln/cluster";
  int grace_ms = 120000;  // per process: SIGTERM → exit, else SIGKILL
};

// How a node process is started: its argv and what it adds to the environment. A node with a
// `gpu` gets CUDA_VISIBLE_DEVICES=<gpu> and --device=cuda:0 (the one device it sees).
struct NodeLaunch {
  std::vector<std::string> argv;
  std::map<std::string, std::string> env;
};
NodeLaunch NodeLaunchFor(const std::string& bin_dir, const ClusterState& state,
                         const NodeProcess& node);

// The directory holding this `kiln` executable (where kiln-coordinator and kiln-node are built).
std::string DefaultBinDir();

// Starts the coordinator, then the nodes; returns once every node is READY in ListNodes and
// cluster.json says "up". FailedPrecondition if a cluster is already running in the state
// directory; NotFound if a binary is missing; on any failure whatever was started is stopped
// and the error carries the tail of the failing process's log.
absl::StatusOr<ClusterState> StartCluster(const UpOptions& options, std::ostream& log);

// InvalidArgument unless every entry of `gpus` is a GPU index or a GPU-/MIG- UUID, none twice,
// and no MIG slice when gpus_per_node > 1 (CUDA shows a process one slice). UpOptions::Validate
// and AddNodeGpus.
absl::Status ValidateGpuEntries(const std::vector<std::string>& gpus, int gpus_per_node);

// The NodeProcess.gpu that `kiln add-node` gives node `node_id` of `state`, from its --gpus
// entries `gpus` (empty: none named); `running(n)` says whether node n's process is alive. In a
// cluster whose nodes were given GPUs (`kiln up --gpus`: a node in cluster.json has a gpu) a new
// node must name its own, so that it does not land on GPUs 0.. beside node-1; a node re-added
// under its id keeps the GPUs cluster.json gives it when `gpus` is empty. Named GPUs must be
// exactly the cluster's gpus_per_node entries (ValidateGpuEntries), in a cuda cluster, none held
// by another running node of the cluster. InvalidArgument with a sentence otherwise.
absl::StatusOr<std::string> AddNodeGpus(const ClusterState& state, const std::string& node_id,
                                        const std::vector<std::string>& gpus,
                                        const std::function<bool(const NodeProcess&)>& running);

// Starts one more node in the running cluster and records it in cluster.json. Its GPUs come from
// AddNodeGpus (refused before anything starts).
absl::StatusOr<NodeProcess> AddNode(const AddNodeOptions& options, std::ostream& log);

// SIGTERM to every node (each finishes its running job), then to the coordinator, then to the
// redis-server of `--redis local`; SIGKILL for whatever outlives the grace period. Marks cluster.json "down". NotFound without cluster.json;
// OK (and says so) when the cluster is already down.
absl::Status StopCluster(const DownOptions& options, std::ostream& log);

// Foreground `kiln up`: blocks until SIGINT, SIGTERM or SIGHUP (then stops the cluster and
// returns OK) or until `kiln down` marks the cluster down. A coordinator or node that dies is
// restarted with backoff (cli/restart_backoff.h): the coordinator on the endpoints it had (the
// nodes and clients reconnect to them), a node with its id and package directory; cluster.json
// follows each new pid. `options` are the ones the cluster was started with. The caller must
// have called BlockShutdownSignals() before starting the cluster.
absl::Status SuperviseCluster(const UpOptions& options, std::ostream& log);

// Blocks SIGINT, SIGTERM, SIGHUP and SIGCHLD in the calling thread (and every thread it creates
// afterwards) so SuperviseCluster can take them synchronously. Call before any thread exists.
void BlockShutdownSignals();

}  // namespace kiln::cli
