#include "node/gpu_telemetry.h"

#include <cstring>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/log.h"
#include "node/device_probe.h"

namespace kiln::node {
namespace {

std::string UuidOf(const nvml::Api& api, nvml::Device d) {
  char buf[nvml::kDeviceUuidV2BufferSize] = {};
  if (api.device_get_uuid == nullptr || api.device_get_uuid(d, buf, sizeof(buf)) != nvml::kSuccess) {
    return "";
  }
  return std::string(buf, strnlen(buf, sizeof(buf)));
}

struct ReasonBit {
  unsigned long long bit;
  const char* name;
};
constexpr ReasonBit kReasons[] = {
    {nvml::kClocksEventGpuIdle, "gpu_idle"},
    {nvml::kClocksEventApplicationsClocksSetting, "applications_clocks_setting"},
    {nvml::kClocksEventSwPowerCap, "sw_power_cap"},
    {nvml::kClocksEventHwSlowdown, "hw_slowdown"},
    {nvml::kClocksEventSyncBoost, "sync_boost"},
    {nvml::kClocksEventSwThermalSlowdown, "sw_thermal_slowdown"},
    {nvml::kClocksEventHwThermalSlowdown, "hw_thermal_slowdown"},
    {nvml::kClocksEventHwPowerBrakeSlowdown, "hw_power_brake_slowdown"},
    {nvml::kClocksEventDisplayClockSetting, "display_clock_setting"},
};

prometheus::Family<prometheus::Gauge>& GaugeFamily(prometheus::Registry& r, const char* name,
                                                   const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r);
}

}  // namespace

struct GpuTelemetry::Device {
  nvml::Device handle = nullptr;
  nvml::Device parent = nullptr;  // MIG: the card
  bool mig = false;
  unsigned gpu_index = 0;
  unsigned gpu_instance_id = 0;  // MIG: for GPM
  std::string uuid;
  std::string mig_profile;
  unsigned long long ecc[2] = {0, 0};  // last volatile counts seen (corrected, uncorrected)
  bool ecc_seen[2] = {false, false};
  bool gpm = false;                      // MIG: GPM usable on the card
  nvml::GpmSample previous = nullptr;    // MIG: last GPM sample
};

absl::Status GpuTelemetryOptions::Validate() const {
  if (interval_ms <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("interval_ms: ", interval_ms, " (want a positive number of milliseconds)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<GpuTelemetry>> GpuTelemetry::Create(
    const GpuTelemetryOptions& options, const nvml::Api& nvml, prometheus::Registry& registry) {
  if (auto s = options.Validate(); !s.ok()) return s;
  return std::unique_ptr<GpuTelemetry>(new GpuTelemetry(options, nvml, registry));
}

GpuTelemetry::GpuTelemetry(const GpuTelemetryOptions& options, const nvml::Api& nvml,
                           prometheus::Registry& r)
    : options_(options),
      nvml_(nvml),
      registry_(r),
      gpu_util_(GaugeFamily(r, "kiln_gpu_utilization_ratio",
                            "Share of NVML's last sample period (1/6 s to 1 s) in which a kernel "
                            "ran on the GPU")),
      gpu_mem_util_(GaugeFamily(r, "kiln_gpu_memory_utilization_ratio",
                                "Share of NVML's last sample period in which GPU memory was read "
                                "or written")),
      gpu_mem_used_(GaugeFamily(r, "kiln_gpu_memory_used_bytes", "GPU memory in use, bytes")),
      gpu_mem_total_(GaugeFamily(r, "kiln_gpu_memory_total_bytes", "GPU memory in all, bytes")),
      gpu_power_(GaugeFamily(r, "kiln_gpu_power_watts", "GPU board power draw, watts")),
      gpu_temperature_(
          GaugeFamily(r, "kiln_gpu_temperature_celsius", "GPU core temperature, celsius")),
      gpu_sm_clock_(GaugeFamily(r, "kiln_gpu_sm_clock_hertz", "GPU SM clock, hertz")),
      gpu_clocks_event_(GaugeFamily(r, "kiln_gpu_clocks_event_active",
                                    "1 while NVML reports this clock event (throttle) reason")),
      gpu_ecc_(prometheus::BuildCounter()
                   .Name("kiln_gpu_ecc_errors_total")
                   .Help("GPU memory ECC errors since the driver loaded, by type")
                   .Register(r)),
      mig_mem_used_(GaugeFamily(r, "kiln_mig_memory_used_bytes", "MIG slice memory in use, bytes")),
      mig_mem_total_(
          GaugeFamily(r, "kiln_mig_memory_total_bytes", "MIG slice memory in all, bytes")),
      mig_sm_util_(GaugeFamily(
          r, "kiln_mig_sm_utilization_ratio",
          "Share of a MIG slice's SMs busy over the last sample interval, from NVML GPM; absent "
          "where the driver or card offers no GPM for MIG (before Hopper, or an older driver)")),
      mig_dram_util_(GaugeFamily(
          r, "kiln_mig_dram_bandwidth_utilization_ratio",
          "A MIG slice's DRAM bandwidth over the last sample interval as a share of the maximum, "
          "from NVML GPM; absent where the driver or card offers no GPM for MIG")),
      samples_total_(prometheus::BuildCounter()
                         .Name("kiln_gpu_telemetry_samples_total")
                         .Help("Passes of the GPU telemetry sampler over its devices")
                         .Register(r)
                         .Add({{"node", options.node_id}})),
      errors_(prometheus::BuildCounter()
                  .Name("kiln_gpu_telemetry_errors_total")
                  .Help("NVML calls of the GPU telemetry sampler that failed, by call (the "
                        "figure keeps its last value)")
                  .Register(r)) {}

GpuTelemetry::~GpuTelemetry() {
  Stop();
  absl::MutexLock lock(&sample_mu_);
  for (auto& d : devices_) {
    if (d->previous != nullptr && nvml_.gpm_sample_free != nullptr) {
      nvml_.gpm_sample_free(d->previous);
    }
  }
}

void GpuTelemetry::Start() {
  SampleOnce();
  thread_ = std::thread([this] { Run(); });
}

void GpuTelemetry::Stop() {
  {
    absl::MutexLock lock(&stop_mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void GpuTelemetry::Run() {
  absl::MutexLock lock(&stop_mu_);
  while (true) {
    stop_mu_.AwaitWithTimeout(absl::Condition(&stop_), absl::Milliseconds(options_.interval_ms));
    if (stop_) return;
    stop_mu_.Unlock();
    SampleOnce();
    stop_mu_.Lock();
  }
}

uint64_t GpuTelemetry::samples() const {
  absl::MutexLock lock(&sample_mu_);
  return samples_;
}

bool GpuTelemetry::Check(nvml::Return r, const std::string& call) {
  if (r == nvml::kSuccess) return true;
  if (r == nvml::kErrorNotSupported) return false;
  errors_.Add({{"node", options_.node_id}, {"call", call}}).Increment();
  if (!logged_[call]) {
    logged_[call] = true;  // once per call: a broken call fails every second
    LogWarning("gpu_telemetry",
               absl::StrCat(call, " failed: ", nvml::ErrorText(nvml_, r),
                            " (counted in kiln_gpu_telemetry_errors_total; sampling goes on)"));
  }
  return false;
}

prometheus::Gauge& GpuTelemetry::G(prometheus::Family<prometheus::Gauge>& f, const Device& d,
                                   const std::map<std::string, std::string>& extra) {
  std::map<std::string, std::string> labels = {{"node", options_.node_id},
                                               {"gpu", absl::StrCat(d.gpu_index)},
                                               {"uuid", d.uuid},
                                               {"mig_profile", d.mig_profile}};
  for (const auto& [k, v] : extra) labels[k] = v;
  return f.Add(labels);
}

void GpuTelemetry::Discover() {
  discovered_ = true;
  unsigned count = 0;
  if (!Check(nvml_.device_get_count(&count), "nvmlDeviceGetCount")) {
    discovered_ = false;  // try again next time
    return;
  }
  const std::string& want = options_.device_uuid;
  for (unsigned i = 0; i < count; ++i) {
    nvml::Device gpu = nullptr;
    if (!Check(nvml_.device_get_handle_by_index(i, &gpu), "nvmlDeviceGetHandleByIndex")) continue;
    auto card = std::make_unique<Device>();
    card->handle = gpu;
    card->gpu_index = i;
    card->uuid = UuidOf(nvml_, gpu);
    const bool card_selected = want.empty() || want == card->uuid;
    std::vector<std::unique_ptr<Device>> slices;
    unsigned current = nvml::kMigDisable, pending = nvml::kMigDisable, max = 0;
    if (nvml_.device_get_mig_mode != nullptr &&
        nvml_.device_get_mig_mode(gpu, &current, &pending) == nvml::kSuccess &&
        current == nvml::kMigEnable && nvml_.device_get_max_mig_device_count != nullptr &&
        nvml_.device_get_mig_device_handle_by_index != nullptr &&
        nvml_.device_get_max_mig_device_count(gpu, &max) == nvml::kSuccess) {
      nvml::GpmSupport support{nvml::kGpmSupportVersion, 0};
      const bool gpm = nvml_.gpm_query_device_support != nullptr &&
                       nvml_.gpm_mig_sample_get != nullptr && nvml_.gpm_metrics_get != nullptr &&
                       nvml_.gpm_sample_alloc != nullptr && nvml_.gpm_sample_free != nullptr &&
                       nvml_.gpm_query_device_support(gpu, &support) == nvml::kSuccess &&
                       support.is_supported_device != 0;
      for (unsigned m = 0; m < max; ++m) {
        nvml::Device h = nullptr;
        if (nvml_.device_get_mig_device_handle_by_index(gpu, m, &h) != nvml::kSuccess) continue;
        auto slice = std::make_unique<Device>();
        slice->handle = h;
        slice->parent = gpu;
        slice->mig = true;
        slice->gpu_index = i;
        slice->uuid = UuidOf(nvml_, h);
        slice->gpm = gpm;
        if (nvml_.device_get_gpu_instance_id == nullptr ||
            nvml_.device_get_gpu_instance_id(h, &slice->gpu_instance_id) != nvml::kSuccess) {
          slice->gpm = false;
        }
        // The profile name as the device probe gives it to the coordinator ("3g.40gb").
        ProbeOptions probe;
        probe.device = "cuda:0";
        probe.cuda_visible_devices = slice->uuid;
        auto info = ProbeDevice(probe, &nvml_);
        slice->mig_profile = info.ok() && !info->mig_profile().empty() ? info->mig_profile() : "mig";
        if (card_selected || want == slice->uuid) slices.push_back(std::move(slice));
      }
    }
    if (card_selected || !slices.empty()) devices_.push_back(std::move(card));
    for (auto& s : slices) devices_.push_back(std::move(s));
  }
}

void GpuTelemetry::SampleOnce() {
  absl::MutexLock lock(&sample_mu_);
  if (!discovered_) Discover();
  for (auto& d : devices_) {
    if (d->mig) {
      SampleMig(*d);
    } else {
      SampleGpu(*d);
    }
  }
  ++samples_;
  samples_total_.Increment();
}

void GpuTelemetry::SampleGpu(Device& d) {
  const nvml::Api& api = nvml_;
  if (api.device_get_utilization_rates != nullptr) {
    nvml::Utilization u{};
    if (Check(api.device_get_utilization_rates(d.handle, &u), "nvmlDeviceGetUtilizationRates")) {
      G(gpu_util_, d).Set(u.gpu / 100.0);
      G(gpu_mem_util_, d).Set(u.memory / 100.0);
    }
  }
  if (api.device_get_memory_info != nullptr) {
    nvml::Memory m{};
    if (Check(api.device_get_memory_info(d.handle, &m), "nvmlDeviceGetMemoryInfo")) {
      G(gpu_mem_used_, d).Set(static_cast<double>(m.used));
      G(gpu_mem_total_, d).Set(static_cast<double>(m.total));
    }
  }
  if (api.device_get_power_usage != nullptr) {
    unsigned mw = 0;
    if (Check(api.device_get_power_usage(d.handle, &mw), "nvmlDeviceGetPowerUsage")) {
      G(gpu_power_, d).Set(mw / 1000.0);
    }
  }
  if (api.device_get_temperature != nullptr) {
    unsigned c = 0;
    if (Check(api.device_get_temperature(d.handle, nvml::kTemperatureGpu, &c),
              "nvmlDeviceGetTemperature")) {
      G(gpu_temperature_, d).Set(c);
    }
  }
  if (api.device_get_clock_info != nullptr) {
    unsigned mhz = 0;
    if (Check(api.device_get_clock_info(d.handle, nvml::kClockSm, &mhz), "nvmlDeviceGetClockInfo")) {
      G(gpu_sm_clock_, d).Set(mhz * 1e6);
    }
  }
  if (api.device_get_current_clocks_event_reasons != nullptr) {
    unsigned long long reasons = 0;
    if (Check(api.device_get_current_clocks_event_reasons(d.handle, &reasons),
              "nvmlDeviceGetCurrentClocksEventReasons")) {
      for (const ReasonBit& r : kReasons) {
        G(gpu_clocks_event_, d, {{"reason", r.name}}).Set((reasons & r.bit) != 0 ? 1 : 0);
      }
    }
  }
  if (api.device_get_total_ecc_errors != nullptr) {
    const std::pair<unsigned, const char*> types[] = {
        {nvml::kMemoryErrorCorrected, "corrected"}, {nvml::kMemoryErrorUncorrected, "uncorrected"}};
    for (int t = 0; t < 2; ++t) {
      unsigned long long n = 0;
      if (!Check(api.device_get_total_ecc_errors(d.handle, types[t].first, nvml::kVolatileEcc, &n),
                 "nvmlDeviceGetTotalEccErrors")) {
        continue;
      }
      prometheus::Counter& c = gpu_ecc_.Add({{"node", options_.node_id},
                                             {"gpu", absl::StrCat(d.gpu_index)},
                                             {"uuid", d.uuid},
                                             {"mig_profile", d.mig_profile},
                                             {"type", types[t].second}});
      // NVML's count is cumulative; the counter follows it (a driver reload resets NVML's
      // count, and the counter just waits until it is exceeded again).
      if (!d.ecc_seen[t]) {
        c.Increment(static_cast<double>(n));
      } else if (n > d.ecc[t]) {
        c.Increment(static_cast<double>(n - d.ecc[t]));
      }
      d.ecc_seen[t] = true;
      d.ecc[t] = n;
    }
  }
}

void GpuTelemetry::SampleMig(Device& d) {
  const nvml::Api& api = nvml_;
  if (api.device_get_memory_info != nullptr) {
    nvml::Memory m{};
    if (Check(api.device_get_memory_info(d.handle, &m), "nvmlDeviceGetMemoryInfo(mig)")) {
      G(mig_mem_used_, d).Set(static_cast<double>(m.used));
      G(mig_mem_total_, d).Set(static_cast<double>(m.total));
    }
  }
  if (!d.gpm) return;
  nvml::GpmSample sample = nullptr;
  if (!Check(api.gpm_sample_alloc(&sample), "nvmlGpmSampleAlloc")) return;
  if (!Check(api.gpm_mig_sample_get(d.parent, d.gpu_instance_id, sample), "nvmlGpmMigSampleGet")) {
    api.gpm_sample_free(sample);
    return;
  }
  if (d.previous != nullptr) {
    nvml::GpmMetricsGet get{};
    get.version = nvml::kGpmMetricsGetVersion;
    get.num_metrics = 2;
    get.sample1 = d.previous;
    get.sample2 = sample;
    get.metrics[0].metric_id = nvml::kGpmMetricSmUtil;
    get.metrics[1].metric_id = nvml::kGpmMetricDramBwUtil;
    if (Check(api.gpm_metrics_get(&get), "nvmlGpmMetricsGet")) {
      if (get.metrics[0].nvml_return == nvml::kSuccess) {
        G(mig_sm_util_, d).Set(get.metrics[0].value / 100.0);
      }
      if (get.metrics[1].nvml_return == nvml::kSuccess) {
        G(mig_dram_util_, d).Set(get.metrics[1].value / 100.0);
      }
    }
    api.gpm_sample_free(d.previous);
  }
  d.previous = sample;
}

absl::StatusOr<std::unique_ptr<GpuTelemetry>> StartGpuTelemetry(
    int interval_ms, const std::string& node_id, const kiln::v1::DeviceInfo& device,
    prometheus::Registry& registry) {
  if (interval_ms < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gpu_telemetry_interval_ms: ", interval_ms, " (want milliseconds, or 0 for off)"));
  }
  if (interval_ms == 0 || device.kind() != "cuda") return nullptr;
  auto api = nvml::Load();
  if (!api.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("GPU telemetry: ", api.status().message()));
  }
  GpuTelemetryOptions options;
  options.interval_ms = interval_ms;
  options.node_id = node_id;
  options.device_uuid = device.uuid();
  auto telemetry = GpuTelemetry::Create(options, **api, registry);
  if (!telemetry.ok()) return telemetry.status();
  (*telemetry)->Start();
  return telemetry;
}

}  // namespace kiln::node
