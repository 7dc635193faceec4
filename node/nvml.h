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
