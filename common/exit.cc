#include "common/exit.h"

#include "common/log.h"

namespace kiln {

int FailMain(const absl::Status& status, ExitContext context) {
  LogError("main", status.message());
  return ExitCodeFor(status, context);
}

}  // namespace kiln
