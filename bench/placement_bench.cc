// kiln-placement-bench: the real Coordinator (in-memory store, FakeClock, no sockets) driven by
// simulated nodes, to measure placement at fleet size and to compare placement policies.
//
//   kiln-placement-bench --mode=pass  [--nodes=10,100,1000] [--queued=10000] [--rounds=1000]
//   kiln-placement-bench --mode=fleet [--jobs=3000] [--seed=1]
//
// pass: registers N nodes (H100, H200 and MIG 3g.40gb slices, each warm for a few random job
// kinds), fills them, queues `queued` more jobs over 18 kinds, then finishes one running job at a
// time: each Result() frees one node and runs one placement pass over the whole queue. Prints
// the CPU time of those calls (one placement each: the node's heartbeat and result, the pass)
// and of Submit() with the queue full.
//
// fleet: a discrete-event simulation on the FakeClock. Simulated GPUs with the step times
// measured on the H100/H200 (bench/README.md; MIG slices scaled by their SMs), cold starts by tier
// as measured (compile, shared store, local disk), a bursty trace over three models, three
// buckets and two precisions; every policy of PlacementPolicy runs the same trace. Prints mean,
// p50 and p99 job latency (submit to result), GPU-seconds per image and cold starts, per policy.
#include <algorithm>
#include <cstdio>
#include <ctime>
#include <map>
#include <memory>
#include <queue>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/clock.h"
#include "coordinator/coordinator.h"
#include "coordinator/job_store.h"
#include "prometheus/registry.h"

ABSL_FLAG(std::string, mode, "pass", "pass | fleet");
ABSL_FLAG(std::string, nodes, "10,100,1000", "pass: node counts");
ABSL_FLAG(int, queued, 10000, "pass: jobs queued behind the busy nodes");
ABSL_FLAG(int, rounds, 1000, "pass: results (one placement each) timed per node count");
ABSL_FLAG(int, jobs, 3000, "fleet: jobs in the trace");
ABSL_FLAG(uint64_t, seed, 1, "random seed of the trace and the node table");

namespace kiln::bench {
namespace {

using coordinator::Coordinator;
using coordinator::CoordinatorMetrics;
using coordinator::CoordinatorOptions;
using coordinator::InMemoryJobStore;
using coordinator::PlacementPolicy;

// ---- What the simulated fleet is made of (bench/README.md has the sources).

struct DeviceKind {
  const char* name;
  const char* mig;      // "" for a whole GPU
  uint32_t sms;
  double gpu_share;     // of one physical GPU, for GPU-seconds
  double step_factor;   // step time over the H100's
};
// H100 and H200: measured (1024², bf16 130.7 vs 131.9 ms, fp8 108.4 vs 104.1 ms); the MIG
// 3g.40gb slice (60 of 132 SMs) is not measured: step time scaled by SMs.
constexpr DeviceKind kH100{"NVIDIA H100 80GB HBM3", "", 132, 1.0, 1.0};
constexpr DeviceKind kH200{"NVIDIA H200", "", 132, 1.0, 1.0};
constexpr DeviceKind kMig{"NVIDIA H100 80GB HBM3", "3g.40gb", 60, 3.0 / 7.0, 132.0 / 60.0};

const char* const kModels[] = {"flux-dev", "flux-schnell", "flux-dev-ft"};
const uint32_t kModelSteps[] = {28, 4, 28};
const double kModelWeight[] = {0.55, 0.35, 0.10};
const uint32_t kBuckets[] = {512, 768, 1024};
const double kBucketWeight[] = {0.4, 0.3, 0.3};
const char* const kPrecisions[] = {"bf16", "fp8"};
const double kPrecisionWeight[] = {0.7, 0.3};

// H100 ms per step (bench/results/2026-11-21-h100-buckets, 2026-11-21-h100; fp8 at 1024² only,
// other buckets scaled by the 1024² fp8/bf16 ratio 108.4/130.7).
double StepSeconds(const DeviceKind& d, uint32_t bucket, const std::string& precision) {
  double ms = bucket == 512 ? 40.9 : bucket == 768 ? 74.8 : 130.7;
  if (precision == "fp8") ms *= 108.4 / 130.7;
  if (&d == &kH200) ms *= precision == "fp8" ? 104.1 / 108.4 : 131.9 / 130.7;
  return ms / 1000 * d.step_factor;
}
// Text encoders + VAE decode (28-step end to end at 1024²: 0.26 s + 0.21 s), decode by pixels.
double OverheadSeconds(const DeviceKind& d, uint32_t bucket) {
  return (0.26 + 0.21 * bucket * bucket / (1024.0 * 1024.0)) * std::min(2.0, d.step_factor);
}
// Cold starts at 1024² on the H100 (bench/results/2026-11-21-h100): compiled 131.5 s wall
// (compile 121.9 bf16, 169.7 fp8), from the shared store with the page cache dropped 23.1 s,
// warm page cache 9.0 s, each less the 4.2–4.5 s of generating.
double ColdSeconds(coordinator::ColdTier tier, const std::string& precision) {
  switch (tier) {
    case coordinator::ColdTier::kResident:
      return 0;
    case coordinator::ColdTier::kLocalDisk:
      return 4.8;
    case coordinator::ColdTier::kSharedStore:
      return 18.6;
    case coordinator::ColdTier::kCompile:
      break;
  }
  return precision == "fp8" ? 169.7 + 3.5 : 121.9 + 3.5;
}
// Switching a resident package set to another model's weights (page cache warm).
constexpr double kWeightSwitchSeconds = 3.5;

std::string Digest(const std::string& precision, uint32_t bucket) {
  return absl::StrCat("pkg-", precision, "-", bucket);  // packages are per architecture
}

kiln::v1::JobSpec MakeSpec(const std::string& id, int model, uint32_t bucket,
                           const std::string& precision) {
  kiln::v1::JobSpec s;
  s.set_job_id(id);
  s.set_model(kModels[model]);
  s.set_prompt("a lighthouse at dusk");
  s.set_width(bucket);
  s.set_height(bucket);
  s.set_steps(kModelSteps[model]);
  s.set_seed(1);
  s.set_precision(precision);
  return s;
}

template <size_t N>
int Pick(std::mt19937_64& rng, const double (&weights)[N]) {
  std::discrete_distribution<int> d(std::begin(weights), std::end(weights));
  return d(rng);
}

// One simulated node: which package sets it has loaded (LRU, `capacity`) and on disk, whose
// weights it holds, and the job it runs.
struct SimNode {
  std::string id;
  const DeviceKind* device = nullptr;
  size_t capacity = 2;
  std::vector<std::string> loaded;  // most recent last
  std::set<std::string> disk;
  std::string weights_model;
  std::string job;
  kiln::v1::JobSpec spec;
  int64_t busy_until_ms = 0;
  coordinator::ColdTier tier = coordinator::ColdTier::kResident;
  double cold_s = 0;
  double run_s = 0;

  kiln::v1::NodeInfo Info() const {
    kiln::v1::NodeInfo info;
    info.set_node_id(id);
    auto* d = info.mutable_device();
    d->set_kind("cuda");
    d->set_name(device->name);
    d->set_mig_profile(device->mig);
    d->set_sm_count(device->sms);
    d->set_compute_capability("9.0");
    for (const char* m : kModels) info.add_models(m);
    info.set_can_compile(true);
    for (const auto& m : kModels) {
      for (uint32_t b : kBuckets) {
        for (const char* p : kPrecisions) {
          (*info.mutable_package_sets())[coordinator::PackageSetKey(m, p, b, b)].add_digests(
              Digest(p, b));
        }
      }
    }
    for (const auto& l : loaded) info.add_loaded_packages(l);
    for (const auto& d2 : disk) info.add_packages(d2);
    return info;
  }
  kiln::v1::Heartbeat Beat() const {
    kiln::v1::Heartbeat hb;
    if (!job.empty()) hb.add_running_jobs(job);
    for (const auto& l : loaded) hb.add_loaded_packages(l);
    for (const auto& d2 : disk) hb.add_packages(d2);
    return hb;
  }
};

// The fleet, its coordinator and the shared store, on one FakeClock.
class Fleet {
 public:
  Fleet(PlacementPolicy policy, const std::vector<const DeviceKind*>& devices)
      : metrics_(registry_) {
    CoordinatorOptions o;
    o.placement = policy;
    o.heartbeat_interval_ms = 1000;
    o.dead_after_missed_heartbeats = 1'000'000;  // simulated nodes never die
    o.max_queued_jobs = 1'000'000;
    o.max_nodes = 100'000;
    o.max_attempts = 100;
    auto c = Coordinator::Create(o, store_, clock_, metrics_, [](const std::string&) {});
    if (!c.ok()) {
      std::fprintf(stderr, "%s\n", c.status().ToString().c_str());
      std::exit(1);
    }
    coordinator_ = std::move(*c);
    for (size_t i = 0; i < devices.size(); ++i) {
      SimNode n;
      n.id = absl::StrCat("node-", 10000 + i);
      n.device = devices[i];
      n.capacity = devices[i]->gpu_share < 1 ? 1 : 2;
      nodes_[n.id] = std::move(n);
    }
  }

  Coordinator& c() { return *coordinator_; }
  FakeClock& clock() { return clock_; }
  std::map<std::string, SimNode>& nodes() { return nodes_; }
  std::set<std::string>& shared() { return shared_; }

  void RegisterAll() {
    for (auto& [id, n] : nodes_) {
      kiln::v1::RegisterNode m;
      *m.mutable_info() = n.Info();
      if (!c().RegisterNode(id, m).ok()) std::exit(1);
    }
    Drain();
  }

  // Starts the jobs the coordinator assigned (collects its outgoing messages).
  void Drain() {
    for (auto& out : c().TakeOutgoing()) {
      if (out.socket != coordinator::Outgoing::Socket::kNode || !out.envelope.has_assign()) {
        continue;
      }
      Start(nodes_.at(out.peer), out.envelope.assign().spec());
    }
  }

  // The node finishes its job: reports packages, then the result.
  void Finish(SimNode& n) {
    const std::string digest = Digest(n.spec.precision(), n.spec.width());
    n.loaded.erase(std::remove(n.loaded.begin(), n.loaded.end(), digest), n.loaded.end());
    n.loaded.push_back(digest);
    if (n.loaded.size() > n.capacity) n.loaded.erase(n.loaded.begin());
    n.disk.insert(digest);
    shared_.insert(digest);
    n.weights_model = n.spec.model();
    if (!c().Heartbeat(n.id, n.Beat()).ok()) std::exit(1);
    kiln::v1::JobResult r;
    r.set_job_id(n.job);
    r.set_ok(true);
    r.set_run_seconds(n.cold_s + n.run_s);
    r.mutable_cold_start()->set_total_seconds(n.cold_s);
    (*r.mutable_packages())["transformer"] = coordinator::ColdTierName(n.tier);
    busy_gpu_seconds_ += (n.cold_s + n.run_s) * n.device->gpu_share;
    ++tiers_[static_cast<int>(n.tier)];
    n.job.clear();
    if (!c().Result(n.id, r).ok()) std::exit(1);
  }

  double busy_gpu_seconds() const { return busy_gpu_seconds_; }
  const int* tiers() const { return tiers_; }

 private:
  void Start(SimNode& n, const kiln::v1::JobSpec& spec) {
    const std::string digest = Digest(spec.precision(), spec.width());
    n.job = spec.job_id();
    n.spec = spec;
    if (std::find(n.loaded.begin(), n.loaded.end(), digest) != n.loaded.end()) {
      n.tier = coordinator::ColdTier::kResident;
    } else if (n.disk.count(digest)) {
      n.tier = coordinator::ColdTier::kLocalDisk;
    } else if (shared_.count(digest)) {
      n.tier = coordinator::ColdTier::kSharedStore;
    } else {
      n.tier = coordinator::ColdTier::kCompile;
    }
    n.cold_s = ColdSeconds(n.tier, spec.precision());
    if (n.tier == coordinator::ColdTier::kResident && n.weights_model != spec.model()) {
      n.cold_s += kWeightSwitchSeconds;
    }
    n.run_s = OverheadSeconds(*n.device, spec.width()) +
              spec.steps() * StepSeconds(*n.device, spec.width(), spec.precision());
    n.busy_until_ms = clock_.NowMs() + static_cast<int64_t>(1000 * (n.cold_s + n.run_s));
  }

  FakeClock clock_;
  InMemoryJobStore store_{1'000'000};
  prometheus::Registry registry_;
  CoordinatorMetrics metrics_;
  std::unique_ptr<Coordinator> coordinator_;
  std::map<std::string, SimNode> nodes_;
  std::set<std::string> shared_;
  double busy_gpu_seconds_ = 0;
  int tiers_[4] = {0, 0, 0, 0};
};

std::vector<const DeviceKind*> MixedDevices(size_t n) {
  std::vector<const DeviceKind*> out;
  for (size_t i = 0; i < n; ++i) {
    const size_t k = i % 4;
    out.push_back(k == 0 || k == 1 ? &kH100 : k == 2 ? &kH200 : &kMig);
  }
  return out;
}

// CPU seconds of this thread, in µs: the machine is shared and loaded, and wall time would count
// the time other processes held the cores.
double CpuMicros() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

kiln::v1::SubmitRequest Submit(const kiln::v1::JobSpec& spec) {
  kiln::v1::SubmitRequest r;
  *r.mutable_spec() = spec;
  return r;
}

// ---- --mode=pass

int RunPass() {
  std::vector<int> counts;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_nodes), ',')) {
    int n = 0;
    if (!absl::SimpleAtoi(s, &n) || n < 1) {
      std::fprintf(stderr, "--nodes: %s is not a positive number\n", std::string(s).c_str());
      return 2;
    }
    counts.push_back(n);
  }
  const int queued = absl::GetFlag(FLAGS_queued);
  const int rounds = absl::GetFlag(FLAGS_rounds);
  std::printf("%7s %7s %11s %11s %11s %11s %13s %8s\n", "nodes", "queued", "place p50",
              "place p99", "place mean", "place max", "submit mean", "placed");
  for (int count : counts) {
    std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
    Fleet fleet(PlacementPolicy::kExpectedFinish, MixedDevices(count));
    // Every node warm for two random kinds; the shared store holds every kind.
    for (auto& [id, n] : fleet.nodes()) {
      for (int k = 0; k < 2; ++k) {
        const std::string d = Digest(kPrecisions[Pick(rng, kPrecisionWeight)],
                                     kBuckets[Pick(rng, kBucketWeight)]);
        n.loaded.push_back(d);
        n.disk.insert(d);
      }
    }
    for (const char* p : kPrecisions) {
      for (uint32_t b : kBuckets) fleet.shared().insert(Digest(p, b));
    }
    fleet.RegisterAll();
    int next = 0;
    auto random_spec = [&] {
      return MakeSpec(absl::StrCat("j", next++), Pick(rng, kModelWeight),
                      kBuckets[Pick(rng, kBucketWeight)], kPrecisions[Pick(rng, kPrecisionWeight)]);
    };
    // Fill every node, then queue `queued` jobs behind them.
    for (int i = 0; i < count; ++i) {
      if (!fleet.c().Submit(Submit(random_spec())).ok()) return 1;
    }
    fleet.Drain();
    std::vector<double> submit_us;
    for (int i = 0; i < queued; ++i) {
      const auto spec = random_spec();
      const double t0 = CpuMicros();
      if (!fleet.c().Submit(Submit(spec)).ok()) return 1;
      submit_us.push_back(CpuMicros() - t0);
    }
    fleet.Drain();
    // Finish one running job at a time (the one due first): each Result() runs one pass.
    std::vector<double> place_us;
    int placed = 0;
    for (int r = 0; r < rounds; ++r) {
      SimNode* due = nullptr;
      for (auto& [id, n] : fleet.nodes()) {
        if (!n.job.empty() && (due == nullptr || n.busy_until_ms < due->busy_until_ms)) due = &n;
      }
      if (due == nullptr) break;
      const int64_t now = fleet.clock().NowMs();
      if (due->busy_until_ms > now) fleet.clock().AdvanceMs(due->busy_until_ms - now);
      const size_t before = fleet.c().queue_depth();
      const double t0 = CpuMicros();
      fleet.Finish(*due);
      place_us.push_back(CpuMicros() - t0);
      placed += static_cast<int>(before - fleet.c().queue_depth());
      fleet.Drain();
      // Keep the queue at `queued`.
      while (fleet.c().queue_depth() < static_cast<size_t>(queued)) {
        if (!fleet.c().Submit(Submit(random_spec())).ok()) return 1;
        fleet.Drain();
      }
    }
    double mean = 0;
    for (double v : place_us) mean += v;
    mean /= std::max<size_t>(1, place_us.size());
    double smean = 0;
    for (double v : submit_us) smean += v;
    smean /= std::max<size_t>(1, submit_us.size());
    std::printf("%7d %7d %8.1f us %8.1f us %8.1f us %8.1f us %10.1f us %8d\n", count, queued,
                Percentile(place_us, 0.5), Percentile(place_us, 0.99), mean,
                Percentile(place_us, 1.0), smean, placed);
  }
  return 0;
}

// ---- --mode=fleet

struct Arrival {
  int64_t at_ms;
  kiln::v1::JobSpec spec;
};

// A bursty trace: a steady 0.5 jobs/s, and every 10 minutes a burst of 150 jobs within 30 s
// that favours one model and bucket (a campaign), over as many minutes as `jobs` needs.
std::vector<Arrival> Trace(int jobs, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Arrival> out;
  std::exponential_distribution<double> gap(0.5);
  double t = 0;
  int id = 0;
  while (static_cast<int>(out.size()) < jobs) {
    t += gap(rng);
    out.push_back({static_cast<int64_t>(t * 1000),
                   MakeSpec(absl::StrCat("s", id++), Pick(rng, kModelWeight),
                            kBuckets[Pick(rng, kBucketWeight)],
                            kPrecisions[Pick(rng, kPrecisionWeight)])});
    if (static_cast<int64_t>(t) / 600 != static_cast<int64_t>(t - 2.0) / 600 && t > 60) {
      const int model = Pick(rng, kModelWeight);
      const uint32_t bucket = kBuckets[Pick(rng, kBucketWeight)];
      std::uniform_real_distribution<double> within(0, 30);
      for (int b = 0; b < 150; ++b) {
        const bool campaign = b % 4 != 0;
        out.push_back({static_cast<int64_t>((t + within(rng)) * 1000),
                       MakeSpec(absl::StrCat("s", id++),
                                campaign ? model : Pick(rng, kModelWeight),
                                campaign ? bucket : kBuckets[Pick(rng, kBucketWeight)],
                                kPrecisions[Pick(rng, kPrecisionWeight)])});
      }
    }
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const Arrival& a, const Arrival& b) { return a.at_ms < b.at_ms; });
  out.resize(jobs);
  return out;
}

int RunFleet() {
  const int jobs = absl::GetFlag(FLAGS_jobs);
  const auto trace = Trace(jobs, absl::GetFlag(FLAGS_seed));
  // 8 H100, 4 H200, and 4 H100 each split into two MIG 3g.40gb slices.
  std::vector<const DeviceKind*> devices;
  for (int i = 0; i < 8; ++i) devices.push_back(&kH100);
  for (int i = 0; i < 4; ++i) devices.push_back(&kH200);
  for (int i = 0; i < 8; ++i) devices.push_back(&kMig);
  std::printf("fleet: 8 H100, 4 H200, 8 MIG 3g.40gb slices (4 GPUs); %d jobs over %.0f min; "
              "shared store starts with bf16 512/768/1024, nodes start cold\n",
              jobs, trace.back().at_ms / 60000.0);
  std::printf("%-16s %9s %9s %9s %9s %12s %8s %8s %8s %8s\n", "policy", "mean s", "p50 s",
              "p99 s", "max s", "GPU-s/image", "resident", "local", "shared", "compile");
  const std::pair<const char*, PlacementPolicy> policies[] = {
      {"expected-finish", PlacementPolicy::kExpectedFinish},
      {"warmth-first", PlacementPolicy::kWarmthFirst},
      {"least-busy", PlacementPolicy::kLeastBusy},
      {"round-robin", PlacementPolicy::kRoundRobin}};
  for (const auto& [name, policy] : policies) {
    Fleet fleet(policy, devices);
    for (uint32_t b : kBuckets) fleet.shared().insert(Digest("bf16", b));
    fleet.RegisterAll();
    std::map<std::string, int64_t> submitted;
    std::vector<double> latency;
    size_t next = 0;
    const int64_t start = fleet.clock().NowMs();
    while (latency.size() < trace.size()) {
      // The next event: an arrival or a node finishing (ties: finishing first).
      SimNode* due = nullptr;
      for (auto& [id, n] : fleet.nodes()) {
        if (!n.job.empty() && (due == nullptr || n.busy_until_ms < due->busy_until_ms)) due = &n;
      }
      const int64_t arrival = next < trace.size() ? start + trace[next].at_ms : INT64_MAX;
      int64_t at = due != nullptr ? std::min(due->busy_until_ms, arrival) : arrival;
      // Tick at least once a second so held jobs are looked at again.
      at = std::min(at, fleet.clock().NowMs() + 1000);
      if (at == INT64_MAX) {
        std::fprintf(stderr, "%s: %zu jobs never finished\n", name, trace.size() - latency.size());
        return 1;
      }
      if (at > fleet.clock().NowMs()) fleet.clock().AdvanceMs(at - fleet.clock().NowMs());
      const int64_t now = fleet.clock().NowMs();
      if (due != nullptr && due->busy_until_ms <= now) {
        const std::string job = due->job;
        fleet.Finish(*due);
        latency.push_back((now - submitted.at(job)) / 1000.0);
      } else if (arrival <= now) {
        submitted[trace[next].spec.job_id()] = now;
        if (!fleet.c().Submit(Submit(trace[next].spec)).ok()) return 1;
        ++next;
      }
      fleet.c().Tick();
      fleet.Drain();
    }
    double mean = 0;
    for (double v : latency) mean += v;
    mean /= latency.size();
    const int* t = fleet.tiers();
    std::printf("%-16s %9.1f %9.1f %9.1f %9.1f %12.2f %8d %8d %8d %8d\n", name, mean,
                Percentile(latency, 0.5), Percentile(latency, 0.99), Percentile(latency, 1.0),
                fleet.busy_gpu_seconds() / latency.size(), t[0], t[1], t[2], t[3]);
  }
  return 0;
}

}  // namespace
}  // namespace kiln::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode == "pass") return kiln::bench::RunPass();
  if (mode == "fleet") return kiln::bench::RunFleet();
  std::fprintf(stderr, "--mode: %s is not pass or fleet\n", mode.c_str());
  return 2;
}
