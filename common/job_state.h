// Job and node states by name, and which job states are final: one spelling for every component
// (the coordinator's messages, the CLI's tables and JSON). Thread-safe (no state).
#pragma once

#include <string>

#include "common/proto/kiln.pb.h"

namespace kiln {

// State names: the proto's enum names without their prefix ("QUEUED", "RUNNING", "SUCCEEDED",
// "FAILED", "CANCELLED"; "READY", "DRAINING", "DEAD", "LEFT"); "UNSPECIFIED" for 0 and for values
// this build does not know.
std::string JobStateName(kiln::v1::JobState state);
std::string NodeStateName(kiln::v1::NodeState state);
// SUCCEEDED, FAILED and CANCELLED: the job will not change again.
bool IsTerminal(kiln::v1::JobState state);

}  // namespace kiln
