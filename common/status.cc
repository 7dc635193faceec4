#include "common/status.h"

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"

namespace kiln {
namespace {

// The payload that carries the field. Kept stable: statuses cross library boundaries with it.
constexpr char kFieldPayloadUrl[] = "type.kiln.dev/kiln.ErrorField";

}  // namespace

absl::Status FieldError(absl::StatusCode code, absl::string_view field, absl::string_view message) {
  absl::Status s(code, absl::StrCat(field, ": ", message));
  s.SetPayload(kFieldPayloadUrl, absl::Cord(field));
  return s;
}

absl::Status WithField(absl::Status status, absl::string_view field) {
  if (!status.ok() && !field.empty()) status.SetPayload(kFieldPayloadUrl, absl::Cord(field));
  return status;
}

std::string ErrorField(const absl::Status& status) {
  auto p = status.GetPayload(kFieldPayloadUrl);
  return p ? std::string(*p) : std::string();
}

int ExitCodeFor(const absl::Status& status, ExitContext context) {
  if (status.ok()) return kExitOk;
  if (!ErrorField(status).empty()) return kExitBadInput;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kOutOfRange:
      return kExitBadInput;
    case absl::StatusCode::kFailedPrecondition:
      return context == ExitContext::kStartup ? kExitBadInput : kExitFailure;
    default:
      return kExitFailure;
  }
}

}  // namespace kiln
