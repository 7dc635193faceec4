#include "coordinator/validation.h"

namespace kiln::coordinator {

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
