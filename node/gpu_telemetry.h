// GPU telemetry: a sampler that reads NVML (node/nvml.h, loaded at run time) every
// interval_ms on a thread it owns and exports Prometheus gauges to the registry it is given.
//
// Per GPU (labels node, gpu = NVML index, uuid = the card's UUID, mig_profile = ""):
//   kiln_gpu_utilization_ratio             share of the last sample period a kernel ran (0..1)
//   kiln_gpu_memory_utilization_ratio      share of it device memory was read or written
//   kiln_gpu_memory_used_bytes, kiln_gpu_memory_total_bytes
//   kiln_gpu_power_watts, kiln_gpu_temperature_celsius, kiln_gpu_sm_clock_hertz
//   kiln_gpu_clocks_event_active{reason}   1 while that clock throttle/event reason holds
//   kiln_gpu_ecc_errors_total{type="corrected|uncorrected"}  since the driver loaded (counter)
// Per MIG slice (labels node, gpu = its card's index, uuid = the slice's UUID, mig_profile):
//   kiln_mig_memory_used_bytes, kiln_mig_memory_total_bytes
//   kiln_mig_sm_utilization_ratio, kiln_mig_dram_bandwidth_utilization_ratio: from NVML's GPM
//   interface (Hopper and later; nvmlGpmMigSampleGet), over the interval between two samples;
//   absent where the driver or the card has no GPM (NVML's utilization rates are not reported
//   for MIG slices at all).
// Sampler health (label node):
//   kiln_gpu_telemetry_samples_total
//   kiln_gpu_telemetry_errors_total{call}  an NVML call that failed (not "not supported"); the
//                                          figure is left at its last value, sampling goes on
// A figure NVML reports as not supported on this card is simply absent.
//
// Which devices: options.device_uuid selects the GPU with that UUID (its card figures), or the
// MIG slice with that UUID (its card's figures and the slice's); "" samples every GPU NVML sees
// and every MIG slice on them.
//
// Threads: Start() starts the sampling thread, Stop() (or the destructor) joins it within one
// NVML call. SampleOnce() may also be called directly (tests); samples are serialised.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/proto/kiln.pb.h"
#include "node/nvml.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"

namespace kiln::node {

struct GpuTelemetryOptions {
  int interval_ms = 1000;   // ms between samples; > 0
  std::string node_id;      // the "node" label
  std::string device_uuid;  // GPU-... or MIG-...; "" = every device NVML sees

  absl::Status Validate() const;  // InvalidArgument naming "interval_ms"
};

class GpuTelemetry {
 public:
  // `nvml` and `registry` must outlive the sampler. Creates the metric families; no thread yet.
  // InvalidArgument for bad options.
  static absl::StatusOr<std::unique_ptr<GpuTelemetry>> Create(const GpuTelemetryOptions& options,
                                                              const nvml::Api& nvml,
                                                              prometheus::Registry& registry);
  ~GpuTelemetry();  // Stop()
  GpuTelemetry(const GpuTelemetry&) = delete;
  GpuTelemetry& operator=(const GpuTelemetry&) = delete;

  // Takes a first sample, then starts the thread. Call once.
  void Start();
  // Wakes and joins the thread. Idempotent.
  void Stop();

  // One pass over the selected devices. Failures are counted and logged once per call site.
  void SampleOnce();

  uint64_t samples() const;

 private:
  struct Device;  // one GPU or MIG slice being sampled, with its gauges
  GpuTelemetry(const GpuTelemetryOptions& options, const nvml::Api& nvml,
               prometheus::Registry& registry);
  void Run();
  void Discover() ABSL_EXCLUSIVE_LOCKS_REQUIRED(sample_mu_);
  void SampleGpu(Device& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sample_mu_);
  void SampleMig(Device& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sample_mu_);
  // Success: true. NOT_SUPPORTED: false, silently. Other failures: false, counted as `call`.
  bool Check(nvml::Return r, const std::string& call) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sample_mu_);
  prometheus::Gauge& G(prometheus::Family<prometheus::Gauge>& f, const Device& d,
                       const std::map<std::string, std::string>& extra = {});

  const GpuTelemetryOptions options_;
  const nvml::Api& nvml_;
  prometheus::Registry& registry_;

  prometheus::Family<prometheus::Gauge>& gpu_util_;
  prometheus::Family<prometheus::Gauge>& gpu_mem_util_;
  prometheus::Family<prometheus::Gauge>& gpu_mem_used_;
  prometheus::Family<prometheus::Gauge>& gpu_mem_total_;
  prometheus::Family<prometheus::Gauge>& gpu_power_;
  prometheus::Family<prometheus::Gauge>& gpu_temperature_;
  prometheus::Family<prometheus::Gauge>& gpu_sm_clock_;
  prometheus::Family<prometheus::Gauge>& gpu_clocks_event_;
  prometheus::Family<prometheus::Counter>& gpu_ecc_;
  prometheus::Family<prometheus::Gauge>& mig_mem_used_;
  prometheus::Family<prometheus::Gauge>& mig_mem_total_;
  prometheus::Family<prometheus::Gauge>& mig_sm_util_;
  prometheus::Family<prometheus::Gauge>& mig_dram_util_;
  prometheus::Counter& samples_total_;
  prometheus::Family<prometheus::Counter>& errors_;

  mutable absl::Mutex sample_mu_;  // serialises samples
  bool discovered_ ABSL_GUARDED_BY(sample_mu_) = false;
  std::vector<std::unique_ptr<Device>> devices_ ABSL_GUARDED_BY(sample_mu_);
  std::map<std::string, bool> logged_ ABSL_GUARDED_BY(sample_mu_);  // calls already logged
  uint64_t samples_ ABSL_GUARDED_BY(sample_mu_) = 0;

  absl::Mutex stop_mu_;
  bool stop_ ABSL_GUARDED_BY(stop_mu_) = false;
  std::thread thread_;
};

}  // namespace kiln::node

namespace kiln::node {

// What kiln-node calls: for a cuda `device` and interval_ms > 0, loads NVML and starts a sampler
// of that device (its GPU, or its MIG slice and card) labelled with `node_id`. nullptr (nothing
// to sample) for cpu devices or interval_ms 0. InvalidArgument for a negative interval;
// FailedPrecondition when NVML cannot be loaded (a cuda node already needed it to probe).
absl::StatusOr<std::unique_ptr<GpuTelemetry>> StartGpuTelemetry(
    int interval_ms, const std::string& node_id, const kiln::v1::DeviceInfo& device,
    prometheus::Registry& registry);

}  // namespace kiln::node
