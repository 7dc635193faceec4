#include "pipeline/torch_error.h"

#include <c10/util/Exception.h>

#include "absl/strings/ascii.h"

namespace kiln::pipeline {

std::string ExceptionMessage(const std::exception& e) {
  if (const auto* error = dynamic_cast<const c10::Error*>(&e)) {
    return std::string(absl::StripTrailingAsciiWhitespace(error->what_without_backtrace()));
  }
  return e.what();
}

}  // namespace kiln::pipeline
