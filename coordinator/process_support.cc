#include "coordinator/process_support.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace kiln::coordinator {

EventLog StderrLog(std::string program) {
  static std::mutex* mu = new std::mutex;  // one stderr, shared by every log of the process
  return [program = std::move(program)](const std::string& line) {
    const std::string text =
        absl::StrCat(program, ": ",
                     absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()),
                     " ", line, "\n");
    std::lock_guard<std::mutex> lock(*mu);
    std::fwrite(text.data(), 1, text.size(), stderr);
    std::fflush(stderr);
  };
}

absl::Status WriteEndpointsFile(const std::string& path, const EndpointsFile& e) {
  const nlohmann::json j = {{"client_endpoint", e.client_endpoint},
                            {"node_endpoint", e.node_endpoint},
                            {"metrics_url", e.metrics_url},
                            {"pid", e.pid}};
  const std::string text = j.dump(2) + "\n";
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  auto fail = [&](const char* what) {
    const int err = errno;
    return absl::UnavailableError(
        absl::StrCat("endpoints file ", path, ": ", what, ": ", std::strerror(err)));
  };
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return fail("cannot create the temporary file");
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      auto s = fail("write");
      ::close(fd);
      ::unlink(tmp.c_str());
      return s;
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    auto s = fail("fsync");
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  }
  if (::close(fd) != 0) {
    auto s = fail("close");
    ::unlink(tmp.c_str());
    return s;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    auto s = fail("rename");
    ::unlink(tmp.c_str());
    return s;
  }
  return absl::OkStatus();
}

}  // namespace kiln::coordinator
