#include "parallel/port_file.h"

#include <chrono>
#include <fstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/files.h"
#include "common/stopwatch.h"

namespace kiln::parallel {

absl::Status WritePortFile(const std::string& path, int port) {
  return WriteFileAtomically(path, absl::StrCat(port, "\n"));
}

absl::StatusOr<int> WaitForPortFile(const std::string& path, double timeout_seconds) {
  const SteadyTime start = SteadyNow();
  for (;;) {
    std::ifstream in(path);
    std::string text;
    int port = 0;
    if (std::getline(in, text) && absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &port) &&
        port > 0) {
      return port;
    }
    if (SecondsSince(start) > timeout_seconds) {
      return absl::DeadlineExceededError(
          absl::StrCat("port file ", path, ": no port from rank 0 within ", timeout_seconds, " s"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace kiln::parallel
