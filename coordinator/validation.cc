#include "coordinator/validation.h"

#include <cmath>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kiln::coordinator {
namespace {

constexpr char kFieldPayloadUrl[] = "type.kiln.dev/kiln.ErrorField";
constexpr size_t kMaxIdLength = 128;

bool IsIdChar(char c, bool allow_slash) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == ':' || c == '-' || (allow_slash && c == '/');
}

absl::Status CheckName(absl::string_view field, absl::string_view id, bool allow_slash) {
  if (id.empty()) return InvalidField(field, "must not be empty");
  if (id.size() > kMaxIdLength) {
    return InvalidField(field, absl::StrCat(id.size(), " characters, more than ", kMaxIdLength));
  }
  for (size_t i = 0; i < id.size(); ++i) {
    if (!IsIdChar(id[i], allow_slash)) {
      return InvalidField(
          field, absl::StrFormat("character %d (byte 0x%02x) is not one of [A-Za-z0-9._:%s-]", i,
                                 static_cast<unsigned char>(id[i]), allow_slash ? "/" : ""));
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

}  // namespace

absl::Status FieldError(absl::StatusCode code, absl::string_view field, absl::string_view message) {
  absl::Status s(code, absl::StrCat(field, ": ", message));
  s.SetPayload(kFieldPayloadUrl, absl::Cord(field));
  return s;
}

std::string ErrorField(const absl::Status& status) {
  auto p = status.GetPayload(kFieldPayloadUrl);
  return p ? std::string(*p) : std::string();
}

absl::Status ValidateId(absl::string_view field, absl::string_view id) {
  return CheckName(field, id, /*allow_slash=*/false);
}

absl::Status ValidateModelName(absl::string_view field, absl::string_view model) {
  return CheckName(field, model, /*allow_slash=*/true);
}

bool IsKnownPrecision(absl::string_view p) {
  return p.empty() || p == "fp32" || p == "bf16" || p == "fp8";
}

absl::Status ValidateJobSpec(const kiln::v1::JobSpec& spec, const SpecLimits& limits) {
  if (auto s = ValidateId("spec.job_id", spec.job_id()); !s.ok()) return s;
  if (auto s = ValidateModelName("spec.model", spec.model()); !s.ok()) return s;

  const std::string& prompt = spec.prompt();
  if (prompt.empty()) return InvalidField("spec.prompt", "must not be empty");
  if (prompt.size() > limits.max_prompt_bytes) {
    return InvalidField("spec.prompt", absl::StrCat(prompt.size(), " bytes, more than ",
                                                    limits.max_prompt_bytes));
  }
  if (size_t at = InvalidUtf8At(prompt); at != absl::string_view::npos) {
    return InvalidField("spec.prompt", absl::StrCat("not valid UTF-8 at byte ", at));
  }

  for (auto [name, value] : {std::pair<const char*, uint32_t>{"spec.width", spec.width()},
                             std::pair<const char*, uint32_t>{"spec.height", spec.height()}}) {
    if (value == 0) return InvalidField(name, "must be set (pixels, a multiple of 16)");
    if (value % 16 != 0) {
      return InvalidField(name, absl::StrCat(value, " is not a multiple of 16"));
    }
    if (value > limits.max_image_side) {
      return InvalidField(name, absl::StrCat(value, " is more than ", limits.max_image_side));
    }
  }

  if (spec.steps() < 1 || spec.steps() > limits.max_steps) {
    return InvalidField("spec.steps",
                        absl::StrCat(spec.steps(), " is not in 1..", limits.max_steps));
  }
  const float g = spec.guidance();
  if (!std::isfinite(g) || g < 0 || g > 100) {
    return InvalidField("spec.guidance", absl::StrCat(g, " is not in 0..100"));
  }
  // seed: every uint64 is a valid seed.
  if (!IsKnownPrecision(spec.precision())) {
    return InvalidField("spec.precision", absl::StrCat("'", spec.precision(),
                                                       "' is not one of \"\", fp32, bf16, fp8"));
  }
  // priority: every int32 is a valid priority (higher runs first).
  if (spec.deadline_unix_ms() < 0) {
    return InvalidField("spec.deadline_unix_ms",
                        absl::StrCat(spec.deadline_unix_ms(), " is negative (0 means none)"));
  }
  return absl::OkStatus();
}

std::string FirstDifference(const kiln::v1::JobSpec& a, const kiln::v1::JobSpec& b) {
  if (a.job_id() != b.job_id()) return "spec.job_id";
  if (a.model() != b.model()) return "spec.model";
  if (a.prompt() != b.prompt()) return "spec.prompt";
  if (a.width() != b.width()) return "spec.width";
  if (a.height() != b.height()) return "spec.height";
  if (a.steps() != b.steps()) return "spec.steps";
  if (a.guidance() != b.guidance()) return "spec.guidance";
  if (a.seed() != b.seed()) return "spec.seed";
  if (a.precision() != b.precision()) return "spec.precision";
  if (a.priority() != b.priority()) return "spec.priority";
  if (a.deadline_unix_ms() != b.deadline_unix_ms()) return "spec.deadline_unix_ms";
  return "";
}

}  // namespace kiln::coordinator
