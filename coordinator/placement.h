// Placement: which nodes can run a job (pure functions of the node table and the job), what a
// job would cost on each (CostModel, learned from finished jobs), and an index of which nodes
// can run which kind of job (NodeIndex), so that the Coordinator's placement pass looks only at
// the nodes that serve a job's (model, precision, size) and scales with the fleet, not with
// queued jobs × nodes. The functions are thread-safe (no state); CostModel and NodeIndex are
// thread-compatible (the Coordinator's thread).
//
// Eligible: the node is READY with a free slot, serves the job's model, serves its precision and
// size (see below), its device can run the precision (a cpu device cannot run fp8; a cuda device
// with a known compute capability below 8.9 cannot either), and it either holds the job's
// packages (loaded or on local disk) or can compile them or fetch them from its shared tier
// (NodeInfo.can_fetch: a `--no-compile` node of a cluster whose shared cache holds them). Among
// eligible nodes: packages loaded in memory > on local disk > to be compiled (or fetched), then
// the fewest active jobs, then the one idle longest, then node id.
//
// NodeInfo.package_sets["<model>/<precision>/<W>x<H>"] lists the package digests a job needs.
// A node that declares any set for a model declares every (precision, size) it serves for it:
// a job whose key it does not declare is not for that node (for precision "" any precision at
// the job's size will do: the node picks its default). A node that declares no set for the model
// is assumed to serve every size and precision, cold. A job with precision "" needs the set the
// node declares under "<model>//<W>x<H>", else the one for its device's usual default (cpu:
// fp32, cuda: bf16), else the only one declared at that size.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/proto/kiln.pb.h"

namespace kiln::coordinator {

// How warm a node is for a job's packages; higher is warmer.
enum class Warmth { kCold = 0, kLocalDisk = 1, kLoaded = 2 };
const char* WarmthName(Warmth w);  // "cold", "local", "loaded"

// "<model>/<precision>/<W>x<H>", the key of NodeInfo.package_sets.
std::string PackageSetKey(absl::string_view model, absl::string_view precision, uint32_t width,
                          uint32_t height);
// The precision a node runs when a job asks for "" and the node does not say: cpu → fp32,
// anything else → bf16.
std::string DefaultPrecision(const kiln::v1::DeviceInfo& device);
// Splits a package-set key (parsed from the right: model names may contain '/'). False if it is
// not "<model>/<precision>/<W>x<H>".
bool ParsePackageSetKey(absl::string_view key, std::string* model, std::string* precision,
                        std::string* size);

// The package set `node` declares for `spec` (see the file comment), or nullptr.
const kiln::v1::PackageSet* FindPackageSet(const kiln::v1::NodeInfo& node,
                                           const kiln::v1::JobSpec& spec);
// How ready a node's weights are for a job's LoRA set (JobSpec.loras, none included):
// kApplied when NodeInfo.applied_loras["<model>/<precision>"] is the job's LoraSetKey (absent
// counts as "", the base weights; precision "" is the node's default), else kOnDisk when every
// LoRA of the job is in NodeInfo.loras, else kAbsent.
enum class LoraWarmth { kApplied = 0, kOnDisk = 1, kAbsent = 2 };
LoraWarmth LoraWarmthFor(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec);

// The jobs a batching node (NodeInfo.max_batch > 1) can denoise as one batch share this key:
// the spec's model, precision, size, steps and LoRA set (the node's pipeline::BatchCompatible
// within one model and precision; prompt, seed and guidance stay per job).
std::string BatchKey(const kiln::v1::JobSpec& spec);

// Where the node holds the job's packages (kCold when it declares no set for it).
Warmth WarmthFor(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec);

// OK if `node`'s declared capabilities can run `spec` (ignores its state and load); otherwise
// FailedPrecondition saying why, e.g. "n1 does not serve model flux-dev". A node cold for the
// job's packages can run it if it can compile them or fetch them (NodeInfo.can_fetch: it has a
// shared tier; whether that tier holds them is known only to the node, which fails the job
// NOT_FOUND if it does not).
absl::Status CheckCapable(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec);
// The package-set key `node` would run `spec` with: spec's, with precision "" replaced by the
// precision of the set FindPackageSet finds, else the node's DefaultPrecision. For messages.
std::string NeededSetKey(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec);
// CheckCapable without what may change while the node runs (whether it holds the packages when
// it cannot compile): OK if the node could ever run `spec` — it serves the model, the precision
// and size, and its device runs the precision.
absl::Status CheckServes(const kiln::v1::NodeInfo& node, const kiln::v1::JobSpec& spec);

// What `nodes` serve, for messages: per model and precision the sizes their package sets
// declare, e.g. "flux-tiny fp32 at 256x256, 512x512"; a node that declares no set for a model
// adds "flux-dev at any precision and size". Entries are joined with "; ", at most 8 shown.
std::string DescribeServed(const std::vector<const kiln::v1::NodeInfo*>& nodes);

// OK if one of `nodes` could ever run `spec` (CheckServes). Otherwise FailedPrecondition naming
// what is missing and what the nodes serve, e.g. "no registered node serves precision bf16 at
// 320x320 for model flux-tiny; the cluster serves: flux-tiny fp32 at 256x256, 512x512". When a
// node declares the job's kind but its device cannot run it, the message says "can run" and
// gives the nodes' reasons. An empty `nodes` is FailedPrecondition too.
absl::Status CheckAnyServes(const std::vector<const kiln::v1::NodeInfo*>& nodes,
                             const kiln::v1::JobSpec& spec);

// One node as placement sees it.
struct Candidate {
  const kiln::v1::NodeInfo* info = nullptr;
  int active_jobs = 0;            // jobs assigned to it and not yet released
  int64_t last_assigned_ms = 0;   // monotonic ms of its last assignment (0: never)
};

// Index into `candidates` of the best one for `spec` among those CheckCapable accepts, or -1,
// by the fixed preference alone (loaded > local disk > cold, then fewest active jobs, idle
// longest, node id): what the expected-finish policy reduces to among equal devices with no
// queue. The Coordinator places with CostModel and NodeIndex; this is kept for callers that
// have no costs. The caller passes only READY nodes with a free slot.
int ChooseNode(const std::vector<Candidate>& candidates, const kiln::v1::JobSpec& spec);

// ---- Expected finish time

// How the Coordinator chooses among nodes. kExpectedFinish is the policy; the others are
// baselines for bench/ (kWarmthFirst is ChooseNode's fixed preference, placement v1).
enum class PlacementPolicy {
  kExpectedFinish,  // lowest slot wait + cold start + run time; may wait for a busy node
  kWarmthFirst,     // free nodes only: loaded > local disk > cold, then least busy
  kLeastBusy,       // free nodes only: fewest active jobs, then idle longest
  kRoundRobin,      // free nodes only: the next capable node after the last one given a job
};

// What a job would cost a node before it can start denoising, cheapest first: its packages are
// loaded (resident), on its local disk, in the shared store (fetched), or must be compiled.
enum class ColdTier { kResident = 0, kLocalDisk = 1, kSharedStore = 2, kCompile = 3 };
const char* ColdTierName(ColdTier t);  // "resident", "local", "shared", "compiled" (the wire's)
// The tier a finished job paid, from JobResult.packages (component → the wire's words): the most
// expensive component's.
ColdTier ColdTierOfResult(const kiln::v1::JobResult& result);
// The class of device whose run times are learned together: the device name, with " MIG
// <profile>" for a MIG slice (e.g. "NVIDIA H100 80GB HBM3 MIG 3g.40gb") and " x<N>" for a node
// that spreads each job over N GPUs (e.g. "NVIDIA H200 x4"); the kind when unnamed.
std::string DeviceClass(const kiln::v1::DeviceInfo& device);
// GPUs a node with `device` spends on each job: DeviceInfo.gpu_count, at least 1.
uint32_t GpuCount(const kiln::v1::DeviceInfo& device);
// Most GPUs one node may register (DeviceInfo.gpu_count): one host's.
inline constexpr uint32_t kMaxGpusPerNode = 16;

struct CostModelOptions {
  // Prior run time before a (device class, model, precision, size) has been seen: seconds per
  // denoising step of a 1-megapixel image on a reference GPU of reference_sm_count SMs, scaled
  // by the job's pixels and by reference_sm_count / the device's SMs.
  double prior_step_seconds = 0.25;   // s per step at 1 MP on the reference GPU (H100 bf16 ~0.2)
  double prior_job_seconds = 1.0;     // s per job besides the steps (text encoders, VAE)
  uint32_t reference_sm_count = 132;  // SMs of the reference GPU (H100 SXM); 0 SMs: reference
  double cpu_factor = 200;            // a cpu device's run time over the reference GPU's
  // A node over N GPUs (DeviceInfo.gpu_count, sequence parallel): its prior step time is one
  // GPU's / (N x this), the scaling target; the job's fixed part (text encoders, VAE on
  // one GPU) is not divided. Learned per class (DeviceClass has " x<N>") like any other.
  double prior_parallel_efficiency = 0.85;
  // Prior cold starts before a node has reported one of the tier (seconds).
  double prior_local_seconds = 5;     // load packages and weights from local disk
  double prior_shared_seconds = 20;   // fetch from the shared store, then load
  double prior_compile_seconds = 180; // compile, then load
  // LoRA term, added to a node's cold start for a job (LoraWarmthFor): seconds to switch the
  // node's merged LoRA set when the job's LoRAs are on its disk, and when one is not listed
  // there (the node's list may be stale: a penalty rather than a refusal).
  double prior_lora_switch_seconds = 0.5;
  double prior_lora_absent_seconds = 60;
  double learning_rate = 0.3;         // weight of each new observation in the moving averages
  // Seconds still counted for a running job that has outlived its expected run time.
  double overrun_floor_seconds = 1;

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;
};

// Expected run and cold-start times, learned from finished jobs (exponential moving averages):
// run time per denoising step per (device class, model, precision, size), cold start per (node,
// tier) and per (device class, tier), and which job kinds the shared store holds (a job of the
// kind succeeded somewhere, so its packages were published). Priors before any observation.
class CostModel {
 public:
  explicit CostModel(const CostModelOptions& options = {}) : options_(options) {}

  // A successful result of `spec` on a node with `device`. Run time = run_seconds − cold start
  // total (the coordinator's measure when the node reports none).
  void Observe(const std::string& node_id, const kiln::v1::DeviceInfo& device,
               const kiln::v1::JobSpec& spec, const kiln::v1::JobResult& result,
               double measured_run_seconds);
  // Expected run time once the packages are loaded: fixed + per_step × steps.
  struct RunEstimate {
    double fixed_seconds = 0;
    double step_seconds = 0;
    double For(uint32_t steps) const { return fixed_seconds + step_seconds * steps; }
  };
  // For jobs of kind `key` (PackageSetKey) of `width`×`height` on a `device` of `device_class`
  // (DeviceClass(device)): learned, else the prior scaled by what the class has shown so far.
  RunEstimate Run(const std::string& device_class, const kiln::v1::DeviceInfo& device,
                  const std::string& key, uint32_t width, uint32_t height) const;
  // Seconds `spec` runs on `device` once its packages are loaded.
  double RunSeconds(const kiln::v1::DeviceInfo& device, const kiln::v1::JobSpec& spec) const;
  // Seconds node `node_id` (of `device_class`) needs to make a job of tier `tier` ready.
  // The LoRA term of a node's cold start: 0 for kApplied, else the prior switch or absent time.
  double LoraSeconds(LoraWarmth warmth) const;
  double ColdStartSeconds(const std::string& node_id, const std::string& device_class,
                          ColdTier tier) const;
  // ColdStartSeconds of every tier (indexed by ColdTier), with one lookup per map.
  std::array<double, 4> ColdStarts(const std::string& node_id,
                                   const std::string& device_class) const;
  // A lower bound of ColdStarts(node, class) over every node and class (indexed by ColdTier):
  // the least of the priors and of every learned value. O(nodes).
  std::array<double, 4> MinColdStarts() const;
  // Whether a job of kind `key` has succeeded anywhere (its packages are in the shared store).
  bool InSharedStore(const std::string& key) const { return shared_.contains(key); }
  void ForgetNode(const std::string& node_id);

  const CostModelOptions& options() const { return options_; }

 private:
  struct Average {
    double value = 0;
    uint64_t count = 0;
  };
  void Add(Average& a, double x) const;

  CostModelOptions options_;
  absl::flat_hash_map<std::string, Average> step_seconds_;      // "<class>|<key>"
  absl::flat_hash_map<std::string, Average> class_factor_;      // class: observed / prior
  using TierAverages = std::array<Average, 4>;                  // by ColdTier
  absl::flat_hash_map<std::string, TierAverages> node_cold_;    // by node id
  absl::flat_hash_map<std::string, TierAverages> class_cold_;   // by device class
  absl::flat_hash_map<std::string, bool> shared_;               // job kinds in the shared store
};

// Which nodes can run jobs of each kind (PackageSetKey of the spec), and how warm each is for it,
// kept per kind as nodes register and change, so a placement pass reads a list instead of
// checking every node. A kind's list is built on first use (one CheckCapable per node) and then
// kept up to date by Update/Remove (one check per cached kind). Node state and load are not
// here: the pass reads them from the node table.
class NodeIndex {
 public:
  struct Entry {
    std::string node_id;
    uint32_t slot = 0;  // the node's dense number, Slot(node_id)
    Warmth warmth = Warmth::kCold;
  };
  // `info` is new or changed (registration, a heartbeat with new packages).
  void Update(const kiln::v1::NodeInfo& info);
  void Remove(const std::string& node_id);
  // The nodes that can run jobs of one kind, as lists kept up to date.
  struct KindNodes {
    std::vector<Entry> nodes;            // sorted by node id
    std::vector<int8_t> warmth_by_slot;  // Warmth of the node in each slot; -1: cannot run it
    size_t warm = 0;                     // nodes whose warmth is not kCold
    int WarmthAt(uint32_t slot) const {
      return slot < warmth_by_slot.size() ? warmth_by_slot[slot] : -1;
    }
  };
  // The nodes that can run jobs like `spec`. `key` is PackageSetKey(spec). The reference stays
  // valid until this index is destroyed (kinds are never dropped).
  const KindNodes& ForKind(const std::string& key, const kiln::v1::JobSpec& spec);
  // ForKind(key, spec).nodes.
  const std::vector<Entry>& Capable(const std::string& key, const kiln::v1::JobSpec& spec) {
    return ForKind(key, spec).nodes;
  }
  size_t kinds() const { return kinds_.size(); }
  // A dense number for each node updated and not removed (reused after Remove), so a pass can
  // keep per-node state in a vector; -1 for an unknown node. Slots are below slot_count().
  int Slot(const std::string& node_id) const;
  size_t slot_count() const { return slot_count_; }

 private:
  struct Kind {
    kiln::v1::JobSpec spec;  // model, precision, width, height of the kind
    KindNodes nodes;
  };
  static void Drop(KindNodes& kind, const std::string& node_id);
  static void Refresh(Kind& kind, const kiln::v1::NodeInfo& info, uint32_t slot);
  struct Node {
    kiln::v1::NodeInfo info;  // a copy
    uint32_t slot = 0;
  };

  absl::flat_hash_map<std::string, Node> nodes_;  // every node updated and not removed
  std::vector<uint32_t> free_slots_;
  uint32_t slot_count_ = 0;
  // node_hash_map: ForKind's references stay valid while later kinds are added (a placement
  // pass holds one per kind it met).
  absl::node_hash_map<std::string, Kind> kinds_;
};

}  // namespace kiln::coordinator
