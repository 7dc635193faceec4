#include "pipeline/scheduler.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "pipeline/json_file.h"

namespace kiln::pipeline {
namespace {

// Every arithmetic result goes through a volatile so the compiler cannot fuse a multiply and an
// add into one FMA (GCC's default -ffp-contract=fast does on FMA targets): numpy and torch round
// each operation separately, and the schedule must match them bit for bit.
template <typename T>
T Rounded(T v) {
  volatile T r = v;
  return r;
}

constexpr const char* kClassName = "FlowMatchEulerDiscreteScheduler";

// Keys of FlowMatchEulerDiscreteScheduler (or read by FluxPipeline) that kiln does not implement:
// accepted only when false or null.
constexpr const char* kUnimplementedKeys[] = {"use_karras_sigmas", "use_exponential_sigmas",
                                              "use_beta_sigmas", "stochastic_sampling",
                                              "use_flow_sigmas"};

absl::Status TypeError(const std::string& key, const char* expected, const nlohmann::json& v) {
  return absl::InvalidArgumentError(absl::StrCat("scheduler config: ", key, " must be ", expected,
                                                 ", got ", v.dump()));
}

absl::Status ReadNumber(const nlohmann::json& j, const std::string& key, double* out) {
  if (!j.is_number()) return TypeError(key, "a number", j);
  *out = j.get<double>();
  return absl::OkStatus();
}

absl::Status ReadInt(const nlohmann::json& j, const std::string& key, int* out) {
  if (!j.is_number_integer() || j.get<int64_t>() < INT32_MIN || j.get<int64_t>() > INT32_MAX) {
    return TypeError(key, "a 32-bit integer", j);
  }
  *out = j.get<int>();
  return absl::OkStatus();
}

absl::Status ReadBool(const nlohmann::json& j, const std::string& key, bool* out) {
  if (!j.is_boolean()) return TypeError(key, "true or false", j);
  *out = j.get<bool>();
  return absl::OkStatus();
}

}  // namespace

absl::Status SchedulerConfig::Validate() const {
  auto bad = [](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("scheduler config: ", what));
  };
  if (num_train_timesteps < 1) return bad("num_train_timesteps must be >= 1");
  if (!std::isfinite(shift) || shift <= 0) return bad("shift must be a finite number > 0");
  if (!std::isfinite(base_shift)) return bad("base_shift must be finite");
  if (!std::isfinite(max_shift)) return bad("max_shift must be finite");
  if (use_dynamic_shifting && base_image_seq_len == max_image_seq_len) {
    return bad("base_image_seq_len and max_image_seq_len must differ");
  }
  if (shift_terminal && !(*shift_terminal > 0 && *shift_terminal < 1)) {
    return bad("shift_terminal must be in (0, 1)");
  }
  return absl::OkStatus();
}

absl::StatusOr<SchedulerConfig> SchedulerConfig::FromJson(const nlohmann::json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("scheduler config is not a JSON object");
  SchedulerConfig c;
  for (const auto& [key, v] : j.items()) {
    absl::Status s;
    if (key == "_class_name") {
      if (!v.is_string() || v.get<std::string>() != kClassName) {
        return absl::UnimplementedError(absl::StrCat("scheduler config: _class_name ", v.dump(),
                                                     " is not ", kClassName));
      }
    } else if (!key.empty() && key[0] == '_') {
      // _diffusers_version and the like: bookkeeping.
    } else if (key == "num_train_timesteps") {
      s = ReadInt(v, key, &c.num_train_timesteps);
    } else if (key == "shift") {
      s = ReadNumber(v, key, &c.shift);
    } else if (key == "use_dynamic_shifting") {
      s = ReadBool(v, key, &c.use_dynamic_shifting);
    } else if (key == "base_shift") {
      s = ReadNumber(v, key, &c.base_shift);
    } else if (key == "max_shift") {
      s = ReadNumber(v, key, &c.max_shift);
    } else if (key == "base_image_seq_len") {
      s = ReadInt(v, key, &c.base_image_seq_len);
    } else if (key == "max_image_seq_len") {
      s = ReadInt(v, key, &c.max_image_seq_len);
    } else if (key == "invert_sigmas") {
      s = ReadBool(v, key, &c.invert_sigmas);
    } else if (key == "shift_terminal") {
      if (!v.is_null()) {
        double t = 0;
        s = ReadNumber(v, key, &t);
        if (t != 0) c.shift_terminal = t;  // diffusers: `if self.config.shift_terminal:`
      }
    } else if (key == "time_shift_type") {
      if (v == "exponential") {
        c.time_shift_type = TimeShiftType::kExponential;
      } else if (v == "linear") {
        c.time_shift_type = TimeShiftType::kLinear;
      } else {
        s = TypeError(key, "\"exponential\" or \"linear\"", v);
      }
    } else if (v.is_null() || v == false) {
      // An option kiln does not implement, switched off.
    } else {
      bool known = false;
      for (const char* k : kUnimplementedKeys) known = known || key == k;
      return absl::UnimplementedError(absl::StrCat(
          "scheduler config: ", key, " = ", v.dump(), " is not supported by kiln",
          known ? "" : " (unknown key)"));
    }
    if (!s.ok()) return s;
  }
  if (auto s = c.Validate(); !s.ok()) return s;
  return c;
}

absl::StatusOr<SchedulerConfig> SchedulerConfig::FromJsonFile(const std::string& path) {
  auto j = ReadJsonFile(path);
  if (!j.ok()) return j.status();
  auto config = FromJson(*j);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

double CalculateShift(const SchedulerConfig& c, int image_seq_len) {
  // m = (max_shift - base_shift) / (max_seq_len - base_seq_len); b = base_shift - m * base_seq_len;
  // mu = image_seq_len * m + b: Python floats, the sequence lengths exact integers.
  const double m = (c.max_shift - c.base_shift) /
                   static_cast<double>(static_cast<int64_t>(c.max_image_seq_len) -
                                       c.base_image_seq_len);
  const double b = Rounded(c.base_shift - Rounded(m * c.base_image_seq_len));
  return Rounded(Rounded(image_seq_len * m) + b);
}

absl::StatusOr<FlowMatchSchedule> MakeFluxSchedule(const SchedulerConfig& config, int num_steps,
                                                   int image_seq_len) {
  if (auto s = config.Validate(); !s.ok()) return s;
  if (num_steps < 1) {
    return absl::InvalidArgumentError(absl::StrCat("num_steps must be >= 1, got ", num_steps));
  }
  if (image_seq_len < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("image_seq_len must be >= 1, got ", image_seq_len));
  }
  const int n = num_steps;

  // FluxPipeline: np.linspace(1.0, 1 / n, n) in float64: start + i * ((stop - start) / (n - 1)),
  // the last element set to stop. set_timesteps then casts to float32.
  std::vector<float> s(n);
  const double stop = 1.0 / n;
  const double step = n > 1 ? (stop - 1.0) / (n - 1) : 0.0;
  for (int i = 0; i < n; ++i) {
    const double y = (n > 1 && i == n - 1) ? stop : Rounded(Rounded(i * step) + 1.0);
    s[i] = static_cast<float>(y);
  }

  // Shift. Python floats meet float32 arrays as float32 (NEP 50): each is rounded to float32
  // first, then the operation is done in float32.
  if (config.use_dynamic_shifting) {
    const double mu = CalculateShift(config, image_seq_len);
    // exponential: exp(mu) / (exp(mu) + (1 / t - 1) ** 1.0); linear: mu / (mu + (1 / t - 1)).
    const float a = static_cast<float>(
        config.time_shift_type == SchedulerConfig::TimeShiftType::kExponential ? std::exp(mu)
                                                                                : mu);
    for (float& t : s) {
      const float x = Rounded(Rounded(1.0f / t) - 1.0f);
      t = Rounded(a / Rounded(a + x));
    }
  } else {
    // shift * t / (1 + (shift - 1) * t); (shift - 1) is a Python float subtraction.
    const float shift = static_cast<float>(config.shift);
    const float shift_m1 = static_cast<float>(config.shift - 1.0);
    for (float& t : s) {
      const float num = Rounded(shift * t);
      const float den = Rounded(1.0f + Rounded(shift_m1 * t));
      t = Rounded(num / den);
    }
  }

  if (config.shift_terminal) {
    // one_minus_z = 1 - t; scale = one_minus_z[-1] / (1 - shift_terminal); t = 1 - one_minus_z /
    // scale.
    const float last = Rounded(1.0f - s.back());
    if (last == 0.0f) {
      return absl::InvalidArgumentError(
          "shift_terminal cannot stretch a schedule whose last sigma is 1 (diffusers divides by "
          "zero)");
    }
    const float scale = Rounded(last / static_cast<float>(1.0 - *config.shift_terminal));
    for (float& t : s) t = Rounded(1.0f - Rounded(Rounded(1.0f - t) / scale));
  }

  // torch float32: timesteps = sigmas * num_train_timesteps; terminal sigma appended.
  const float train = static_cast<float>(config.num_train_timesteps);
  FlowMatchSchedule out;
  out.sigmas.reserve(n + 1);
  out.timesteps.reserve(n);
  for (float t : s) {
    const float sigma = config.invert_sigmas ? Rounded(1.0f - t) : t;
    out.sigmas.push_back(sigma);
    out.timesteps.push_back(Rounded(sigma * train));
  }
  out.sigmas.push_back(config.invert_sigmas ? 1.0 : 0.0);
  return out;
}

float FluxModelTimestep(const FlowMatchSchedule& schedule, int step) {
  return Rounded(static_cast<float>(schedule.timesteps.at(step)) / 1000.0f);
}

}  // namespace kiln::pipeline
