// Turning LibTorch's exceptions into one-line messages for absl::Status.
#pragma once

#include <exception>
#include <string>

namespace kiln::pipeline {

// The message of an exception without LibTorch's C++ backtrace: c10::Error's what() carries
// one (dozens of "frame #N" lines), which buried the cause when a status was cut to its tail
// (kiln-compile's canary failures on the GPU host read as the middle of a backtrace). Other
// exceptions give what().
std::string ExceptionMessage(const std::exception& e);

}  // namespace kiln::pipeline
