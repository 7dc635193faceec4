#include "common/job_state.h"

#include "absl/strings/strip.h"

namespace kiln {

std::string JobStateName(kiln::v1::JobState state) {
  if (state == kiln::v1::JOB_STATE_UNSPECIFIED || !kiln::v1::JobState_IsValid(state)) {
    return "UNSPECIFIED";
  }
  absl::string_view name = kiln::v1::JobState_Name(state);
  absl::ConsumePrefix(&name, "JOB_STATE_");
  return std::string(name);
}

std::string NodeStateName(kiln::v1::NodeState state) {
  if (state == kiln::v1::NODE_STATE_UNSPECIFIED || !kiln::v1::NodeState_IsValid(state)) {
    return "UNSPECIFIED";
  }
  absl::string_view name = kiln::v1::NodeState_Name(state);
  absl::ConsumePrefix(&name, "NODE_STATE_");
  return std::string(name);
}

bool IsTerminal(kiln::v1::JobState state) {
  return state == kiln::v1::JOB_STATE_SUCCEEDED || state == kiln::v1::JOB_STATE_FAILED ||
         state == kiln::v1::JOB_STATE_CANCELLED;
}

}  // namespace kiln
