// A hand-written fake of NVML's function table (node/nvml.h) for tests: no GPU or driver needed.
// Whole GPUs and MIG slices (with NVML's GPU-instance profiles), telemetry figures, GPM samples
// for MIG slices, entry points that are NOT_SUPPORTED, and calls made to fail by symbol name
// (g.failing). The whole state is the global `g`; the C function pointers read it. Used by
// device_probe_test.cc and gpu_telemetry_test.cc.
#pragma once

#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "node/nvml.h"

namespace kiln::node::fake {

struct FakeDevice {
  std::string name;
  std::string uuid;
  unsigned long long memory = 0;
  int cc_major = 9, cc_minor = 0;
  unsigned cores = 0;  // 0 = NOT_SUPPORTED
  // GPU only:
  bool mig_enabled = false;
  std::vector<std::unique_ptr<FakeDevice>> migs;  // by MIG index; null = hole
  // MIG device only:
  FakeDevice* parent = nullptr;
  unsigned gi_id = 0;
  unsigned gi_profile_id = 0;
  nvml::DeviceAttributes attrs{};
  bool memory_supported = true;
  // Telemetry (node/gpu_telemetry.h):
  unsigned long long memory_used = 0;
  unsigned util_gpu = 0, util_memory = 0;  // percent
  unsigned power_mw = 0;                   // 0 = NOT_SUPPORTED
  unsigned temperature_c = 0;
  unsigned sm_mhz = 0;
  unsigned long long clocks_event_reasons = 0;
  unsigned long long ecc_corrected = 0, ecc_uncorrected = 0;
  bool ecc_supported = true;
  bool gpm_supported = false;       // GPU: nvmlGpmQueryDeviceSupport
  double gpm_sm_util = 0;           // MIG: percent, what nvmlGpmMetricsGet reports
  double gpm_dram_util = 0;
};

struct FakeProfile {
  unsigned id;
  unsigned slices;
  unsigned sms;
  unsigned long long memory_mb;
  std::string name;  // as GpuInstanceProfileInfo_v2 reports it
};

// The fake NVML's whole state; the C function pointers below read it.
struct FakeNvml {
  std::vector<std::unique_ptr<FakeDevice>> gpus;
  std::vector<FakeProfile> profiles;  // by NVML profile index
  bool parent_memory_denied = false;  // MIG mode without privileges
  std::set<std::string> failing;      // NVML symbols that answer NVML_ERROR_UNKNOWN
  int gpm_samples_live = 0;           // allocated and not freed
};
inline FakeNvml g;

inline bool Fails(const char* symbol) { return g.failing.count(symbol) > 0; }

inline FakeDevice* D(nvml::Device d) { return reinterpret_cast<FakeDevice*>(d); }
inline nvml::Device H(FakeDevice* d) { return reinterpret_cast<nvml::Device>(d); }
inline nvml::GpuInstance GI(FakeDevice* mig) { return reinterpret_cast<nvml::GpuInstance>(mig); }

inline void CopyOut(const std::string& s, char* buf, unsigned len) {
  std::strncpy(buf, s.c_str(), len - 1);
  buf[len - 1] = 0;
}

inline nvml::Return Init() { return nvml::kSuccess; }
inline const char* ErrorString(nvml::Return r) {
  return r == nvml::kErrorNotFound ? "Not Found" : "Error";
}
inline nvml::Return Count(unsigned* n) {
  *n = static_cast<unsigned>(g.gpus.size());
  return nvml::kSuccess;
}
inline nvml::Return ByIndex(unsigned i, nvml::Device* d) {
  if (i >= g.gpus.size()) return nvml::kErrorInvalidArgument;
  *d = H(g.gpus[i].get());
  return nvml::kSuccess;
}
inline nvml::Return Name(nvml::Device d, char* buf, unsigned len) {
  CopyOut(D(d)->name, buf, len);
  return nvml::kSuccess;
}
inline nvml::Return Uuid(nvml::Device d, char* buf, unsigned len) {
  CopyOut(D(d)->uuid, buf, len);
  return nvml::kSuccess;
}
inline nvml::Return Memory(nvml::Device d, nvml::Memory* m) {
  FakeDevice* f = D(d);
  if (!f->memory_supported || (f->parent == nullptr && f->mig_enabled && g.parent_memory_denied)) {
    return nvml::kErrorNoPermission;
  }
  if (Fails("nvmlDeviceGetMemoryInfo")) return nvml::kErrorUnknown;
  *m = {f->memory, f->memory - f->memory_used, f->memory_used};
  return nvml::kSuccess;
}
inline nvml::Return Cc(nvml::Device d, int* major, int* minor) {
  *major = D(d)->cc_major;
  *minor = D(d)->cc_minor;
  return nvml::kSuccess;
}
inline nvml::Return Cores(nvml::Device d, unsigned* n) {
  if (D(d)->cores == 0) return nvml::kErrorNotSupported;
  *n = D(d)->cores;
  return nvml::kSuccess;
}
inline nvml::Return MigMode(nvml::Device d, unsigned* current, unsigned* pending) {
  if (D(d)->parent != nullptr) return nvml::kErrorNotSupported;
  *current = *pending = D(d)->mig_enabled ? nvml::kMigEnable : nvml::kMigDisable;
  return nvml::kSuccess;
}
inline nvml::Return MaxMig(nvml::Device d, unsigned* n) {
  *n = D(d)->mig_enabled ? 7 : 0;
  return nvml::kSuccess;
}
inline nvml::Return MigByIndex(nvml::Device d, unsigned i, nvml::Device* out) {
  FakeDevice* f = D(d);
  if (i >= f->migs.size() || f->migs[i] == nullptr) return nvml::kErrorNotFound;
  *out = H(f->migs[i].get());
  return nvml::kSuccess;
}
inline nvml::Return IsMig(nvml::Device d, unsigned* is) {
  *is = D(d)->parent != nullptr;
  return nvml::kSuccess;
}
inline nvml::Return Parent(nvml::Device d, nvml::Device* out) {
  if (D(d)->parent == nullptr) return nvml::kErrorInvalidArgument;
  *out = H(D(d)->parent);
  return nvml::kSuccess;
}
inline nvml::Return GiId(nvml::Device d, unsigned* id) {
  *id = D(d)->gi_id;
  return nvml::kSuccess;
}
inline nvml::Return GiById(nvml::Device gpu, unsigned id, nvml::GpuInstance* gi) {
  for (auto& m : D(gpu)->migs) {
    if (m && m->gi_id == id) {
      *gi = GI(m.get());
      return nvml::kSuccess;
    }
  }
  return nvml::kErrorNotFound;
}
inline nvml::Return GiInfo(nvml::GpuInstance gi, nvml::GpuInstanceInfo* info) {
  FakeDevice* m = reinterpret_cast<FakeDevice*>(gi);
  *info = {H(m->parent), m->gi_id, m->gi_profile_id, {0, 0}};
  return nvml::kSuccess;
}
inline nvml::Return ProfileV(nvml::Device, unsigned p, nvml::GpuInstanceProfileInfoV2* v) {
  if (v->version != nvml::kGpuInstanceProfileInfoV2Version) return nvml::kErrorInvalidArgument;
  if (p >= g.profiles.size()) return nvml::kErrorInvalidArgument;
  const FakeProfile& f = g.profiles[p];
  v->id = f.id;
  v->slice_count = f.slices;
  v->multiprocessor_count = f.sms;
  v->memory_size_mb = f.memory_mb;
  CopyOut(f.name, v->name, sizeof(v->name));
  return nvml::kSuccess;
}
inline nvml::Return ProfileV1(nvml::Device, unsigned p, nvml::GpuInstanceProfileInfo* v) {
  if (p >= g.profiles.size()) return nvml::kErrorInvalidArgument;
  const FakeProfile& f = g.profiles[p];
  v->id = f.id;
  v->slice_count = f.slices;
  v->multiprocessor_count = f.sms;
  v->memory_size_mb = f.memory_mb;
  return nvml::kSuccess;
}
inline nvml::Return Attributes(nvml::Device d, nvml::DeviceAttributes* a) {
  if (D(d)->parent == nullptr) return nvml::kErrorNotSupported;
  *a = D(d)->attrs;
  return nvml::kSuccess;
}

inline nvml::Api FullApi() {
  nvml::Api api;
  api.init = Init;
  api.error_string = ErrorString;
  api.device_get_count = Count;
  api.device_get_handle_by_index = ByIndex;
  api.device_get_name = Name;
  api.device_get_uuid = Uuid;
  api.device_get_memory_info = Memory;
  api.device_get_cuda_compute_capability = Cc;
  api.device_get_num_gpu_cores = Cores;
  api.device_get_mig_mode = MigMode;
  api.device_get_max_mig_device_count = MaxMig;
  api.device_get_mig_device_handle_by_index = MigByIndex;
  api.device_is_mig_device_handle = IsMig;
  api.device_get_device_handle_from_mig_device_handle = Parent;
  api.device_get_gpu_instance_id = GiId;
  api.device_get_gpu_instance_by_id = GiById;
  api.gpu_instance_get_info = GiInfo;
  api.device_get_gpu_instance_profile_info = ProfileV1;
  api.device_get_gpu_instance_profile_info_v = ProfileV;
  api.device_get_attributes = Attributes;
  return api;
}

inline constexpr unsigned long long kH100Memory = 85520809984ull;  // what NVML reports for an H100 80GB
inline constexpr char kH100[] = "NVIDIA H100 80GB HBM3";

inline std::unique_ptr<FakeDevice> WholeH100(const std::string& uuid) {
  auto d = std::make_unique<FakeDevice>();
  d->name = kH100;
  d->uuid = uuid;
  d->memory = kH100Memory;
  d->cores = 16896;  // 132 SMs x 128
  return d;
}

inline std::unique_ptr<FakeDevice> Mig(FakeDevice* parent, const std::string& uuid, unsigned gi_id,
                                unsigned profile_id, unsigned g_slices, unsigned c_slices,
                                unsigned sms, unsigned long long mb) {
  auto m = std::make_unique<FakeDevice>();
  m->name = std::string(kH100) + " MIG";
  m->uuid = uuid;
  m->parent = parent;
  m->gi_id = gi_id;
  m->gi_profile_id = profile_id;
  m->memory = (mb - 512) << 20;  // a slice reports a little less than its profile
  m->attrs.multiprocessor_count = sms;
  m->attrs.gpu_instance_slice_count = g_slices;
  m->attrs.compute_instance_slice_count = c_slices;
  m->attrs.memory_size_mb = mb;
  return m;
}

// ---- Telemetry entry points.
inline nvml::Return Utilization(nvml::Device d, nvml::Utilization* u) {
  if (Fails("nvmlDeviceGetUtilizationRates")) return nvml::kErrorUnknown;
  if (D(d)->parent != nullptr) return nvml::kErrorNotSupported;  // as on real MIG slices
  *u = {D(d)->util_gpu, D(d)->util_memory};
  return nvml::kSuccess;
}
inline nvml::Return Power(nvml::Device d, unsigned* mw) {
  if (Fails("nvmlDeviceGetPowerUsage")) return nvml::kErrorUnknown;
  if (D(d)->power_mw == 0) return nvml::kErrorNotSupported;
  *mw = D(d)->power_mw;
  return nvml::kSuccess;
}
inline nvml::Return Temperature(nvml::Device d, unsigned sensor, unsigned* c) {
  if (Fails("nvmlDeviceGetTemperature")) return nvml::kErrorUnknown;
  if (sensor != nvml::kTemperatureGpu) return nvml::kErrorInvalidArgument;
  *c = D(d)->temperature_c;
  return nvml::kSuccess;
}
inline nvml::Return Clock(nvml::Device d, unsigned type, unsigned* mhz) {
  if (Fails("nvmlDeviceGetClockInfo")) return nvml::kErrorUnknown;
  if (type != nvml::kClockSm) return nvml::kErrorInvalidArgument;
  *mhz = D(d)->sm_mhz;
  return nvml::kSuccess;
}
inline nvml::Return ClocksEventReasons(nvml::Device d, unsigned long long* reasons) {
  if (Fails("nvmlDeviceGetCurrentClocksEventReasons")) return nvml::kErrorUnknown;
  *reasons = D(d)->clocks_event_reasons;
  return nvml::kSuccess;
}
inline nvml::Return EccErrors(nvml::Device d, unsigned type, unsigned counter,
                              unsigned long long* n) {
  if (Fails("nvmlDeviceGetTotalEccErrors")) return nvml::kErrorUnknown;
  if (!D(d)->ecc_supported) return nvml::kErrorNotSupported;
  if (counter != nvml::kVolatileEcc) return nvml::kErrorInvalidArgument;
  *n = type == nvml::kMemoryErrorCorrected ? D(d)->ecc_corrected : D(d)->ecc_uncorrected;
  return nvml::kSuccess;
}

// GPM: a sample records the slice's utilisation figures at the time it was taken.
struct FakeGpmSample {
  FakeDevice* slice = nullptr;
  double sm = 0, dram = 0;
};
inline nvml::Return GpmSupport(nvml::Device d, nvml::GpmSupport* s) {
  if (s->version != nvml::kGpmSupportVersion) return nvml::kErrorInvalidArgument;
  s->is_supported_device = D(d)->gpm_supported ? 1 : 0;
  return nvml::kSuccess;
}
inline nvml::Return GpmAlloc(nvml::GpmSample* out) {
  *out = reinterpret_cast<nvml::GpmSample>(new FakeGpmSample());
  ++g.gpm_samples_live;
  return nvml::kSuccess;
}
inline nvml::Return GpmFree(nvml::GpmSample s) {
  delete reinterpret_cast<FakeGpmSample*>(s);
  --g.gpm_samples_live;
  return nvml::kSuccess;
}
inline nvml::Return GpmMigSample(nvml::Device gpu, unsigned gi_id, nvml::GpmSample s) {
  if (Fails("nvmlGpmMigSampleGet")) return nvml::kErrorUnknown;
  for (auto& m : D(gpu)->migs) {
    if (m && m->gi_id == gi_id) {
      auto* fs = reinterpret_cast<FakeGpmSample*>(s);
      *fs = {m.get(), m->gpm_sm_util, m->gpm_dram_util};
      return nvml::kSuccess;
    }
  }
  return nvml::kErrorNotFound;
}
inline nvml::Return GpmMetrics(nvml::GpmMetricsGet* get) {
  if (get->version != nvml::kGpmMetricsGetVersion) return nvml::kErrorInvalidArgument;
  auto* b = reinterpret_cast<FakeGpmSample*>(get->sample2);
  for (unsigned i = 0; i < get->num_metrics; ++i) {
    nvml::GpmMetric& m = get->metrics[i];
    m.nvml_return = nvml::kSuccess;
    if (m.metric_id == nvml::kGpmMetricSmUtil) {
      m.value = b->sm;
    } else if (m.metric_id == nvml::kGpmMetricDramBwUtil) {
      m.value = b->dram;
    } else {
      m.nvml_return = nvml::kErrorNotSupported;
    }
  }
  return nvml::kSuccess;
}

// Every entry point, telemetry included.
inline nvml::Api FullTelemetryApi() {
  nvml::Api api = FullApi();
  api.device_get_utilization_rates = Utilization;
  api.device_get_power_usage = Power;
  api.device_get_temperature = Temperature;
  api.device_get_clock_info = Clock;
  api.device_get_current_clocks_event_reasons = ClocksEventReasons;
  api.device_get_total_ecc_errors = EccErrors;
  api.gpm_query_device_support = GpmSupport;
  api.gpm_sample_alloc = GpmAlloc;
  api.gpm_sample_free = GpmFree;
  api.gpm_mig_sample_get = GpmMigSample;
  api.gpm_metrics_get = GpmMetrics;
  return api;
}

// The fleet most tests use: GPU 0 a whole H100; GPU 1 an H100 in MIG mode with a 3g.40gb slice,
// a hole in the MIG index space, a 1g.10gb slice and a 1c.3g.40gb compute instance.
inline void MakeStandardFleet() {
  g = FakeNvml();
  // H100 MIG profiles as NVML numbers them (profile index → id, slices, SMs, MB).
  g.profiles = {{19, 1, 16, 9984, "MIG 1g.10gb"},
                {14, 2, 32, 20096, "MIG 2g.20gb"},
                {9, 3, 60, 40448, "MIG 3g.40gb"},
                {5, 4, 64, 40448, "MIG 4g.40gb"},
                {0, 7, 132, 80896, "MIG 7g.80gb"}};
  g.gpus.push_back(WholeH100("GPU-aaaaaaaa-0000-0000-0000-000000000000"));
  auto gpu1 = WholeH100("GPU-bbbbbbbb-0000-0000-0000-000000000001");
  gpu1->mig_enabled = true;
  FakeDevice* p = gpu1.get();
  gpu1->migs.push_back(Mig(p, "MIG-11111111-0000-0000-0000-000000000000", 2, 9, 3, 3, 60, 40448));
  gpu1->migs.push_back(nullptr);  // a hole in the MIG index space
  gpu1->migs.push_back(Mig(p, "MIG-22222222-0000-0000-0000-000000000000", 9, 19, 1, 1, 16, 9984));
  // A 1c.3g compute instance: 1 of its GPU instance's 3 slices, 16 of its SMs.
  gpu1->migs.push_back(Mig(p, "MIG-33333333-0000-0000-0000-000000000000", 1, 9, 3, 1, 16, 40448));
  g.gpus.push_back(std::move(gpu1));
}

}  // namespace kiln::node::fake
