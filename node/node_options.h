// NodeOptions: everything a kiln node is told (by kiln-node's flags, or a test). The factory
// (node/node_factory.h) builds the node's provider and pipelines from it, NodeSession its
// registration and link, NodeAgent its socket.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/curve_keys.h"
#include "common/proto/kiln.pb.h"
#include "node/coordinator_link.h"
#include "node/worker.h"
#include "nlohmann/json.hpp"
#include "pipeline/flux_pipeline.h"

namespace kiln::node {

struct NodeOptions {
  std::string node_id;      // routing identity and NodeInfo.node_id: 1..128 of [A-Za-z0-9._:-]
  std::string coordinator;  // the coordinator's node socket: "tcp://HOST:PORT" (ipc://, inproc://)
  std::map<std::string, std::string> models;  // served model name → diffusers-layout repository
  std::string device = "cpu";                 // pipeline device: "cpu", "cuda", "cuda:N"
  // kiln-node --gpus: the device indices one node spreads each job over (sequence parallel, one
  // rank per entry, rank 0 first; docs/multi_gpu.md); it registers once, with
  // DeviceInfo.gpu_count = their number. With device "cuda" the ranks run on cuda:<index>; with
  // "cpu" each entry is one CPU rank (the indices only count). Empty: the one `device`.
  std::vector<int> gpus;
  static constexpr int kMaxGpus = 16;  // the coordinator's kMaxGpusPerNode: one host's
  // Multi-GPU nodes: bounds the rank group's join and each collective, seconds: above a
  // follower's load of its transformer set after a job's header (rank 0 encodes beside its
  // thread, which keeps the followers alive meanwhile).
  double group_timeout_seconds = 600;
  // The devices of the ranks: {"cuda:0", "cuda:1"} for device "cuda" and gpus {0, 1}; {"cpu",
  // "cpu"} for "cpu"; empty without gpus.
  std::vector<std::string> RankDevices() const;
  std::string precision = "fp32";             // for jobs whose precision is ""
  std::vector<std::string> precisions;        // served precisions; empty = {precision}
  std::vector<pipeline::Resolution> resolutions = pipeline::DefaultResolutions();  // allowed
  std::string package_dir = ".kiln/packages";  // node-local package directory (created)
  int64_t package_dir_max_bytes = 0;           // LRU bound on package_dir in bytes; 0 = none
  std::string shared_cache_dir;                // shared package tier; "" = none
  // LoRA directories searched in order for a job's LoRAs (NAME.safetensors + its digest
  // NAME.safetensors.sha256); SHARED/loras is searched after them when shared_cache_dir is a
  // directory (not a redis:// URL).
  std::vector<std::string> lora_dirs;
  bool allow_compile = true;                   // false: a package no tier holds fails the job
  std::string compiler_path;  // kiln-compile; "" = beside the running binary
  // Package signatures (cache/package_signing.h): a comma list of .pub files / directories whose
  // keys this node accepts ("" = signatures not checked: development only, logged loudly), the
  // key this node signs what it compiles with ("" = unsigned), and a local revocation file read
  // before every load besides the shared cache's list ("" = none).
  std::string trusted_keys;
  std::string signing_key;
  std::string revocation_file;
  // Probe package_dir (write + fsync + delete) this often (ms, > 0), and after every failed job;
  // while it fails the node is not ready and takes no jobs (node/disk_health.h).
  int64_t disk_check_interval_ms = 5000;
  // Handed to kiln-compile and part of every artifact key (a JSON object); the same on every
  // node of a cluster, or nodes build and look for different packages.
  nlohmann::json compile_options = cache::DefaultCompileOptions();
  LinkOptions link;           // heartbeat interval, dead-after count, reconnect backoff
  int64_t drain_timeout_ms = 30000;  // after Stop(): how long results wait for a coordinator
  // Jobs the node holds at once, advertised in NodeInfo.job_slots: the one it runs plus those it
  // takes ahead, 1..kMaxJobSlots. 2 (the default): one prefetched job, whose text encoding runs
  // beside the running job's denoise (node/worker.h); 1: no prefetch.
  int job_slots = 2;
  static constexpr int kMaxJobSlots = 8;
  // Batching (node/worker.h): up to batching.max_batch encoded, batch-compatible jobs run as one
  // batch, waiting at most batching.batch_wait_ms for a full one. Default: no batching.
  WorkerOptions batching;
  // NodeInfo.job_slots: job_slots, raised with batching to max_batch + 1 (a batch and the job
  // encoded beside it), so that the coordinator sends enough jobs to fill a batch.
  int AdvertisedJobSlots() const;
  kiln::v1::DeviceInfo device_info;  // from ProbeDevice(); kind filled from device if ""
  std::string metrics_url;           // advertised in NodeInfo; "" = none
  std::string hostname;              // advertised; "" = gethostname()
  // CURVE to the coordinator: this node's key pair and the coordinator's public key (the
  // node's identity is its key). Disabled (plaintext) when server_public_key is "".
  CurveClient curve;

  absl::Status Validate() const;  // InvalidArgument naming the field
};

// kiln-node --gpus: "0,1,3" → {0, 1, 3}. InvalidArgument naming --gpus for an empty entry, one
// that is not a non-negative integer, or a duplicate. "" → {} (one device). NodeOptions::
// Validate checks the rest (count, device).
absl::StatusOr<std::vector<int>> ParseGpus(const std::string& text);

}  // namespace kiln::node
