// Checks on what peers send the coordinator. The spec's rules, ids, precisions and the field
// error live in common/ (common/job_spec.h, common/status.h), shared with the node and the
// pipeline; this file keeps what only the coordinator needs: the first difference between two
// specs (idempotent Submit). Thread-safe (no state).
#pragma once

#include <string>

#include "common/job_spec.h"
#include "common/proto/kiln.pb.h"
#include "common/status.h"

namespace kiln::coordinator {

// The shared vocabulary, under the names the coordinator's code and tests use.
using kiln::ErrorField;
using kiln::FieldError;
using kiln::InvalidField;
using kiln::SpecLimits;
using kiln::ValidateId;
using kiln::ValidateJobSpec;
using kiln::ValidateModelName;

// The first field in which two specs differ ("" when equal), e.g. "spec.width".
std::string FirstDifference(const kiln::v1::JobSpec& a, const kiln::v1::JobSpec& b);

}  // namespace kiln::coordinator
