// Device probe against a hand-written fake NVML function table (no GPU or driver needed): whole
// GPUs, MIG slices picked by CUDA_VISIBLE_DEVICES or by a MIG-enabled GPU, the profile name from
// NVML or computed, older drivers without the newer entry points, and no driver at all.
#include "node/device_probe.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/node/fake_nvml.h"

namespace kiln::node {
namespace {

using ::testing::HasSubstr;

using namespace fake;  // NOLINT: the fake NVML table and its state `g`

class DeviceProbeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MakeStandardFleet();
    api_ = FullApi();
  }

  absl::StatusOr<kiln::v1::DeviceInfo> Probe(const std::string& device,
                                             std::optional<std::string> visible = std::nullopt) {
    ProbeOptions o;
    o.device = device;
    o.cuda_visible_devices = std::move(visible);
    return ProbeDevice(o, &api_);
  }

  nvml::Api api_;
};

TEST_F(DeviceProbeTest, WholeGpu) {
  auto info = Probe("cuda:0");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->kind(), "cuda");
  EXPECT_EQ(info->name(), kH100);
  EXPECT_EQ(info->uuid(), "GPU-aaaaaaaa-0000-0000-0000-000000000000");
  EXPECT_EQ(info->memory_bytes(), kH100Memory);
  EXPECT_EQ(info->compute_capability(), "9.0");
  EXPECT_EQ(info->sm_count(), 132u);
  EXPECT_EQ(info->mig_profile(), "");
  EXPECT_EQ(Probe("cuda")->uuid(), info->uuid());
}

TEST_F(DeviceProbeTest, CoreCountsBecomeSmCountsPerArchitecture) {
  g.gpus[0]->cc_major = 8;
  g.gpus[0]->cc_minor = 0;
  g.gpus[0]->cores = 6912;  // A100: 108 SMs x 64
  EXPECT_EQ(Probe("cuda:0")->sm_count(), 108u);
  g.gpus[0]->cc_minor = 9;
  g.gpus[0]->cores = 18176;  // L40S: 142 SMs x 128
  EXPECT_EQ(Probe("cuda:0")->sm_count(), 142u);
  g.gpus[0]->cores = 0;  // driver does not say
  auto info = Probe("cuda:0");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->sm_count(), 0u);
  EXPECT_EQ(info->name(), kH100);
}

TEST_F(DeviceProbeTest, MigSliceByUuidInCudaVisibleDevices) {
  auto info = Probe("cuda:0", "MIG-22222222-0000-0000-0000-000000000000");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->kind(), "cuda");
  EXPECT_EQ(info->name(), kH100);  // the card's name, not the slice's
  EXPECT_EQ(info->uuid(), "MIG-22222222-0000-0000-0000-000000000000");
  EXPECT_EQ(info->mig_profile(), "1g.10gb");
  EXPECT_EQ(info->sm_count(), 16u);
  EXPECT_EQ(info->memory_bytes(), (9984ull - 512) << 20);
  EXPECT_EQ(info->compute_capability(), "9.0");
}

TEST_F(DeviceProbeTest, SecondVisibleEntryIsCudaOne) {
  const std::string visible = "GPU-aaaa, MIG-11111111-0000-0000-0000-000000000000";
  auto info = Probe("cuda:1", visible);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->mig_profile(), "3g.40gb");
  EXPECT_EQ(info->sm_count(), 60u);
  auto first = Probe("cuda:0", visible);  // a UUID prefix names a whole GPU
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->uuid(), "GPU-aaaaaaaa-0000-0000-0000-000000000000");
  EXPECT_EQ(first->mig_profile(), "");
  auto none = Probe("cuda:2", visible);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(none.status().message(), HasSubstr("only 2 device(s)"));
}

TEST_F(DeviceProbeTest, ComputeInstanceSmallerThanItsGpuInstance) {
  auto info = Probe("cuda:0", "MIG-33333333-0000-0000-0000-000000000000");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->mig_profile(), "1c.3g.40gb");
  EXPECT_EQ(info->sm_count(), 16u);  // the compute instance's SMs, not the GPU instance's 60
}

TEST_F(DeviceProbeTest, MigEnabledGpuByIndexStandsForItsFirstSlice) {
  auto info = Probe("cuda:1");  // no CUDA_VISIBLE_DEVICES: NVML index 1
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->uuid(), "MIG-11111111-0000-0000-0000-000000000000");
  EXPECT_EQ(info->mig_profile(), "3g.40gb");
  auto by_index = Probe("cuda:0", "1");
  ASSERT_TRUE(by_index.ok());
  EXPECT_EQ(by_index->uuid(), info->uuid());
}

TEST_F(DeviceProbeTest, ProfileNameComputedWhenTheDriverHasNoV2Info) {
  api_.device_get_gpu_instance_profile_info_v = nullptr;  // older driver
  auto info = Probe("cuda:0", "MIG-22222222-0000-0000-0000-000000000000");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->mig_profile(), "1g.10gb");
  EXPECT_EQ(info->sm_count(), 16u);
  // Without privileges for the card's memory the size is rounded from the slice alone.
  g.parent_memory_denied = true;
  EXPECT_EQ(Probe("cuda:0", "MIG-11111111-0000-0000-0000-000000000000")->mig_profile(),
            "3g.40gb");
}

TEST_F(DeviceProbeTest, SliceWithoutAttributesUsesTheProfile) {
  api_.device_get_attributes = nullptr;
  auto info = Probe("cuda:0", "MIG-11111111-0000-0000-0000-000000000000");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->mig_profile(), "3g.40gb");
  EXPECT_EQ(info->sm_count(), 60u);
  g.gpus[1]->migs[0]->memory_supported = false;
  EXPECT_EQ(Probe("cuda:0", "MIG-11111111-0000-0000-0000-000000000000")->memory_bytes(),
            40448ull << 20);
}

TEST_F(DeviceProbeTest, MissingDevicesAreNotFound) {
  EXPECT_EQ(Probe("cuda:5").status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Probe("cuda:5").status().message(), HasSubstr("NVML sees 2 GPU(s)"));
  EXPECT_EQ(Probe("cuda:0", "MIG-99999999").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Probe("cuda:0", "GPU-ffff").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Probe("cuda:0", "").status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Probe("cuda:0", "").status().message(), HasSubstr("CUDA_VISIBLE_DEVICES is empty"));
  EXPECT_EQ(Probe("cuda:0", "banana").status().code(), absl::StatusCode::kInvalidArgument);
  g.gpus[1]->migs.clear();
  EXPECT_THAT(Probe("cuda:1").status().message(), HasSubstr("no MIG device configured"));
}

// kiln-node --gpus: every listed GPU exists and matches the first; gpu_count is their number.
TEST_F(DeviceProbeTest, AMultiGpuNodeProbesEveryGpu) {
  g.gpus[1] = WholeH100("GPU-bbbbbbbb-0000-0000-0000-000000000000");
  ProbeOptions o;
  auto two = ProbeDevices({"cuda:1", "cuda:0"}, o, &api_);
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ(two->gpu_count(), 2u);
  EXPECT_EQ(two->name(), kH100);
  EXPECT_EQ(two->uuid(), "GPU-bbbbbbbb-0000-0000-0000-000000000000");  // rank 0's card
  // More GPUs than NVML sees.
  auto three = ProbeDevices({"cuda:0", "cuda:1", "cuda:2"}, o, &api_);
  EXPECT_EQ(three.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(three.status().message(), HasSubstr("--gpus: cuda:2: "));
  EXPECT_THAT(three.status().message(), HasSubstr("NVML sees 2 GPU(s)"));
  // A different card.
  g.gpus[1]->name = "NVIDIA A100-SXM4-80GB";
  auto mixed = ProbeDevices({"cuda:0", "cuda:1"}, o, &api_);
  EXPECT_EQ(mixed.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(mixed.status().message(),
              HasSubstr("--gpus: cuda:1 is a NVIDIA A100-SXM4-80GB, cuda:0 a " +
                        std::string(kH100) + ": a multi-GPU node needs identical GPUs"));
  // CPU ranks: the CPU, once.
  auto cpu = ProbeDevices({"cpu", "cpu"}, o, nullptr);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ(cpu->kind(), "cpu");
  EXPECT_EQ(cpu->gpu_count(), 2u);
}

TEST_F(DeviceProbeTest, NoDriverAndBadDeviceStrings) {
  ProbeOptions o;
  o.device = "cuda";
  auto s = ProbeDevice(o, nullptr).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("--device cpu"));
  o.device = "gpu0";
  EXPECT_EQ(ProbeDevice(o, &api_).status().code(), absl::StatusCode::kInvalidArgument);
  o.device = "cuda:-1";
  EXPECT_EQ(ProbeDevice(o, &api_).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DeviceProbeTest, CpuNeedsNoNvml) {
  ProbeOptions o;
  o.device = "cpu";
  auto info = ProbeDevice(o, nullptr);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->kind(), "cpu");
  EXPECT_FALSE(info->name().empty());
  EXPECT_GT(info->memory_bytes(), 0u);
  EXPECT_EQ(info->sm_count(), 0u);
  EXPECT_EQ(info->mig_profile(), "");
  // The loading overload does not touch NVML for a CPU either.
  auto loaded = ProbeDevice(o);
  ASSERT_TRUE(loaded.ok());
  EXPECT_EQ(loaded->kind(), "cpu");
}

TEST(MigProfileNameTest, MatchesNvidiaSmiNames) {
  EXPECT_EQ(MigProfileName(1, 1, 9984, kH100Memory), "1g.10gb");
  EXPECT_EQ(MigProfileName(2, 2, 20096, kH100Memory), "2g.20gb");
  EXPECT_EQ(MigProfileName(3, 3, 40448, kH100Memory), "3g.40gb");
  EXPECT_EQ(MigProfileName(7, 7, 80896, kH100Memory), "7g.80gb");
  EXPECT_EQ(MigProfileName(3, 1, 40448, kH100Memory), "1c.3g.40gb");
  EXPECT_EQ(MigProfileName(1, 1, 4864, 40960ull << 20), "1g.5gb");    // A100 40GB
  EXPECT_EQ(MigProfileName(1, 1, 16896, 143771ull << 20), "1g.18gb");  // H200 141GB
  EXPECT_EQ(MigProfileName(1, 1, 9984, 0), "1g.10gb");  // card memory unknown
}

// The real NVML through dlopen, where a driver is installed (the GPU test host): the probe of
// cuda:0 must agree with nvidia-smi. Skips cleanly where there is no driver.
TEST(RealNvmlTest, ProbeOfCuda0AgreesWithNvidiaSmi) {
  auto api = nvml::Load();
  if (!api.ok()) GTEST_SKIP() << api.status();
  ProbeOptions o;
  o.device = "cuda:0";
  if (const char* v = std::getenv("CUDA_VISIBLE_DEVICES")) o.cuda_visible_devices = v;
  auto info = ProbeDevice(o, *api);
  ASSERT_TRUE(info.ok()) << info.status();
  std::cout << "probed cuda:0: " << info->ShortDebugString() << std::endl;
  EXPECT_EQ(info->kind(), "cuda");
  EXPECT_FALSE(info->name().empty());
  EXPECT_TRUE(info->uuid().rfind("GPU-", 0) == 0 || info->uuid().rfind("MIG-", 0) == 0);
  EXPECT_GT(info->memory_bytes(), 0u);
  EXPECT_GT(info->sm_count(), 0u);
  EXPECT_NE(info->compute_capability().find('.'), std::string::npos);
  if (!info->mig_profile().empty()) return;  // nvidia-smi's --query-gpu describes whole GPUs
  const std::string cmd = "nvidia-smi --format=csv,noheader,nounits -i " + info->uuid() +
                          " --query-gpu=name,memory.total,compute_cap 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) GTEST_SKIP() << "no nvidia-smi";
  char line[512] = {};
  const bool got = std::fgets(line, sizeof(line), p) != nullptr;
  pclose(p);
  if (!got) GTEST_SKIP() << "nvidia-smi printed nothing";
  std::vector<std::string> cols;
  for (absl::string_view c : absl::StrSplit(absl::StripAsciiWhitespace(line), ',')) {
    cols.emplace_back(absl::StripAsciiWhitespace(c));
  }
  ASSERT_EQ(cols.size(), 3u) << line;
  std::cout << "nvidia-smi: " << line;
  EXPECT_EQ(info->name(), cols[0]);
  EXPECT_EQ(info->memory_bytes() >> 20, std::stoull(cols[1]));  // MiB
  EXPECT_EQ(info->compute_capability(), cols[2]);
}

TEST(ToolchainTest, ReportsTheBuildsTorch) {
  const auto t = BuildToolchain();
  EXPECT_FALSE(t.torch().empty());
}

}  // namespace
}  // namespace kiln::node
