#include "common/job_spec.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/proto/kiln.pb.h"
#include "common/status.h"

namespace kiln {
namespace {

bool IsIdChar(char c, bool allow_slash) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == ':' || c == '-' || (allow_slash && c == '/');
}

absl::Status CheckName(absl::string_view field, absl::string_view id, bool allow_slash) {
  const char* charset = allow_slash ? "[A-Za-z0-9._:/-]" : "[A-Za-z0-9._:-]";
  if (id.empty()) {
    return InvalidField(field, absl::StrCat("must not be empty (1..", kMaxIdChars,
                                            " characters of ", charset, ")"));
  }
  if (id.size() > kMaxIdChars) {
    return InvalidField(field, absl::StrCat(id.size(), " characters, more than ", kMaxIdChars));
  }
  for (size_t i = 0; i < id.size(); ++i) {
    if (!IsIdChar(id[i], allow_slash)) {
      return InvalidField(field, absl::StrFormat("character %d (byte 0x%02x) is not one of %s", i,
                                                 static_cast<unsigned char>(id[i]), charset));
    }
  }
  return absl::OkStatus();
}

// Index of the first byte that is not part of well-formed UTF-8 (no overlong forms, no
// surrogates, nothing above U+10FFFF), or npos.
size_t InvalidUtf8At(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t extra;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      extra = 1, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      extra = 2, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      extra = 3, cp = c & 0x07;
    } else {
      return i;
    }
    if (extra >= s.size() - i) return i;  // truncated sequence
    for (size_t k = 1; k <= extra; ++k) {
      const unsigned char d = s[i + k];
      if ((d & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (d & 0x3F);
    }
    const bool overlong =
        (extra == 1 && cp < 0x80) || (extra == 2 && cp < 0x800) || (extra == 3 && cp < 0x10000);
    if (overlong || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += extra + 1;
  }
  return absl::string_view::npos;
}

std::string FormatComputeCapability(int cc) { return absl::StrCat(cc / 10, ".", cc % 10); }

}  // namespace

absl::Status ValidateId(absl::string_view field, absl::string_view id) {
  return CheckName(field, id, /*allow_slash=*/false);
}

absl::Status ValidateModelName(absl::string_view field, absl::string_view model) {
  return CheckName(field, model, /*allow_slash=*/true);
}

absl::Status ValidatePrompt(absl::string_view field, absl::string_view prompt,
                            const SpecLimits& limits) {
  if (prompt.empty()) return InvalidField(field, "must not be empty");
  if (prompt.size() > limits.max_prompt_bytes) {
    return InvalidField(field, absl::StrCat(prompt.size(), " bytes, more than ",
                                            limits.max_prompt_bytes));
  }
  if (size_t at = InvalidUtf8At(prompt); at != absl::string_view::npos) {
    return InvalidField(field, absl::StrCat("not valid UTF-8 at byte ", at));
  }
  return absl::OkStatus();
}

absl::Status ValidateImageSide(absl::string_view field, int64_t pixels, const SpecLimits& limits) {
  if (pixels == 0) {
    return InvalidField(field, absl::StrCat("must be set (pixels, a multiple of ", kSideMultiple,
                                            ")"));
  }
  if (pixels < 0) return InvalidField(field, absl::StrCat(pixels, " is negative"));
  if (pixels % kSideMultiple != 0) {
    return InvalidField(field, absl::StrCat(pixels, " is not a multiple of ", kSideMultiple));
  }
  if (pixels > limits.max_image_side) {
    return InvalidField(field, absl::StrCat(pixels, " is more than ", limits.max_image_side));
  }
  return absl::OkStatus();
}

absl::Status ValidateSteps(absl::string_view field, int64_t steps, const SpecLimits& limits) {
  if (steps < 1 || steps > limits.max_steps) {
    return InvalidField(field, absl::StrCat(steps, " is not in 1..", limits.max_steps));
  }
  return absl::OkStatus();
}

absl::Status ValidateGuidance(absl::string_view field, double guidance) {
  if (!std::isfinite(guidance) || guidance < 0 || guidance > kMaxGuidance) {
    return InvalidField(field, absl::StrCat(guidance, " is not in 0..", kMaxGuidance));
  }
  return absl::OkStatus();
}

absl::Status ValidateLoraName(absl::string_view field, absl::string_view name) {
  if (name.empty() || name.size() > kMaxIdChars) {
    return InvalidField(field, absl::StrCat("'", name, "': 1..", kMaxIdChars,
                                            " characters of [A-Za-z0-9._-]"));
  }
  for (char c : name) {
    if (c == ':' || !IsIdChar(c, /*allow_slash=*/false)) {
      return InvalidField(field, absl::StrCat("'", name, "': character '", std::string(1, c),
                                              "' is not one of [A-Za-z0-9._-]"));
    }
  }
  if (name.front() == '.') {
    return InvalidField(field, absl::StrCat("'", name, "' starts with '.'"));
  }
  return absl::OkStatus();
}

std::vector<LoraChoice> LorasOf(const kiln::v1::JobSpec& spec) {
  std::vector<LoraChoice> out;
  for (const auto& l : spec.loras()) out.push_back({l.name(), l.scale() == 0 ? 1.0 : l.scale()});
  return out;
}

absl::StatusOr<LoraChoice> ParseLoraChoice(absl::string_view field, absl::string_view text) {
  LoraChoice choice;
  const size_t colon = text.rfind(':');
  choice.name = std::string(text.substr(0, colon));
  if (auto s = ValidateLoraName(field, choice.name); !s.ok()) return s;
  if (colon != absl::string_view::npos) {
    const absl::string_view scale = text.substr(colon + 1);
    if (!absl::SimpleAtod(scale, &choice.scale) || !std::isfinite(choice.scale) ||
        std::abs(choice.scale) > kMaxLoraScale) {
      return InvalidField(field, absl::StrCat("'", text, "': scale '", scale,
                                              "' is not a number in -", kMaxLoraScale, "..",
                                              kMaxLoraScale));
    }
  }
  return choice;
}

std::string LoraSetKey(const std::vector<LoraChoice>& loras) {
  std::string key;
  for (const auto& l : loras) {
    absl::StrAppend(&key, key.empty() ? "" : ",", l.name, "@",
                    absl::StrFormat("%.9g", static_cast<float>(l.scale)));
  }
  return key;
}

absl::Status ValidateJobSpec(const kiln::v1::JobSpec& spec, const SpecLimits& limits) {
  if (auto s = ValidateId("spec.job_id", spec.job_id()); !s.ok()) return s;
  if (auto s = ValidateModelName("spec.model", spec.model()); !s.ok()) return s;
  if (auto s = ValidatePrompt("spec.prompt", spec.prompt(), limits); !s.ok()) return s;
  if (auto s = ValidateImageSide("spec.width", spec.width(), limits); !s.ok()) return s;
  if (auto s = ValidateImageSide("spec.height", spec.height(), limits); !s.ok()) return s;
  if (auto s = ValidateSteps("spec.steps", spec.steps(), limits); !s.ok()) return s;
  // A float on the wire: checked (and shown) as the float it is.
  if (auto s = ValidateGuidance("spec.guidance", spec.guidance()); !s.ok()) return s;
  // seed: every uint64 is a valid seed.
  if (auto s = ValidatePrecision("spec.precision", spec.precision(), /*allow_default=*/true);
      !s.ok()) {
    return s;
  }
  // priority: every int32 is a valid priority (higher runs first).
  if (spec.deadline_unix_ms() < 0) {
    return InvalidField("spec.deadline_unix_ms",
                        absl::StrCat(spec.deadline_unix_ms(), " is negative (0 means none)"));
  }
  if (static_cast<size_t>(spec.loras_size()) > kMaxLoras) {
    return InvalidField("spec.loras", absl::StrCat(spec.loras_size(), " LoRAs, more than ",
                                                   kMaxLoras));
  }
  for (int i = 0; i < spec.loras_size(); ++i) {
    const auto& l = spec.loras(i);
    const std::string field = absl::StrCat("spec.loras[", i, "]");
    if (auto s = ValidateLoraName(field + ".name", l.name()); !s.ok()) return s;
    if (!std::isfinite(l.scale()) || std::abs(l.scale()) > kMaxLoraScale) {
      return InvalidField(field + ".scale", absl::StrCat(l.scale(), " is not in -", kMaxLoraScale,
                                                         "..", kMaxLoraScale));
    }
    for (int j = 0; j < i; ++j) {
      if (spec.loras(j).name() == l.name()) {
        return InvalidField(field + ".name", absl::StrCat("'", l.name(), "' is named twice"));
      }
    }
  }
  return absl::OkStatus();
}

bool IsPrecision(absl::string_view precision) {
  return std::find(kPrecisions.begin(), kPrecisions.end(), precision) != kPrecisions.end();
}

absl::Status ValidatePrecision(absl::string_view field, absl::string_view precision,
                               bool allow_default) {
  if (IsPrecision(precision) || (allow_default && precision.empty())) return absl::OkStatus();
  return InvalidField(field, absl::StrCat("'", precision, "' is not one of ",
                                          allow_default ? "\"\", " : "", "fp32, bf16, fp8"));
}

PrecisionNeeds NeedsOf(absl::string_view precision) {
  // fp8 (e4m3) matrix multiplies exist from Ada/Hopper on: sm_89.
  if (precision == "fp8") return {true, 89};
  return {};
}

DeviceCaps CapsOfDevice(absl::string_view device) {
  DeviceCaps caps;
  if (!absl::StartsWith(device, "cuda")) return caps;
  caps.cuda = true;
  int cc = 0;
  if (absl::ConsumePrefix(&device, "cuda:sm_") && absl::SimpleAtoi(device, &cc)) {
    caps.compute_capability = cc;
  }
  return caps;
}

int ParseComputeCapability(absl::string_view text) {
  const size_t dot = text.find('.');
  int major = 0, minor = 0;
  if (dot == absl::string_view::npos || !absl::SimpleAtoi(text.substr(0, dot), &major) ||
      !absl::SimpleAtoi(text.substr(dot + 1), &minor) || major < 0 || minor < 0 || minor > 9) {
    return -1;
  }
  return major * 10 + minor;
}

absl::Status CheckDeviceRuns(absl::string_view precision, const DeviceCaps& device) {
  const PrecisionNeeds needs = NeedsOf(precision);
  if (needs.cuda && !device.cuda) {
    return absl::FailedPreconditionError(absl::StrCat(precision, " needs a cuda device"));
  }
  if (device.compute_capability >= 0 && device.compute_capability < needs.min_compute_capability) {
    return absl::FailedPreconditionError(
        absl::StrCat(precision, " needs compute capability ",
                     FormatComputeCapability(needs.min_compute_capability), " or newer, not ",
                     FormatComputeCapability(device.compute_capability)));
  }
  return absl::OkStatus();
}

std::string DefaultPrecisionFor(const DeviceCaps& device) { return device.cuda ? "bf16" : "fp32"; }

}  // namespace kiln
