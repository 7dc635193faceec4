#include "common/job_state.h"

#include "absl/strings/strip.h"
#include "google/protobuf/descriptor.h"

namespace kiln {
namespace {

// The enum value's name in the proto without `prefix`; "UNSPECIFIED" for 0 and unknown values.
std::string NameOf(const google::protobuf::EnumDescriptor* e, int value, absl::string_view prefix) {
  const google::protobuf::EnumValueDescriptor* v = e->FindValueByNumber(value);
  if (value == 0 || v == nullptr) return "UNSPECIFIED";
  absl::string_view name = v->name();
  absl::ConsumePrefix(&name, prefix);
  return std::string(name);
}

}  // namespace

std::string JobStateName(kiln::v1::JobState state) {
  return NameOf(kiln::v1::JobState_descriptor(), state, "JOB_STATE_");
}

std::string NodeStateName(kiln::v1::NodeState state) {
  return NameOf(kiln::v1::NodeState_descriptor(), state, "NODE_STATE_");
}

bool IsTerminal(kiln::v1::JobState state) {
  return state == kiln::v1::JOB_STATE_SUCCEEDED || state == kiln::v1::JOB_STATE_FAILED ||
         state == kiln::v1::JOB_STATE_CANCELLED;
}

}  // namespace kiln
