// What a node tells the coordinator about its hardware and toolchain (RegisterNode.info.device,
// .toolchain). CPU nodes describe the host CPU; CUDA nodes read NVML (node/nvml.h): the card's
// name, UUID, compute capability, memory and SM count, or for a MIG slice the slice's UUID,
// memory, SM count and profile name ("3g.40gb").
//
// Which NVML device a "cuda:N" node is: entry N of CUDA_VISIBLE_DEVICES when it is set (an NVML
// index, a "GPU-<uuid>" prefix, or a "MIG-<uuid>" slice, as CUDA accepts them), else NVML index N.
// Plain indices assume CUDA_DEVICE_ORDER=PCI_BUS_ID (NVML's order); give each node a UUID in
// CUDA_VISIBLE_DEVICES to be exact. A whole GPU with MIG enabled stands for its first MIG device
// (what CUDA runs on when handed such a GPU).
//
// Called once by main at start-up; no state, any thread.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/proto/kiln.pb.h"
#include "node/nvml.h"

namespace kiln::node {

struct ProbeOptions {
  std::string device = "cpu";  // "cpu", "cuda" or "cuda:N": the pipeline's device string
  // CUDA_VISIBLE_DEVICES as this process sees it (main reads the environment); nullopt = unset.
  std::optional<std::string> cuda_visible_devices;

  absl::Status Validate() const;  // InvalidArgument naming "device"
};

// "cuda" → 0, "cuda:3" → 3; InvalidArgument for anything else (cpu included).
absl::StatusOr<int> CudaOrdinal(const std::string& device);

// cpu: kind "cpu", name from /proc/cpuinfo ("model name"), memory_bytes = physical RAM,
// sm_count 0 (not a GPU). NVML is not touched.
// cuda: through `nvml`, which may be null (not loadable here): then FailedPrecondition saying
// that --device cuda needs an NVIDIA driver. NotFound when the selected GPU/MIG device does not
// exist; other NVML failures of required calls as Unavailable/Internal naming the call.
// Optional facts NVML does not give (e.g. the SM count on an old driver) are left zero/empty.
absl::StatusOr<kiln::v1::DeviceInfo> ProbeDevice(const ProbeOptions& options,
                                                 const nvml::Api* nvml);

// ProbeDevice with NVML loaded on demand (only for cuda devices).
absl::StatusOr<kiln::v1::DeviceInfo> ProbeDevice(const ProbeOptions& options);

// A multi-GPU node (kiln-node --gpus): every device of `devices` ("cuda:N", or "cpu" entries,
// which are probed once) as ProbeDevice probes options.device, the first one's DeviceInfo
// returned with gpu_count = devices.size(). ProbeDevice's errors prefixed with "--gpus: <device>:
// " (NotFound for a GPU that does not exist); FailedPrecondition for a GPU whose name or MIG
// profile differs from the first's (one device class per node).
absl::StatusOr<kiln::v1::DeviceInfo> ProbeDevices(const std::vector<std::string>& devices,
                                                  const ProbeOptions& options,
                                                  const nvml::Api* nvml);
// ProbeDevices with NVML loaded on demand.
absl::StatusOr<kiln::v1::DeviceInfo> ProbeDevices(const std::vector<std::string>& devices,
                                                  const ProbeOptions& options);

// MIG profile name in NVIDIA's notation from slice counts and memory: "3g.40gb", "1c.3g.40gb"
// (compute instance smaller than its GPU instance). Memory in GB is rounded as nvidia-smi and
// the device plugin do: the slice's fraction of the card, rounded up to eighths, times the card
// memory in whole GB. `card_memory_bytes` 0 (unknown): ceil(slice_memory_mb / 1024).
std::string MigProfileName(unsigned gpu_slices, unsigned compute_slices,
                           unsigned long long slice_memory_mb,
                           unsigned long long card_memory_bytes);

// Versions of torch, CUDA and Triton this binary was built with (pipeline/aoti_package.h).
kiln::v1::Toolchain BuildToolchain();

}  // namespace kiln::node
