#include "node/device_probe.h"

#include <unistd.h>

#include <cmath>
#include <functional>
#include <cstring>
#include <fstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

#include "pipeline/toolchain.h"

namespace kiln::node {
namespace {

using nvml::Api;
using nvml::Device;

std::string FromBuffer(const char* buf, size_t size) {
  return std::string(buf, strnlen(buf, size));
}

absl::Status NvmlError(const Api& api, nvml::Return r, const std::string& what) {
  const std::string text = absl::StrCat(what, ": ", nvml::ErrorText(api, r));
  if (r == nvml::kErrorNotFound || r == nvml::kErrorInvalidArgument) {
    return absl::NotFoundError(text);
  }
  return absl::UnavailableError(text);
}

absl::StatusOr<unsigned> DeviceCount(const Api& api) {
  unsigned count = 0;
  if (nvml::Return r = api.device_get_count(&count); r != nvml::kSuccess) {
    return NvmlError(api, r, "nvmlDeviceGetCount");
  }
  return count;
}

absl::StatusOr<Device> HandleByIndex(const Api& api, unsigned index) {
  auto count = DeviceCount(api);
  if (!count.ok()) return count.status();
  if (index >= *count) {
    return absl::NotFoundError(
        absl::StrCat("GPU ", index, " does not exist: NVML sees ", *count, " GPU(s)"));
  }
  Device d = nullptr;
  if (nvml::Return r = api.device_get_handle_by_index(index, &d); r != nvml::kSuccess) {
    return NvmlError(api, r, absl::StrCat("nvmlDeviceGetHandleByIndex(", index, ")"));
  }
  return d;
}

std::string Uuid(const Api& api, Device d) {
  char buf[nvml::kDeviceUuidV2BufferSize] = {};
  if (api.device_get_uuid == nullptr ||
      api.device_get_uuid(d, buf, sizeof(buf)) != nvml::kSuccess) {
    return "";
  }
  return FromBuffer(buf, sizeof(buf));
}

bool MigEnabled(const Api& api, Device gpu) {
  unsigned current = nvml::kMigDisable, pending = nvml::kMigDisable;
  return api.device_get_mig_mode != nullptr &&
         api.device_get_mig_mode(gpu, &current, &pending) == nvml::kSuccess &&
         current == nvml::kMigEnable;
}

// The MIG devices of `gpu`, in NVML index order (empty when MIG is off or unsupported).
std::vector<Device> MigDevices(const Api& api, Device gpu) {
  std::vector<Device> out;
  unsigned max = 0;
  if (!MigEnabled(api, gpu) || api.device_get_max_mig_device_count == nullptr ||
      api.device_get_mig_device_handle_by_index == nullptr ||
      api.device_get_max_mig_device_count(gpu, &max) != nvml::kSuccess) {
    return out;
  }
  for (unsigned i = 0; i < max; ++i) {
    Device mig = nullptr;
    // NOT_FOUND for an index with no MIG device configured: holes are allowed.
    if (api.device_get_mig_device_handle_by_index(gpu, i, &mig) == nvml::kSuccess) {
      out.push_back(mig);
    }
  }
  return out;
}

bool IsMigHandle(const Api& api, Device d) {
  unsigned is_mig = 0;
  return api.device_is_mig_device_handle != nullptr &&
         api.device_is_mig_device_handle(d, &is_mig) == nvml::kSuccess && is_mig != 0;
}

absl::StatusOr<Device> FindByUuid(const Api& api, const std::string& wanted) {
  auto count = DeviceCount(api);
  if (!count.ok()) return count.status();
  const bool mig = absl::StartsWith(wanted, "MIG-");
  for (unsigned i = 0; i < *count; ++i) {
    Device gpu = nullptr;
    if (api.device_get_handle_by_index(i, &gpu) != nvml::kSuccess) continue;
    if (!mig) {
      // CUDA accepts any unique prefix of a GPU UUID.
      if (absl::StartsWith(Uuid(api, gpu), wanted)) return gpu;
      continue;
    }
    for (Device d : MigDevices(api, gpu)) {
      if (Uuid(api, d) == wanted) return d;
    }
  }
  return absl::NotFoundError(absl::StrCat("no ", mig ? "MIG device" : "GPU", " with UUID ",
                                          wanted, " among the ", *count, " GPU(s) NVML sees"));
}

// The NVML device that CUDA device `ordinal` of this process is.
absl::StatusOr<Device> SelectDevice(const Api& api, int ordinal,
                                    const std::optional<std::string>& visible) {
  absl::StatusOr<Device> d = absl::UnknownError("unset");
  if (visible.has_value()) {
    std::vector<std::string> entries;
    for (absl::string_view e : absl::StrSplit(*visible, ',')) {
      e = absl::StripAsciiWhitespace(e);
      if (!e.empty()) entries.emplace_back(e);
    }
    if (entries.empty()) {
      return absl::NotFoundError(
          "CUDA_VISIBLE_DEVICES is empty: no GPU is visible to this process");
    }
    if (ordinal >= static_cast<int>(entries.size())) {
      return absl::NotFoundError(absl::StrCat("cuda:", ordinal, ": CUDA_VISIBLE_DEVICES='",
                                              *visible, "' makes only ", entries.size(),
                                              " device(s) visible"));
    }
    const std::string& e = entries[ordinal];
    unsigned index = 0;
    if (absl::StartsWith(e, "MIG-") || absl::StartsWith(e, "GPU-")) {
      d = FindByUuid(api, e);
    } else if (absl::SimpleAtoi(e, &index)) {
      d = HandleByIndex(api, index);
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "CUDA_VISIBLE_DEVICES entry '", e, "': expected an index, GPU-<uuid> or MIG-<uuid>"));
    }
  } else {
    d = HandleByIndex(api, static_cast<unsigned>(ordinal));
  }
  if (!d.ok() || IsMigHandle(api, *d) || !MigEnabled(api, *d)) return d;
  auto migs = MigDevices(api, *d);
  if (migs.empty()) {
    return absl::NotFoundError(absl::StrCat("GPU ", Uuid(api, *d),
                                            " has MIG enabled but no MIG device configured"));
  }
  return migs.front();
}

// FP32 cores per SM by compute capability: NVML gives a whole GPU's core count, not its SMs.
int CoresPerSm(int major, int minor) {
  if (major == 7) return 64;                  // Volta, Turing
  if (major == 8) return minor == 0 ? 64 : 128;  // A100: 64; GA10x, Ada: 128
  if (major >= 9 && major <= 12) return 128;  // Hopper, Blackwell
  return 0;
}

struct MigFacts {
  std::string nvml_name;  // from nvmlGpuInstanceProfileInfo_v2.name, "MIG " stripped
  unsigned gpu_slices = 0;
  unsigned compute_slices = 0;
  unsigned sm_count = 0;
  unsigned long long memory_mb = 0;
};

// The GPU instance profile of MIG device `mig` on `gpu`: MIG handle → GPU instance id → GPU
// instance → profile id → the profile whose id matches among NVML's profile indices.
void ReadGpuInstanceProfile(const Api& api, Device gpu, Device mig, MigFacts* facts) {
  unsigned gi_id = 0;
  nvml::GpuInstance gi = nullptr;
  nvml::GpuInstanceInfo gi_info{};
  if (api.device_get_gpu_instance_id == nullptr || api.device_get_gpu_instance_by_id == nullptr ||
      api.gpu_instance_get_info == nullptr ||
      api.device_get_gpu_instance_id(mig, &gi_id) != nvml::kSuccess ||
      api.device_get_gpu_instance_by_id(gpu, gi_id, &gi) != nvml::kSuccess ||
      api.gpu_instance_get_info(gi, &gi_info) != nvml::kSuccess) {
    return;
  }
  // "enumerate all MIG profiles ... starting from 0, until the API returns INVALID_ARGUMENT".
  for (unsigned p = 0; p < 64; ++p) {
    if (api.device_get_gpu_instance_profile_info_v != nullptr) {
      nvml::GpuInstanceProfileInfoV2 v{};
      v.version = nvml::kGpuInstanceProfileInfoV2Version;
      nvml::Return r = api.device_get_gpu_instance_profile_info_v(gpu, p, &v);
      if (r == nvml::kErrorInvalidArgument) break;
      if (r == nvml::kSuccess && v.id == gi_info.profile_id) {
        facts->nvml_name = std::string(
            absl::StripPrefix(FromBuffer(v.name, sizeof(v.name)), "MIG "));
        facts->gpu_slices = v.slice_count;
        facts->sm_count = v.multiprocessor_count;
        facts->memory_mb = v.memory_size_mb;
        return;
      }
      if (r == nvml::kSuccess) continue;
    }
    if (api.device_get_gpu_instance_profile_info != nullptr) {
      nvml::GpuInstanceProfileInfo info{};
      nvml::Return r = api.device_get_gpu_instance_profile_info(gpu, p, &info);
      if (r == nvml::kErrorInvalidArgument) break;
      if (r == nvml::kSuccess && info.id == gi_info.profile_id) {
        facts->gpu_slices = info.slice_count;
        facts->sm_count = info.multiprocessor_count;
        facts->memory_mb = info.memory_size_mb;
        return;
      }
    }
  }
}

absl::StatusOr<kiln::v1::DeviceInfo> Describe(const Api& api, Device d) {
  kiln::v1::DeviceInfo info;
  info.set_kind("cuda");
  const bool mig = IsMigHandle(api, d);
  Device gpu = d;
  if (mig) {
    if (api.device_get_device_handle_from_mig_device_handle == nullptr) {
      return absl::UnavailableError("NVML lacks nvmlDeviceGetDeviceHandleFromMigDeviceHandle");
    }
    if (nvml::Return r = api.device_get_device_handle_from_mig_device_handle(d, &gpu);
        r != nvml::kSuccess) {
      return NvmlError(api, r, "nvmlDeviceGetDeviceHandleFromMigDeviceHandle");
    }
  }
  // The card's name, also for a slice (newer drivers append " MIG 3g.40gb" to a slice's name;
  // the profile has its own field).
  char name[nvml::kDeviceNameV2BufferSize] = {};
  if (api.device_get_name == nullptr) return absl::UnavailableError("NVML lacks nvmlDeviceGetName");
  if (nvml::Return r = api.device_get_name(gpu, name, sizeof(name)); r != nvml::kSuccess) {
    return NvmlError(api, r, "nvmlDeviceGetName");
  }
  info.set_name(FromBuffer(name, sizeof(name)));
  info.set_uuid(Uuid(api, d));

  int major = 0, minor = 0;
  if (api.device_get_cuda_compute_capability != nullptr &&
      api.device_get_cuda_compute_capability(gpu, &major, &minor) == nvml::kSuccess) {
    info.set_compute_capability(absl::StrCat(major, ".", minor));
  }
  nvml::Memory mem{};
  if (api.device_get_memory_info != nullptr &&
      api.device_get_memory_info(d, &mem) == nvml::kSuccess) {
    info.set_memory_bytes(mem.total);
  }

  if (!mig) {
    unsigned cores = 0;
    const int per_sm = CoresPerSm(major, minor);
    if (per_sm > 0 && api.device_get_num_gpu_cores != nullptr &&
        api.device_get_num_gpu_cores(gpu, &cores) == nvml::kSuccess) {
      info.set_sm_count(cores / per_sm);
    }
    return info;
  }

  MigFacts facts;
  nvml::DeviceAttributes attrs{};
  const bool have_attrs = api.device_get_attributes != nullptr &&
                          api.device_get_attributes(d, &attrs) == nvml::kSuccess;
  ReadGpuInstanceProfile(api, gpu, d, &facts);
  if (have_attrs) {
    // The MIG device is a compute instance: its SMs may be fewer than its GPU instance's.
    facts.sm_count = attrs.multiprocessor_count;
    facts.gpu_slices = attrs.gpu_instance_slice_count;
    facts.compute_slices = attrs.compute_instance_slice_count;
    if (facts.memory_mb == 0) facts.memory_mb = attrs.memory_size_mb;
  }
  if (facts.compute_slices == 0) facts.compute_slices = facts.gpu_slices;
  info.set_sm_count(facts.sm_count);
  if (info.memory_bytes() == 0) info.set_memory_bytes(facts.memory_mb << 20);

  nvml::Memory card{};
  const unsigned long long card_bytes =
      api.device_get_memory_info != nullptr &&
              api.device_get_memory_info(gpu, &card) == nvml::kSuccess
          ? card.total
          : 0;
  if (!facts.nvml_name.empty()) {
    info.set_mig_profile(facts.compute_slices < facts.gpu_slices
                             ? absl::StrCat(facts.compute_slices, "c.", facts.nvml_name)
                             : facts.nvml_name);
  } else if (facts.gpu_slices > 0 && facts.memory_mb > 0) {
    info.set_mig_profile(
        MigProfileName(facts.gpu_slices, facts.compute_slices, facts.memory_mb, card_bytes));
  } else {
    info.set_mig_profile("mig");  // a slice whose profile NVML would not tell
  }
  return info;
}

kiln::v1::DeviceInfo ProbeCpu() {
  kiln::v1::DeviceInfo info;
  info.set_kind("cpu");
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (absl::StartsWith(line, "model name")) {
      auto colon = line.find(':');
      if (colon != std::string::npos) {
        info.set_name(std::string(absl::StripAsciiWhitespace(line.substr(colon + 1))));
      }
      break;
    }
  }
  if (info.name().empty()) info.set_name("cpu");
  const long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page_size > 0) {
    info.set_memory_bytes(static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size));
  }
  return info;
}

}  // namespace

absl::StatusOr<int> CudaOrdinal(const std::string& device) {
  if (device == "cuda") return 0;
  int n = -1;
  if (absl::StartsWith(device, "cuda:") && absl::SimpleAtoi(device.substr(5), &n) && n >= 0) {
    return n;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("device '", device, "': expected cpu, cuda or cuda:N"));
}

absl::Status ProbeOptions::Validate() const {
  if (device == "cpu") return absl::OkStatus();
  return CudaOrdinal(device).status();
}

std::string MigProfileName(unsigned gpu_slices, unsigned compute_slices,
                           unsigned long long slice_memory_mb,
                           unsigned long long card_memory_bytes) {
  constexpr double kMiB = 1024.0 * 1024.0;
  constexpr unsigned long long kGiB = 1024ull * 1024 * 1024;
  unsigned long long gb;
  if (card_memory_bytes > 0) {
    double fraction = slice_memory_mb * kMiB / static_cast<double>(card_memory_bytes);
    fraction = std::ceil(fraction * 8) / 8;
    const double card_gb = static_cast<double>((card_memory_bytes + kGiB - 1) / kGiB);
    gb = static_cast<unsigned long long>(std::llround(fraction * card_gb));
  } else {
    gb = (slice_memory_mb + 1023) / 1024;
  }
  if (compute_slices > 0 && compute_slices < gpu_slices) {
    return absl::StrCat(compute_slices, "c.", gpu_slices, "g.", gb, "gb");
  }
  return absl::StrCat(gpu_slices, "g.", gb, "gb");
}

absl::StatusOr<kiln::v1::DeviceInfo> ProbeDevice(const ProbeOptions& options,
                                                 const nvml::Api* nvml) {
  if (auto s = options.Validate(); !s.ok()) return s;
  if (options.device == "cpu") return ProbeCpu();
  if (nvml == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "device ", options.device, ": NVML is not available, so no NVIDIA GPU can be used here "
        "(install the NVIDIA driver, or run with --device cpu)"));
  }
  auto ordinal = CudaOrdinal(options.device);
  if (!ordinal.ok()) return ordinal.status();
  auto d = SelectDevice(*nvml, *ordinal, options.cuda_visible_devices);
  if (!d.ok()) {
    return absl::Status(d.status().code(),
                        absl::StrCat("device ", options.device, ": ", d.status().message()));
  }
  return Describe(*nvml, *d);
}

absl::StatusOr<kiln::v1::DeviceInfo> ProbeDevice(const ProbeOptions& options) {
  if (options.device == "cpu") return ProbeDevice(options, nullptr);
  auto api = nvml::Load();
  if (!api.ok()) {
    if (auto s = options.Validate(); !s.ok()) return s;
    return absl::FailedPreconditionError(absl::StrCat(
        "device ", options.device, ": no NVIDIA GPU can be used here: ", api.status().message(),
        " (run with --device cpu on machines without a GPU)"));
  }
  return ProbeDevice(options, *api);
}

namespace {

absl::StatusOr<kiln::v1::DeviceInfo> ProbeEach(
    const std::vector<std::string>& devices, ProbeOptions options,
    const std::function<absl::StatusOr<kiln::v1::DeviceInfo>(const ProbeOptions&)>& probe) {
  if (devices.empty()) return absl::InvalidArgumentError("--gpus: no devices");
  kiln::v1::DeviceInfo first;
  for (size_t i = 0; i < devices.size(); ++i) {
    if (i > 0 && devices[i] == "cpu") continue;  // CPU ranks share the one CPU
    options.device = devices[i];
    auto info = probe(options);
    if (!info.ok()) {
      return absl::Status(info.status().code(), absl::StrCat("--gpus: ", devices[i], ": ",
                                                             info.status().message()));
    }
    if (i == 0) {
      first = *std::move(info);
    } else if (info->name() != first.name() || info->mig_profile() != first.mig_profile()) {
      const auto what = [](const kiln::v1::DeviceInfo& d) {
        return d.mig_profile().empty() ? d.name() : absl::StrCat(d.name(), " ", d.mig_profile());
      };
      return absl::FailedPreconditionError(absl::StrCat(
          "--gpus: ", devices[i], " is a ", what(*info), ", ", devices[0], " a ", what(first),
          ": a multi-GPU node needs identical GPUs"));
    }
  }
  first.set_gpu_count(static_cast<uint32_t>(devices.size()));
  return first;
}

}  // namespace

absl::StatusOr<kiln::v1::DeviceInfo> ProbeDevices(const std::vector<std::string>& devices,
                                                  const ProbeOptions& options,
                                                  const nvml::Api* nvml) {
  return ProbeEach(devices, options,
                   [nvml](const ProbeOptions& o) { return ProbeDevice(o, nvml); });
}

absl::StatusOr<kiln::v1::DeviceInfo> ProbeDevices(const std::vector<std::string>& devices,
                                                  const ProbeOptions& options) {
  return ProbeEach(devices, options,
                   [](const ProbeOptions& o) { return ProbeDevice(o); });
}

kiln::v1::Toolchain BuildToolchain() {
  kiln::v1::Toolchain t;
  t.set_torch(pipeline::BuildTorchVersion());
  t.set_cuda(pipeline::BuildCudaVersion());
  t.set_triton(pipeline::BuildTritonVersion());
  return t;
}

}  // namespace kiln::node
