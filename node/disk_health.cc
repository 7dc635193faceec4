#include "node/disk_health.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace kiln::node {
namespace {

absl::Status ProbeError(int err, const std::string& dir, const std::string& step) {
  const std::string what = absl::StrCat("package directory ", dir, ": ", step, ": ",
                                        std::strerror(err));
  if (err == ENOSPC || err == EDQUOT) return absl::ResourceExhaustedError(what);
  return absl::UnavailableError(what);
}

std::string Remedy(const absl::Status& s) {
  return absl::IsResourceExhausted(s)
             ? "free space there (or give the node another --package_dir)"
             : "make it writable by the node's user (or give the node another --package_dir)";
}

}  // namespace

absl::Status ProbeDisk(const std::string& dir, int64_t bytes) {
  static std::atomic<uint64_t> next{0};  // the periodic thread and a worker may probe at once
  const std::string path = absl::StrCat(dir, "/.kiln-disk-probe-", ::getpid(), "-", next++);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0 && errno == ENOENT && ::mkdir(dir.c_str(), 0755) == 0) {
    // The node owns its package directory (the provider makes it too): a missing one is made.
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  }
  if (fd < 0) return ProbeError(errno, dir, "create a file");
  absl::Status s;
  std::vector<char> block(static_cast<size_t>(std::min<int64_t>(bytes, 1 << 20)), 'k');
  int64_t left = bytes;
  while (s.ok() && left > 0) {
    const ssize_t n = ::write(fd, block.data(), static_cast<size_t>(std::min<int64_t>(
                                                    left, static_cast<int64_t>(block.size()))));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) s = ProbeError(errno, dir, "write");
    else left -= n;
  }
  if (s.ok() && ::fsync(fd) != 0) s = ProbeError(errno, dir, "fsync");
  if (::close(fd) != 0 && s.ok()) s = ProbeError(errno, dir, "close");
  if (::unlink(path.c_str()) != 0 && s.ok()) s = ProbeError(errno, dir, "delete a file");
  return s;
}

DiskHealth::DiskHealth(DiskHealthOptions options) : options_(std::move(options)) {}

DiskHealth::~DiskHealth() { Stop(); }

void DiskHealth::Start() {
  if (options_.interval_ms <= 0 || thread_.joinable()) return;
  thread_ = std::thread([this] {
    do {
      CheckNow();
    } while (!stop_.WaitForNotificationWithTimeout(absl::Milliseconds(options_.interval_ms)));
  });
}

void DiskHealth::Stop() {
  if (!stop_.HasBeenNotified()) stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

absl::Status DiskHealth::CheckNow() {
  absl::Status s = ProbeDisk(options_.dir, options_.probe_bytes);
  absl::MutexLock l(&mu_);
  if (s.ok() != status_.ok()) {
    if (s.ok()) {
      LogInfo("node", absl::StrCat("package directory ", options_.dir,
                                   " is writable again; ready for jobs"));
    } else {
      LogError("node", absl::StrCat(s.message(), "; not ready for jobs until it works: ",
                                    Remedy(s)));
    }
  }
  status_ = s;
  return s;
}

absl::Status DiskHealth::status() const {
  absl::MutexLock l(&mu_);
  return status_;
}

std::string DiskHealth::reason() const {
  absl::Status s = status();
  if (s.ok()) return "";
  return absl::StrCat(s.message(), "; ", Remedy(s));
}

absl::Status DiskFailure(const absl::Status& error, DiskHealth* disk, const std::string& node_id) {
  if (disk == nullptr || error.ok()) return error;
  // Only errors a broken disk can cause; a bad prompt or a cancel says nothing about the disk.
  if (!absl::IsResourceExhausted(error) && !absl::IsPermissionDenied(error) &&
      !absl::IsUnavailable(error) && !absl::IsInternal(error) && !absl::IsDataLoss(error) &&
      !absl::IsFailedPrecondition(error) && !absl::IsUnknown(error)) {
    return error;
  }
  const absl::Status s = disk->CheckNow();
  if (s.ok()) return error;
  return absl::Status(s.code(), absl::StrCat("node ", node_id, ": ", s.message(),
                                             "; the job moves to another node; on this node ",
                                             Remedy(s)));
}

}  // namespace kiln::node
