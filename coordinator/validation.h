// Checks on what peers send the coordinator: JobSpec field by field, ids, and the "field" an
// INVALID_ARGUMENT error names (ErrorReply.field), carried inside absl::Status as a payload so
// the socket-free logic can say which field was wrong and the transport can put it on the wire.
// Thread-safe (no state).
#pragma once

#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "common/proto/kiln.pb.h"

namespace kiln::coordinator {

// Limits a JobSpec is checked against (CoordinatorOptions carries them).
struct SpecLimits {
  uint32_t max_image_side = 4096;  // pixels, for width and height
  uint32_t max_steps = 1000;
  uint32_t max_prompt_bytes = 10000;
};

// A status whose message starts with "<field>: " and that carries `field` as a payload.
absl::Status FieldError(absl::StatusCode code, absl::string_view field, absl::string_view message);
inline absl::Status InvalidField(absl::string_view field, absl::string_view message) {
  return FieldError(absl::StatusCode::kInvalidArgument, field, message);
}
// The field a FieldError names ("" if none).
std::string ErrorField(const absl::Status& status);

// Job and node ids: 1..128 characters of [A-Za-z0-9._:-]. InvalidArgument naming `field`.
absl::Status ValidateId(absl::string_view field, absl::string_view id);
// Model names: 1..128 characters of [A-Za-z0-9._:/-]. InvalidArgument naming `field`.
absl::Status ValidateModelName(absl::string_view field, absl::string_view model);

// Every field of `spec`, in declaration order; the first bad one is reported as
// InvalidArgument naming "spec.<field>", e.g. "spec.width: 300 is not a multiple of 16".
// Checks only the spec itself: whether the model is served and whether the deadline has passed
// depend on the cluster and the clock (Coordinator::Submit checks those).
absl::Status ValidateJobSpec(const kiln::v1::JobSpec& spec, const SpecLimits& limits);

// The first field in which two specs differ ("" when equal), e.g. "spec.width".
std::string FirstDifference(const kiln::v1::JobSpec& a, const kiln::v1::JobSpec& b);

// True for "", "fp32", "bf16", "fp8".
bool IsKnownPrecision(absl::string_view precision);

}  // namespace kiln::coordinator
