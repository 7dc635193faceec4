// Tests of the Flux flow-matching schedule: against the published formula recomputed here in
// double (float32 rounding tolerance), and bit for bit against diffusers' FluxPipeline +
// FlowMatchEulerDiscreteScheduler run by tests/pipeline/ref_scheduler.py. Plus config parsing.
#include "pipeline/scheduler.h"

#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/pipeline/test_support.h"

namespace kiln::pipeline {
namespace {

using ::kiln::testing::TempDir;
using ::kiln::testing::WriteFileOrDie;
using ::testing::HasSubstr;

// black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json.
const char* kFluxDev = R"({
  "_class_name": "FlowMatchEulerDiscreteScheduler",
  "_diffusers_version": "0.30.0.dev0",
  "base_image_seq_len": 256,
  "base_shift": 0.5,
  "max_image_seq_len": 4096,
  "max_shift": 1.15,
  "num_train_timesteps": 1000,
  "shift": 3.0,
  "use_dynamic_shifting": true
})";

// black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json.
const char* kFluxSchnell = R"({
  "_class_name": "FlowMatchEulerDiscreteScheduler",
  "_diffusers_version": "0.29.0.dev0",
  "base_image_seq_len": 256,
  "base_shift": 0.5,
  "max_image_seq_len": 4096,
  "max_shift": 1.15,
  "num_train_timesteps": 1000,
  "shift": 1.0,
  "use_dynamic_shifting": false
})";

// FLUX.1-dev as a recent diffusers save_config writes it: every field, the unused ones off.
const char* kFluxDevFull = R"({
  "_class_name": "FlowMatchEulerDiscreteScheduler",
  "_diffusers_version": "0.42.1",
  "base_image_seq_len": 256,
  "base_shift": 0.5,
  "invert_sigmas": false,
  "max_image_seq_len": 4096,
  "max_shift": 1.15,
  "num_train_timesteps": 1000,
  "shift": 3.0,
  "shift_terminal": null,
  "stochastic_sampling": false,
  "time_shift_type": "exponential",
  "use_beta_sigmas": false,
  "use_dynamic_shifting": true,
  "use_exponential_sigmas": false,
  "use_karras_sigmas": false
})";

nlohmann::json With(const char* base, const nlohmann::json& changes) {
  nlohmann::json j = nlohmann::json::parse(base);
  j.update(changes);
  return j;
}

SchedulerConfig ParseOrDie(const nlohmann::json& j) {
  auto c = SchedulerConfig::FromJson(j);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : SchedulerConfig();
}

// The configs compared with diffusers: name, JSON.
std::vector<std::pair<std::string, nlohmann::json>> ReferenceConfigs() {
  return {
      {"flux-dev", nlohmann::json::parse(kFluxDev)},
      {"flux-dev-full", nlohmann::json::parse(kFluxDevFull)},
      {"flux-schnell", nlohmann::json::parse(kFluxSchnell)},
      {"static-shift-3", With(kFluxSchnell, {{"shift", 3.0}})},
      {"static-shift-int", With(kFluxSchnell, {{"shift", 2}, {"num_train_timesteps", 1000}})},
      {"dynamic-linear", With(kFluxDev, {{"time_shift_type", "linear"}})},
      {"dynamic-other-line",
       With(kFluxDev, {{"base_shift", 0.3611}, {"max_shift", 1.7}, {"max_image_seq_len", 8192}})},
      {"shift-terminal", With(kFluxSchnell, {{"shift", 3.0}, {"shift_terminal", 0.1}})},
      {"dynamic-shift-terminal", With(kFluxDev, {{"shift_terminal", 0.02}})},
      {"invert", With(kFluxSchnell, {{"shift", 3.0}, {"invert_sigmas", true}})},
  };
}

std::vector<std::pair<int, int>> Pairs(bool with_one_step) {
  std::vector<std::pair<int, int>> out;
  for (int steps : {1, 2, 4, 20, 28, 50}) {
    if (steps == 1 && !with_one_step) continue;
    for (int seq : {1, 256, 1024, 4096, 6400}) out.emplace_back(steps, seq);
  }
  return out;
}

// shift_terminal cannot stretch a one-step schedule (its only sigma is 1; diffusers gives NaN).
bool OneStepOk(const std::string& name) { return name.find("shift-terminal") == std::string::npos; }

double FromHex(const std::string& s) { return std::strtod(s.c_str(), nullptr); }

TEST(SchedulerTest, MatchesDiffusersBitForBit) {
  if (!kiln::testing::HavePython()) GTEST_SKIP() << "KILN_PYTHON / KILN_SOURCE not set";
  TempDir dir;
  const auto configs = ReferenceConfigs();
  nlohmann::json request = nlohmann::json::array();
  for (const auto& [name, config] : configs) {
    nlohmann::json pairs = nlohmann::json::array();
    for (auto [steps, seq] : Pairs(OneStepOk(name))) pairs.push_back({steps, seq});
    request.push_back({{"config", config}, {"pairs", pairs}});
  }
  WriteFileOrDie(dir.Join("request.json"), request.dump());
  auto run = kiln::testing::RunPython("tests/pipeline/ref_scheduler.py",
                                      {dir.Join("request.json"), dir.Join("out.json")});
  if (!run.ok() && run.status().message().find("No module named 'diffusers'") != std::string::npos) {
    // The GPU test host has no diffusers (and no registry); `make test` installs it everywhere else.
    GTEST_SKIP() << "diffusers is not installed here: the reference schedule cannot be computed";
  }
  ASSERT_TRUE(run.ok()) << run.status();
  const nlohmann::json ref =
      nlohmann::json::parse(kiln::testing::ReadFileOrDie(dir.Join("out.json")));
  ASSERT_EQ(ref.size(), configs.size());

  int compared = 0;
  for (size_t c = 0; c < configs.size(); ++c) {
    const SchedulerConfig config = ParseOrDie(configs[c].second);
    for (const auto& want : ref[c]) {
      const int steps = want["steps"].get<int>();
      const int seq = want["seq_len"].get<int>();
      SCOPED_TRACE(absl::StrCat(configs[c].first, " steps=", steps, " seq_len=", seq));
      auto got = MakeFluxSchedule(config, steps, seq);
      ASSERT_TRUE(got.ok()) << got.status();
      if (config.use_dynamic_shifting) {
        EXPECT_EQ(CalculateShift(config, seq), FromHex(want["mu"].get<std::string>()));
      }
      ASSERT_EQ(got->sigmas.size(), want["sigmas"].size());
      ASSERT_EQ(got->timesteps.size(), want["timesteps"].size());
      for (size_t i = 0; i < got->sigmas.size(); ++i) {
        // Exact equality: each value is the float32 diffusers computes.
        EXPECT_EQ(got->sigmas[i], FromHex(want["sigmas"][i].get<std::string>())) << "sigma " << i;
      }
      for (size_t i = 0; i < got->timesteps.size(); ++i) {
        EXPECT_EQ(got->timesteps[i], FromHex(want["timesteps"][i].get<std::string>()))
            << "timestep " << i;
        EXPECT_EQ(static_cast<double>(FluxModelTimestep(*got, static_cast<int>(i))),
                  FromHex(want["model_timesteps"][i].get<std::string>()))
            << "model timestep " << i;
      }
      ++compared;
    }
  }
  EXPECT_GT(compared, 250);
}

// The published formula, in double: sigmas linspace(1, 1/n, n), shifted, terminal 0.
std::vector<double> FormulaSigmas(const SchedulerConfig& c, int n, int seq) {
  std::vector<double> s;
  for (int i = 0; i < n; ++i) s.push_back(n == 1 ? 1.0 : 1.0 + i * ((1.0 / n - 1.0) / (n - 1)));
  if (c.use_dynamic_shifting) {
    const double m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len);
    const double mu = seq * m + (c.base_shift - m * c.base_image_seq_len);
    for (double& t : s) {
      t = c.time_shift_type == SchedulerConfig::TimeShiftType::kExponential
              ? std::exp(mu) / (std::exp(mu) + (1 / t - 1))
              : mu / (mu + (1 / t - 1));
    }
  } else {
    for (double& t : s) t = c.shift * t / (1 + (c.shift - 1) * t);
  }
  if (c.shift_terminal) {
    const double scale = (1 - s.back()) / (1 - *c.shift_terminal);
    for (double& t : s) t = 1 - (1 - t) / scale;
  }
  if (c.invert_sigmas) {
    for (double& t : s) t = 1 - t;
  }
  s.push_back(c.invert_sigmas ? 1.0 : 0.0);
  return s;
}

TEST(SchedulerTest, MatchesThePublishedFormulaWithinFloat32Rounding) {
  for (const auto& [name, json] : ReferenceConfigs()) {
    const SchedulerConfig config = ParseOrDie(json);
    for (auto [steps, seq] : Pairs(OneStepOk(name))) {
      SCOPED_TRACE(absl::StrCat(name, " steps=", steps, " seq_len=", seq));
      auto got = MakeFluxSchedule(config, steps, seq);
      ASSERT_TRUE(got.ok()) << got.status();
      const std::vector<double> want = FormulaSigmas(config, steps, seq);
      ASSERT_EQ(got->sigmas.size(), static_cast<size_t>(steps + 1));
      ASSERT_EQ(got->timesteps.size(), static_cast<size_t>(steps));
      for (int i = 0; i <= steps; ++i) {
        // A handful of float32 operations, each within half an ulp (6e-8 relative).
        EXPECT_NEAR(got->sigmas[i], want[i], 1e-6) << "sigma " << i;
        // Values are float32 numbers.
        EXPECT_EQ(got->sigmas[i], static_cast<double>(static_cast<float>(got->sigmas[i])));
      }
      for (int i = 0; i < steps; ++i) {
        EXPECT_NEAR(got->timesteps[i], want[i] * config.num_train_timesteps,
                    1e-6 * config.num_train_timesteps)
            << "timestep " << i;
        EXPECT_EQ(got->timesteps[i],
                  static_cast<double>(static_cast<float>(got->sigmas[i]) *
                                      static_cast<float>(config.num_train_timesteps)));
        if (config.invert_sigmas) {
          EXPECT_LT(got->sigmas[i], got->sigmas[i + 1]);
        } else {
          EXPECT_GT(got->sigmas[i], got->sigmas[i + 1]);
        }
      }
    }
  }
}

TEST(SchedulerTest, FluxDevKnownValues) {
  const SchedulerConfig config = ParseOrDie(nlohmann::json::parse(kFluxDev));
  EXPECT_TRUE(config.use_dynamic_shifting);
  EXPECT_EQ(config.shift, 3.0);
  EXPECT_EQ(config.max_image_seq_len, 4096);
  EXPECT_DOUBLE_EQ(CalculateShift(config, 256), 0.5);
  EXPECT_DOUBLE_EQ(CalculateShift(config, 4096), 1.15);
  // 1024x1024: (1024/16)^2 = 4096 tokens, 28 steps.
  auto s = MakeFluxSchedule(config, 28, 4096);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->sigmas.front(), 1.0);
  EXPECT_EQ(s->timesteps.front(), 1000.0);
  EXPECT_EQ(s->sigmas.back(), 0.0);
  // Last step: t = 1/28, sigma = e^1.15 / (e^1.15 + 27).
  EXPECT_NEAR(s->sigmas[27], std::exp(1.15) / (std::exp(1.15) + 27), 1e-7);
  // One step: just sigma 1 -> 0.
  auto one = MakeFluxSchedule(config, 1, 4096);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->sigmas, (std::vector<double>{1.0, 0.0}));
  EXPECT_EQ(one->timesteps, (std::vector<double>{1000.0}));
}

TEST(SchedulerTest, BadArguments) {
  const SchedulerConfig config = ParseOrDie(nlohmann::json::parse(kFluxDev));
  EXPECT_EQ(MakeFluxSchedule(config, 0, 4096).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeFluxSchedule(config, 28, 0).status().code(), absl::StatusCode::kInvalidArgument);
  const SchedulerConfig terminal =
      ParseOrDie(With(kFluxDev, {{"shift_terminal", 0.02}}));
  auto s = MakeFluxSchedule(terminal, 1, 4096);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("shift_terminal"));
  SchedulerConfig bad = config;
  bad.num_train_timesteps = 0;
  EXPECT_EQ(MakeFluxSchedule(bad, 4, 4096).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SchedulerConfigTest, FromJsonFile) {
  TempDir dir;
  WriteFileOrDie(dir.Join("scheduler_config.json"), kFluxDev);
  auto c = SchedulerConfig::FromJsonFile(dir.Join("scheduler_config.json"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->use_dynamic_shifting);
  EXPECT_EQ(c->base_image_seq_len, 256);
  EXPECT_EQ(c->base_shift, 0.5);
  EXPECT_EQ(c->max_shift, 1.15);
  EXPECT_EQ(c->time_shift_type, SchedulerConfig::TimeShiftType::kExponential);
  EXPECT_FALSE(c->shift_terminal.has_value());

  auto missing = SchedulerConfig::FromJsonFile(dir.Join("nope.json"));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("nope.json"));

  WriteFileOrDie(dir.Join("bad.json"), "{\"shift\": ");
  auto bad = SchedulerConfig::FromJsonFile(dir.Join("bad.json"));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("bad.json"));

  WriteFileOrDie(dir.Join("karras.json"), With(kFluxDev, {{"use_karras_sigmas", true}}).dump());
  auto karras = SchedulerConfig::FromJsonFile(dir.Join("karras.json"));
  EXPECT_EQ(karras.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(karras.status().message(), HasSubstr("karras.json"));
  EXPECT_THAT(karras.status().message(), HasSubstr("use_karras_sigmas"));
}

TEST(SchedulerConfigTest, UnimplementedOptionsAreRefused) {
  for (const char* key : {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                          "stochastic_sampling", "use_flow_sigmas"}) {
    SCOPED_TRACE(key);
    auto on = SchedulerConfig::FromJson(With(kFluxDev, {{key, true}}));
    EXPECT_EQ(on.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_THAT(on.status().message(), HasSubstr(key));
    EXPECT_TRUE(SchedulerConfig::FromJson(With(kFluxDev, {{key, false}})).ok());
  }
  auto unknown = SchedulerConfig::FromJson(With(kFluxDev, {{"sigma_schedule", "cosine"}}));
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(unknown.status().message(), HasSubstr("sigma_schedule"));
  EXPECT_THAT(unknown.status().message(), HasSubstr("unknown key"));
  EXPECT_TRUE(SchedulerConfig::FromJson(With(kFluxDev, {{"future_flag", nullptr}})).ok());

  auto other =
      SchedulerConfig::FromJson(With(kFluxDev, {{"_class_name", "EulerDiscreteScheduler"}}));
  EXPECT_EQ(other.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(other.status().message(), HasSubstr("_class_name"));
}

TEST(SchedulerConfigTest, BadValuesNameTheField) {
  const std::vector<std::pair<nlohmann::json, std::string>> cases = {
      {{{"shift", "3"}}, "shift"},
      {{{"use_dynamic_shifting", 1}}, "use_dynamic_shifting"},
      {{{"num_train_timesteps", 1000.5}}, "num_train_timesteps"},
      {{{"num_train_timesteps", 0}}, "num_train_timesteps"},
      {{{"base_image_seq_len", 4096}}, "base_image_seq_len"},
      {{{"time_shift_type", "cubic"}}, "time_shift_type"},
      {{{"shift_terminal", 1.0}}, "shift_terminal"},
      {{{"base_shift", nullptr}}, "base_shift"},
      {{{"max_shift", "big"}}, "max_shift"},
  };
  for (const auto& [change, field] : cases) {
    SCOPED_TRACE(change.dump());
    auto c = SchedulerConfig::FromJson(With(kFluxDev, change));
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(c.status().message(), HasSubstr(field));
  }
  EXPECT_EQ(SchedulerConfig::FromJson(nlohmann::json::array()).status().code(),
            absl::StatusCode::kInvalidArgument);
  // shift_terminal 0 means "unset", as in diffusers.
  auto zero = SchedulerConfig::FromJson(With(kFluxDev, {{"shift_terminal", 0}}));
  ASSERT_TRUE(zero.ok());
  EXPECT_FALSE(zero->shift_terminal.has_value());
}

}  // namespace
}  // namespace kiln::pipeline
