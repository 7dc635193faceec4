// The Flux flow-matching Euler schedule: the sigmas and timesteps diffusers' FluxPipeline gets from
// FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/n, n), mu=calculate_shift(..))
// for a model repository's scheduler/scheduler_config.json. The denoising loop (LibTorch adapter)
// calls MakeFluxSchedule once per job and steps x <- x + (sigmas[i+1] - sigmas[i]) * v.
//
// Precision: diffusers computes the schedule in float32 (numpy float32 arrays after
// `np.array(sigmas).astype(np.float32)`, Python floats entering as float32 under NumPy 2's NEP 50
// rules, then torch float32 tensors). MakeFluxSchedule repeats that sequence of float32 operations
// in the same order, after computing linspace and mu in double exactly as numpy and Python do, so
// every value is the float32 diffusers produces, held in a double: bit-identical on the same libm
// (tests/pipeline/scheduler_test.cc checks this against diffusers 0.42.1). Only exp(mu) comes from
// libm; another libm may differ by one double ulp, which changes a float32 result by at most one
// float32 ulp. Against the exact (double) formula the values differ by float32 rounding: relative
// error below 1e-6.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kiln::pipeline {

// The FlowMatchEulerDiscreteScheduler config fields kiln implements, with diffusers' defaults.
// Flux.1-dev: shift 3.0, use_dynamic_shifting true, base_shift 0.5, max_shift 1.15,
// base_image_seq_len 256, max_image_seq_len 4096 (shift unused when dynamic). Flux.1-schnell:
// shift 1.0, use_dynamic_shifting false.
struct SchedulerConfig {
  enum class TimeShiftType { kExponential, kLinear };

  int num_train_timesteps = 1000;  // timestep = sigma * num_train_timesteps
  double shift = 1.0;              // static shift s*shift/(1+(shift-1)*s), when not dynamic
  bool use_dynamic_shifting = false;  // shift by mu = calculate_shift(image_seq_len)
  double base_shift = 0.5;            // mu at base_image_seq_len
  double max_shift = 1.15;            // mu at max_image_seq_len
  int base_image_seq_len = 256;       // packed latent tokens
  int max_image_seq_len = 4096;       // packed latent tokens
  // Dynamic shift: exponential e^mu/(e^mu+(1/s-1)), linear mu/(mu+(1/s-1)).
  TimeShiftType time_shift_type = TimeShiftType::kExponential;
  // Stretch the shifted sigmas so the last equals this value (diffusers treats 0 as unset).
  std::optional<double> shift_terminal;
  // sigmas -> 1 - sigmas, terminal 1 instead of 0 (Mochi); timesteps follow the inverted sigmas.
  bool invert_sigmas = false;

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;

  // Reads a diffusers scheduler config. Keys starting with "_" are ignored except _class_name,
  // which must be FlowMatchEulerDiscreteScheduler when present. Options kiln does not implement
  // (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, stochastic_sampling,
  // use_flow_sigmas, and any other key) are Unimplemented when set to anything but false/null, so
  // a config kiln would misread is refused instead of silently giving another schedule.
  // InvalidArgument on wrong value types or a failed Validate().
  static absl::StatusOr<SchedulerConfig> FromJson(const nlohmann::json& j);
  // FromJson of the file's contents; NotFound when missing, InvalidArgument when not JSON.
  static absl::StatusOr<SchedulerConfig> FromJsonFile(const std::string& path);
};

struct FlowMatchSchedule {
  std::vector<double> sigmas;     // num_steps + 1, decreasing, last 0 (1 with invert_sigmas)
  std::vector<double> timesteps;  // num_steps, sigmas[i] * num_train_timesteps
};

// diffusers' FluxPipeline calculate_shift: the line through (base_image_seq_len, base_shift) and
// (max_image_seq_len, max_shift) at image_seq_len, in double as Python computes it.
double CalculateShift(const SchedulerConfig& config, int image_seq_len);

// The schedule for `num_steps` (>= 1) denoising steps of an image of `image_seq_len` (>= 1)
// packed latent tokens, (H/16)*(W/16) for Flux. InvalidArgument on bad arguments or config.
absl::StatusOr<FlowMatchSchedule> MakeFluxSchedule(const SchedulerConfig& config, int num_steps,
                                                   int image_seq_len);

// The `timestep` input the transformer gets at step `step`: float32(timesteps[step]) / 1000 in
// float32, as FluxPipeline passes `timestep / 1000` with float32 latents. (It can differ from
// sigmas[step] by one float32 ulp. With bf16 latents diffusers first rounds the timestep to bf16.)
float FluxModelTimestep(const FlowMatchSchedule& schedule, int step);

}  // namespace kiln::pipeline
