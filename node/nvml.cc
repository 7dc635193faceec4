#include "node/nvml.h"

#include <dlfcn.h>

#include "absl/strings/str_cat.h"

namespace kiln::node::nvml {
namespace {

template <typename Fn>
void Resolve(void* lib, const char* symbol, Fn* out) {
  *out = reinterpret_cast<Fn>(dlsym(lib, symbol));
}

absl::StatusOr<const Api*> LoadOnce() {
  // RTLD_LOCAL: NVML's symbols stay out of the global namespace. Never dlclose'd: NVML keeps
  // driver state for the process's lifetime.
  void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    return absl::NotFoundError(absl::StrCat(
        "NVML (libnvidia-ml.so.1) cannot be loaded: no NVIDIA driver on this machine? (",
        why ? why : "dlopen failed", ")"));
  }
  static Api api;
  Resolve(lib, "nvmlInit_v2", &api.init);
  Resolve(lib, "nvmlShutdown", &api.shutdown);
  Resolve(lib, "nvmlErrorString", &api.error_string);
  Resolve(lib, "nvmlDeviceGetCount_v2", &api.device_get_count);
  Resolve(lib, "nvmlDeviceGetHandleByIndex_v2", &api.device_get_handle_by_index);
  Resolve(lib, "nvmlDeviceGetName", &api.device_get_name);
  Resolve(lib, "nvmlDeviceGetUUID", &api.device_get_uuid);
  Resolve(lib, "nvmlDeviceGetMemoryInfo", &api.device_get_memory_info);
  Resolve(lib, "nvmlDeviceGetCudaComputeCapability", &api.device_get_cuda_compute_capability);
  Resolve(lib, "nvmlDeviceGetNumGpuCores", &api.device_get_num_gpu_cores);
  Resolve(lib, "nvmlDeviceGetMigMode", &api.device_get_mig_mode);
  Resolve(lib, "nvmlDeviceGetMaxMigDeviceCount", &api.device_get_max_mig_device_count);
  Resolve(lib, "nvmlDeviceGetMigDeviceHandleByIndex", &api.device_get_mig_device_handle_by_index);
  Resolve(lib, "nvmlDeviceIsMigDeviceHandle", &api.device_is_mig_device_handle);
  Resolve(lib, "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
          &api.device_get_device_handle_from_mig_device_handle);
  Resolve(lib, "nvmlDeviceGetGpuInstanceId", &api.device_get_gpu_instance_id);
  Resolve(lib, "nvmlDeviceGetGpuInstanceById", &api.device_get_gpu_instance_by_id);
  Resolve(lib, "nvmlGpuInstanceGetInfo", &api.gpu_instance_get_info);
  Resolve(lib, "nvmlDeviceGetGpuInstanceProfileInfo", &api.device_get_gpu_instance_profile_info);
  Resolve(lib, "nvmlDeviceGetGpuInstanceProfileInfoV", &api.device_get_gpu_instance_profile_info_v);
  Resolve(lib, "nvmlDeviceGetAttributes_v2", &api.device_get_attributes);
  Resolve(lib, "nvmlDeviceGetUtilizationRates", &api.device_get_utilization_rates);
  Resolve(lib, "nvmlDeviceGetPowerUsage", &api.device_get_power_usage);
  Resolve(lib, "nvmlDeviceGetTemperature", &api.device_get_temperature);
  Resolve(lib, "nvmlDeviceGetClockInfo", &api.device_get_clock_info);
  Resolve(lib, "nvmlDeviceGetCurrentClocksEventReasons",
          &api.device_get_current_clocks_event_reasons);
  if (api.device_get_current_clocks_event_reasons == nullptr) {
    Resolve(lib, "nvmlDeviceGetCurrentClocksThrottleReasons",
            &api.device_get_current_clocks_event_reasons);
  }
  Resolve(lib, "nvmlDeviceGetTotalEccErrors", &api.device_get_total_ecc_errors);
  Resolve(lib, "nvmlGpmQueryDeviceSupport", &api.gpm_query_device_support);
  Resolve(lib, "nvmlGpmSampleAlloc", &api.gpm_sample_alloc);
  Resolve(lib, "nvmlGpmSampleFree", &api.gpm_sample_free);
  Resolve(lib, "nvmlGpmMigSampleGet", &api.gpm_mig_sample_get);
  Resolve(lib, "nvmlGpmMetricsGet", &api.gpm_metrics_get);
  if (api.init == nullptr || api.device_get_handle_by_index == nullptr ||
      api.device_get_count == nullptr) {
    return absl::FailedPreconditionError(
        "NVML (libnvidia-ml.so.1) lacks nvmlInit_v2 / nvmlDeviceGetCount_v2 / "
        "nvmlDeviceGetHandleByIndex_v2: driver too old");
  }
  if (Return r = api.init(); r != kSuccess) {
    return absl::UnavailableError(absl::StrCat("nvmlInit failed: ", ErrorText(api, r)));
  }
  return &api;
}

}  // namespace

absl::StatusOr<const Api*> Load() {
  static const absl::StatusOr<const Api*> loaded = LoadOnce();  // thread-safe static init
  return loaded;
}

std::string ErrorText(const Api& api, Return r) {
  const char* text = api.error_string ? api.error_string(r) : nullptr;
  return absl::StrCat("NVML error ", r, text ? absl::StrCat(" (", text, ")") : "");
}

}  // namespace kiln::node::nvml
