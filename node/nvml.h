// The part of NVML (NVIDIA's management library) the node reads, as a table of C function
// pointers. LoadNvml() fills it at run time with dlopen("libnvidia-ml.so.1"), so building needs no
// NVML header or library and the same binary runs where no NVIDIA driver is installed; tests fill
// it with fakes (tests/node/device_probe_test.cc).
//
// The C types below mirror nvml.h (CUDA 13.0, NVML API version 13) for exactly the members used
// here; the layouts are part of NVML's stable ABI (versioned structs carry their version word).
// A member left null was not exported by the installed driver; callers treat it as "not
// supported".
//
// Threads: the table is immutable once loaded; NVML itself is thread-safe.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace kiln::node::nvml {

using Return = int;  // nvmlReturn_t
inline constexpr Return kSuccess = 0;
inline constexpr Return kErrorUninitialized = 1;
inline constexpr Return kErrorInvalidArgument = 2;
inline constexpr Return kErrorNotSupported = 3;
inline constexpr Return kErrorNoPermission = 4;
inline constexpr Return kErrorNotFound = 6;
inline constexpr Return kErrorInsufficientSize = 7;
inline constexpr Return kErrorDriverNotLoaded = 9;
inline constexpr Return kErrorUnknown = 999;

struct DeviceOpaque;
using Device = DeviceOpaque*;  // nvmlDevice_t: a GPU or a MIG device
struct GpuInstanceOpaque;
using GpuInstance = GpuInstanceOpaque*;  // nvmlGpuInstance_t

// nvmlMemory_t (bytes).
struct Memory {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
};

// nvmlGpuInstancePlacement_t, nvmlGpuInstanceInfo_t.
struct GpuInstancePlacement {
  unsigned int start;
  unsigned int size;
};
struct GpuInstanceInfo {
  Device device;
  unsigned int id;
  unsigned int profile_id;
  GpuInstancePlacement placement;
};

// nvmlGpuInstanceProfileInfo_v2_t. `version` must be kGpuInstanceProfileInfoV2Version.
inline constexpr int kDeviceNameV2BufferSize = 96;  // NVML_DEVICE_NAME_V2_BUFFER_SIZE
struct GpuInstanceProfileInfoV2 {
  unsigned int version;
  unsigned int id;
  unsigned int is_p2p_supported;
  unsigned int slice_count;
  unsigned int instance_count;
  unsigned int multiprocessor_count;
  unsigned int copy_engine_count;
  unsigned int decoder_count;
  unsigned int encoder_count;
  unsigned int jpeg_count;
  unsigned int ofa_count;
  unsigned long long memory_size_mb;
  char name[kDeviceNameV2BufferSize];  // e.g. "MIG 3g.40gb"
};
static_assert(sizeof(GpuInstanceProfileInfoV2) == 0x98, "nvmlGpuInstanceProfileInfo_v2_t layout");
// NVML_STRUCT_VERSION(GpuInstanceProfileInfo, 2) == 0x02000098.
inline constexpr unsigned int kGpuInstanceProfileInfoV2Version =
    static_cast<unsigned int>(sizeof(GpuInstanceProfileInfoV2)) | (2u << 24);

// nvmlGpuInstanceProfileInfo_t (v1: no version word, no name).
struct GpuInstanceProfileInfo {
  unsigned int id;
  unsigned int is_p2p_supported;
  unsigned int slice_count;
  unsigned int instance_count;
  unsigned int multiprocessor_count;
  unsigned int copy_engine_count;
  unsigned int decoder_count;
  unsigned int encoder_count;
  unsigned int jpeg_count;
  unsigned int ofa_count;
  unsigned long long memory_size_mb;
};

// nvmlDeviceAttributes_t: what nvmlDeviceGetAttributes_v2 reports for a MIG device handle.
struct DeviceAttributes {
  unsigned int multiprocessor_count;
  unsigned int shared_copy_engine_count;
  unsigned int shared_decoder_count;
  unsigned int shared_encoder_count;
  unsigned int shared_jpeg_count;
  unsigned int shared_ofa_count;
  unsigned int gpu_instance_slice_count;
  unsigned int compute_instance_slice_count;
  unsigned long long memory_size_mb;
};

// nvmlUtilization_t: percent of the last sample period (1/6 s to 1 s, by product) in which a
// kernel ran (gpu) / device memory was read or written (memory).
struct Utilization {
  unsigned int gpu;
  unsigned int memory;
};

inline constexpr unsigned int kTemperatureGpu = 0;  // NVML_TEMPERATURE_GPU
inline constexpr unsigned int kClockSm = 1;         // NVML_CLOCK_SM
inline constexpr unsigned int kMemoryErrorCorrected = 0;    // NVML_MEMORY_ERROR_TYPE_CORRECTED
inline constexpr unsigned int kMemoryErrorUncorrected = 1;  // NVML_MEMORY_ERROR_TYPE_UNCORRECTED
inline constexpr unsigned int kVolatileEcc = 0;             // NVML_VOLATILE_ECC (since boot)

// nvmlClocksEventReasons (formerly nvmlClocksThrottleReasons) bits.
inline constexpr unsigned long long kClocksEventGpuIdle = 0x1;
inline constexpr unsigned long long kClocksEventApplicationsClocksSetting = 0x2;
inline constexpr unsigned long long kClocksEventSwPowerCap = 0x4;
inline constexpr unsigned long long kClocksEventHwSlowdown = 0x8;
inline constexpr unsigned long long kClocksEventSyncBoost = 0x10;
inline constexpr unsigned long long kClocksEventSwThermalSlowdown = 0x20;
inline constexpr unsigned long long kClocksEventHwThermalSlowdown = 0x40;
inline constexpr unsigned long long kClocksEventHwPowerBrakeSlowdown = 0x80;
inline constexpr unsigned long long kClocksEventDisplayClockSetting = 0x100;

// GPU Performance Monitoring (GPM, Hopper and later): counters sampled twice, metrics computed
// over the interval between the samples. For MIG, nvmlGpmMigSampleGet samples one GPU instance.
struct GpmSampleOpaque;
using GpmSample = GpmSampleOpaque*;  // nvmlGpmSample_t
inline constexpr unsigned int kGpmSupportVersion = 1;      // NVML_GPM_SUPPORT_VERSION
inline constexpr unsigned int kGpmMetricsGetVersion = 1;   // NVML_GPM_METRICS_GET_VERSION
inline constexpr unsigned int kGpmMetricSmUtil = 2;        // NVML_GPM_METRIC_SM_UTIL, percent
inline constexpr unsigned int kGpmMetricDramBwUtil = 10;   // NVML_GPM_METRIC_DRAM_BW_UTIL, percent
// nvmlGpmSupport_t.
struct GpmSupport {
  unsigned int version;
  unsigned int is_supported_device;
};
// nvmlGpmMetric_t.
struct GpmMetric {
  unsigned int metric_id;
  Return nvml_return;
  double value;
  struct {
    char* short_name;
    char* long_name;
    char* unit;
  } metric_info;
};
static_assert(sizeof(GpmMetric) == 40, "nvmlGpmMetric_t layout");
// nvmlGpmMetricsGet_t. NVML declares metrics[NVML_GPM_METRIC_MAX] and reads/writes only the first
// num_metrics entries, so a shorter array at the end of the struct is ABI-compatible.
inline constexpr int kGpmMaxMetrics = 8;
struct GpmMetricsGet {
  unsigned int version;
  unsigned int num_metrics;
  GpmSample sample1;
  GpmSample sample2;
  GpmMetric metrics[kGpmMaxMetrics];
};

inline constexpr unsigned int kMigDisable = 0;  // NVML_DEVICE_MIG_DISABLE
inline constexpr unsigned int kMigEnable = 1;   // NVML_DEVICE_MIG_ENABLE
inline constexpr int kDeviceUuidV2BufferSize = 96;  // NVML_DEVICE_UUID_V2_BUFFER_SIZE

// One pointer per NVML entry point; the comment names the exported symbol.
struct Api {
  Return (*init)() = nullptr;                        // nvmlInit_v2 (required)
  Return (*shutdown)() = nullptr;                    // nvmlShutdown
  const char* (*error_string)(Return) = nullptr;     // nvmlErrorString
  Return (*device_get_count)(unsigned int*) = nullptr;                   // nvmlDeviceGetCount_v2
  Return (*device_get_handle_by_index)(unsigned int, Device*) = nullptr;  // ..._v2 (required)
  Return (*device_get_name)(Device, char*, unsigned int) = nullptr;       // nvmlDeviceGetName
  Return (*device_get_uuid)(Device, char*, unsigned int) = nullptr;       // nvmlDeviceGetUUID
  Return (*device_get_memory_info)(Device, Memory*) = nullptr;  // nvmlDeviceGetMemoryInfo
  Return (*device_get_cuda_compute_capability)(Device, int*, int*) = nullptr;
  Return (*device_get_num_gpu_cores)(Device, unsigned int*) = nullptr;  // nvmlDeviceGetNumGpuCores
  Return (*device_get_mig_mode)(Device, unsigned int*, unsigned int*) = nullptr;
  Return (*device_get_max_mig_device_count)(Device, unsigned int*) = nullptr;
  Return (*device_get_mig_device_handle_by_index)(Device, unsigned int, Device*) = nullptr;
  Return (*device_is_mig_device_handle)(Device, unsigned int*) = nullptr;
  Return (*device_get_device_handle_from_mig_device_handle)(Device, Device*) = nullptr;
  Return (*device_get_gpu_instance_id)(Device, unsigned int*) = nullptr;
  Return (*device_get_gpu_instance_by_id)(Device, unsigned int, GpuInstance*) = nullptr;
  Return (*gpu_instance_get_info)(GpuInstance, GpuInstanceInfo*) = nullptr;
  // nvmlDeviceGetGpuInstanceProfileInfo / ...InfoV: profile = NVML_GPU_INSTANCE_PROFILE_* index.
  Return (*device_get_gpu_instance_profile_info)(Device, unsigned int,
                                                 GpuInstanceProfileInfo*) = nullptr;
  Return (*device_get_gpu_instance_profile_info_v)(Device, unsigned int,
                                                   GpuInstanceProfileInfoV2*) = nullptr;
  Return (*device_get_attributes)(Device, DeviceAttributes*) = nullptr;  // ..._v2

  // Telemetry (node/gpu_telemetry.h); each may be null on an older driver.
  Return (*device_get_utilization_rates)(Device, Utilization*) = nullptr;
  Return (*device_get_power_usage)(Device, unsigned int*) = nullptr;  // milliwatts
  Return (*device_get_temperature)(Device, unsigned int, unsigned int*) = nullptr;  // celsius
  Return (*device_get_clock_info)(Device, unsigned int, unsigned int*) = nullptr;   // MHz
  // nvmlDeviceGetCurrentClocksEventReasons, else (older drivers) ...ClocksThrottleReasons.
  Return (*device_get_current_clocks_event_reasons)(Device, unsigned long long*) = nullptr;
  // nvmlDeviceGetTotalEccErrors(device, error type, counter type, count).
  Return (*device_get_total_ecc_errors)(Device, unsigned int, unsigned int,
                                        unsigned long long*) = nullptr;
  Return (*gpm_query_device_support)(Device, GpmSupport*) = nullptr;  // nvmlGpmQueryDeviceSupport
  Return (*gpm_sample_alloc)(GpmSample*) = nullptr;                    // nvmlGpmSampleAlloc
  Return (*gpm_sample_free)(GpmSample) = nullptr;                      // nvmlGpmSampleFree
  // nvmlGpmMigSampleGet(parent GPU, GPU instance id, sample).
  Return (*gpm_mig_sample_get)(Device, unsigned int, GpmSample) = nullptr;
  Return (*gpm_metrics_get)(GpmMetricsGet*) = nullptr;  // nvmlGpmMetricsGet
};

// Opens libnvidia-ml.so.1 (once per process; the library stays loaded), resolves the table and
// calls nvmlInit_v2. NotFound when the library is absent (no NVIDIA driver installed),
// FailedPrecondition when it lacks a required symbol, Unavailable when nvmlInit fails (driver
// not loaded, no permission, ...). The result is cached: later calls return the same table or
// the same error. Thread-safe.
absl::StatusOr<const Api*> Load();

// "NVML error 6 (Not Found)"; uses api.error_string when present.
std::string ErrorText(const Api& api, Return r);

}  // namespace kiln::node::nvml
