// GPU telemetry against the fake NVML table (tests/node/fake_nvml.h): every metric for a whole
// GPU and for MIG slices (labelled with their profile), device selection by UUID, figures NVML
// does not support left absent, failing calls counted without stopping the sampler, and the
// sampling thread stopping cleanly.
#include "node/gpu_telemetry.h"

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"
#include "tests/node/fake_nvml.h"

namespace kiln::node {
namespace {

using namespace fake;  // NOLINT: the fake NVML table and its state `g`
using Labels = std::map<std::string, std::string>;

constexpr char kGpu0[] = "GPU-aaaaaaaa-0000-0000-0000-000000000000";
constexpr char kGpu1[] = "GPU-bbbbbbbb-0000-0000-0000-000000000001";
constexpr char kSlice3g[] = "MIG-11111111-0000-0000-0000-000000000000";
constexpr char kSlice1g[] = "MIG-22222222-0000-0000-0000-000000000000";
constexpr char kSlice1c[] = "MIG-33333333-0000-0000-0000-000000000000";

// The value of metric `name` whose labels include all of `want`; nullopt when there is none.
std::optional<double> Value(prometheus::Registry& registry, const std::string& name,
                            const Labels& want) {
  for (const auto& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const auto& m : family.metric) {
      Labels have;
      for (const auto& l : m.label) have[l.name] = l.value;
      bool match = true;
      for (const auto& [k, v] : want) match = match && have.count(k) && have[k] == v;
      if (!match) continue;
      if (family.type == prometheus::MetricType::Counter) return m.counter.value;
      return m.gauge.value;
    }
  }
  return std::nullopt;
}

class GpuTelemetryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MakeStandardFleet();
    FakeDevice& gpu0 = *g.gpus[0];
    gpu0.memory_used = 30ull << 30;
    gpu0.util_gpu = 97;
    gpu0.util_memory = 41;
    gpu0.power_mw = 612345;
    gpu0.temperature_c = 66;
    gpu0.sm_mhz = 1980;
    gpu0.clocks_event_reasons = nvml::kClocksEventSwPowerCap;
    gpu0.ecc_corrected = 3;
    FakeDevice& gpu1 = *g.gpus[1];
    gpu1.gpm_supported = true;
    gpu1.power_mw = 200000;
    gpu1.migs[0]->memory_used = 12ull << 30;
    gpu1.migs[0]->gpm_sm_util = 88;
    gpu1.migs[0]->gpm_dram_util = 35;
    api_ = FullTelemetryApi();
  }

  std::unique_ptr<GpuTelemetry> Make(const std::string& uuid = "", int interval_ms = 1000) {
    GpuTelemetryOptions o;
    o.node_id = "n1";
    o.device_uuid = uuid;
    o.interval_ms = interval_ms;
    auto t = GpuTelemetry::Create(o, api_, registry_);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? std::move(*t) : nullptr;
  }

  nvml::Api api_;
  prometheus::Registry registry_;
};

TEST_F(GpuTelemetryTest, EveryGpuMetricIsPresentWithItsLabels) {
  auto t = Make();
  t->SampleOnce();
  const Labels gpu0 = {{"node", "n1"}, {"gpu", "0"}, {"uuid", kGpu0}, {"mig_profile", ""}};
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_gpu_utilization_ratio", gpu0), 0.97);
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_gpu_memory_utilization_ratio", gpu0), 0.41);
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_gpu_memory_used_bytes", gpu0), 30.0 * (1ull << 30));
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_gpu_memory_total_bytes", gpu0), kH100Memory);
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_gpu_power_watts", gpu0), 612.345);
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_gpu_temperature_celsius", gpu0), 66);
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_gpu_sm_clock_hertz", gpu0), 1.98e9);
  Labels power_cap = gpu0, idle = gpu0;
  power_cap["reason"] = "sw_power_cap";
  idle["reason"] = "gpu_idle";
  EXPECT_EQ(*Value(registry_, "kiln_gpu_clocks_event_active", power_cap), 1);
  EXPECT_EQ(*Value(registry_, "kiln_gpu_clocks_event_active", idle), 0);
  Labels corrected = gpu0, uncorrected = gpu0;
  corrected["type"] = "corrected";
  uncorrected["type"] = "uncorrected";
  EXPECT_EQ(*Value(registry_, "kiln_gpu_ecc_errors_total", corrected), 3);
  EXPECT_EQ(*Value(registry_, "kiln_gpu_ecc_errors_total", uncorrected), 0);
  // The MIG-enabled card is sampled as a card too.
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_gpu_power_watts", {{"uuid", kGpu1}, {"gpu", "1"}}), 200);
  EXPECT_EQ(*Value(registry_, "kiln_gpu_telemetry_samples_total", {{"node", "n1"}}), 1);

  // The ECC counter follows NVML's cumulative count.
  g.gpus[0]->ecc_corrected = 5;
  t->SampleOnce();
  EXPECT_EQ(*Value(registry_, "kiln_gpu_ecc_errors_total", corrected), 5);
  // Every figure written in the Prometheus text format.
  const std::string text = prometheus::TextSerializer().Serialize(registry_.Collect());
  for (const char* name :
       {"kiln_gpu_utilization_ratio", "kiln_gpu_memory_utilization_ratio",
        "kiln_gpu_memory_used_bytes", "kiln_gpu_memory_total_bytes", "kiln_gpu_power_watts",
        "kiln_gpu_temperature_celsius", "kiln_gpu_sm_clock_hertz", "kiln_gpu_clocks_event_active",
        "kiln_gpu_ecc_errors_total", "kiln_mig_memory_used_bytes", "kiln_mig_memory_total_bytes",
        "kiln_mig_sm_utilization_ratio", "kiln_mig_dram_bandwidth_utilization_ratio",
        "kiln_gpu_telemetry_samples_total"}) {
    EXPECT_THAT(text, ::testing::HasSubstr(std::string("\n") + name + "{")) << name;
  }
}

TEST_F(GpuTelemetryTest, MigSlicesAreLabelledWithTheirProfile) {
  auto t = Make();
  t->SampleOnce();
  const Labels s3g = {{"gpu", "1"}, {"uuid", kSlice3g}, {"mig_profile", "3g.40gb"}};
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_mig_memory_used_bytes", s3g), 12.0 * (1ull << 30));
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_mig_memory_total_bytes", s3g), (40448.0 - 512) * (1 << 20));
  EXPECT_TRUE(Value(registry_, "kiln_mig_memory_total_bytes",
                    {{"uuid", kSlice1g}, {"mig_profile", "1g.10gb"}}));
  EXPECT_TRUE(Value(registry_, "kiln_mig_memory_total_bytes",
                    {{"uuid", kSlice1c}, {"mig_profile", "1c.3g.40gb"}}));
  // GPM needs two samples: nothing after the first, the interval's figures after the second.
  EXPECT_FALSE(Value(registry_, "kiln_mig_sm_utilization_ratio", s3g));
  t->SampleOnce();
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_mig_sm_utilization_ratio", s3g), 0.88);
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_mig_dram_bandwidth_utilization_ratio", s3g), 0.35);
  // Slices have no card-level utilization (NVML does not report it for MIG).
  EXPECT_FALSE(Value(registry_, "kiln_gpu_utilization_ratio", {{"uuid", kSlice3g}}));
  t.reset();
  EXPECT_EQ(g.gpm_samples_live, 0) << "GPM samples leaked";
}

TEST_F(GpuTelemetryTest, WithoutGpmTheSliceUtilizationIsAbsent) {
  g.gpus[1]->gpm_supported = false;
  auto t = Make();
  t->SampleOnce();
  t->SampleOnce();
  EXPECT_TRUE(Value(registry_, "kiln_mig_memory_used_bytes", {{"uuid", kSlice3g}}));
  EXPECT_FALSE(Value(registry_, "kiln_mig_sm_utilization_ratio", {{"uuid", kSlice3g}}));
  EXPECT_FALSE(Value(registry_, "kiln_gpu_telemetry_errors_total", {}));
}

TEST_F(GpuTelemetryTest, SamplesOnlyTheNodesDevice) {
  auto t = Make(kSlice1g);
  t->SampleOnce();
  EXPECT_TRUE(Value(registry_, "kiln_gpu_power_watts", {{"uuid", kGpu1}}));  // its card
  EXPECT_TRUE(Value(registry_, "kiln_mig_memory_used_bytes", {{"uuid", kSlice1g}}));
  EXPECT_FALSE(Value(registry_, "kiln_mig_memory_used_bytes", {{"uuid", kSlice3g}}));
  EXPECT_FALSE(Value(registry_, "kiln_gpu_power_watts", {{"uuid", kGpu0}}));

  prometheus::Registry other;
  GpuTelemetryOptions o;
  o.node_id = "n2";
  o.device_uuid = kGpu0;
  auto whole = GpuTelemetry::Create(o, api_, other);
  ASSERT_TRUE(whole.ok());
  (*whole)->SampleOnce();
  EXPECT_TRUE(Value(other, "kiln_gpu_power_watts", {{"uuid", kGpu0}, {"node", "n2"}}));
  EXPECT_FALSE(Value(other, "kiln_gpu_power_watts", {{"uuid", kGpu1}}));
}

TEST_F(GpuTelemetryTest, UnsupportedFiguresAreAbsentAndNotErrors) {
  g.gpus[0]->power_mw = 0;           // NOT_SUPPORTED
  g.gpus[0]->ecc_supported = false;  // NOT_SUPPORTED
  api_.device_get_clock_info = nullptr;  // an older driver without the entry point
  auto t = Make();
  t->SampleOnce();
  EXPECT_FALSE(Value(registry_, "kiln_gpu_power_watts", {{"uuid", kGpu0}}));
  EXPECT_FALSE(Value(registry_, "kiln_gpu_ecc_errors_total", {{"uuid", kGpu0}}));
  EXPECT_FALSE(Value(registry_, "kiln_gpu_sm_clock_hertz", {}));
  EXPECT_TRUE(Value(registry_, "kiln_gpu_utilization_ratio", {{"uuid", kGpu0}}));
  EXPECT_FALSE(Value(registry_, "kiln_gpu_telemetry_errors_total", {}));
}

TEST_F(GpuTelemetryTest, AFailingCallIsCountedAndSamplingGoesOn) {
  g.failing = {"nvmlDeviceGetPowerUsage", "nvmlGpmMigSampleGet"};
  auto t = Make();
  t->SampleOnce();
  t->SampleOnce();
  // Two cards, two samples.
  EXPECT_EQ(*Value(registry_, "kiln_gpu_telemetry_errors_total",
                   {{"node", "n1"}, {"call", "nvmlDeviceGetPowerUsage"}}),
            4);
  // Three slices, two samples.
  EXPECT_EQ(*Value(registry_, "kiln_gpu_telemetry_errors_total", {{"call", "nvmlGpmMigSampleGet"}}),
            6);
  EXPECT_FALSE(Value(registry_, "kiln_gpu_power_watts", {}));
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_gpu_utilization_ratio", {{"uuid", kGpu0}}), 0.97);
  EXPECT_TRUE(Value(registry_, "kiln_mig_memory_used_bytes", {{"uuid", kSlice3g}}));
  EXPECT_EQ(g.gpm_samples_live, 0);  // a failed sample is freed at once

  // The call recovers: the figure appears.
  g.failing.clear();
  t->SampleOnce();
  EXPECT_DOUBLE_EQ(*Value(registry_, "kiln_gpu_power_watts", {{"uuid", kGpu0}}), 612.345);
  EXPECT_EQ(t->samples(), 3u);
}

TEST_F(GpuTelemetryTest, DeviceListingThatFailsIsRetried) {
  g.failing = {"nvmlDeviceGetMemoryInfo"};
  api_.device_get_count = [](unsigned*) -> nvml::Return { return nvml::kErrorUnknown; };
  auto t = Make();
  t->SampleOnce();
  EXPECT_EQ(*Value(registry_, "kiln_gpu_telemetry_errors_total", {{"call", "nvmlDeviceGetCount"}}), 1);
  api_.device_get_count = FullApi().device_get_count;
  g.failing.clear();
  t->SampleOnce();
  EXPECT_TRUE(Value(registry_, "kiln_gpu_utilization_ratio", {{"uuid", kGpu0}}));
}

TEST_F(GpuTelemetryTest, TheThreadSamplesEveryIntervalAndStopsCleanly) {
  auto t = Make("", /*interval_ms=*/5);
  t->Start();
  EXPECT_GE(t->samples(), 1u);  // Start samples once before returning
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (t->samples() < 5 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_GE(t->samples(), 5u);
  const auto stop_started = std::chrono::steady_clock::now();
  t->Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - stop_started, std::chrono::seconds(1));
  const uint64_t after_stop = t->samples();
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_EQ(t->samples(), after_stop);
  t->Stop();  // idempotent
  t.reset();
  EXPECT_EQ(g.gpm_samples_live, 0);

  // A sampler with a long interval stops at once, not after its interval.
  auto slow = Make("", /*interval_ms=*/60000);
  slow->Start();
  const auto slow_stop = std::chrono::steady_clock::now();
  slow.reset();
  EXPECT_LT(std::chrono::steady_clock::now() - slow_stop, std::chrono::seconds(1));
}

TEST(GpuTelemetryOptionsTest, IntervalMustBePositive) {
  GpuTelemetryOptions o;
  o.interval_ms = 0;
  absl::Status s = o.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("interval_ms"));
  nvml::Api api;
  prometheus::Registry registry;
  EXPECT_EQ(GpuTelemetry::Create(o, api, registry).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kiln::node
