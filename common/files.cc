#include "common/files.h"

#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kiln {
namespace {

thread_local std::string* g_failed = nullptr;

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) {
  if (std::remove(path) != 0 && errno != ENOENT) {
    if (g_failed != nullptr && g_failed->empty()) {
      *g_failed = absl::StrCat(path, ": ", std::strerror(errno));
    }
  }
  return 0;  // keep going: remove as much as possible
}

std::string DirOf(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// The status for a failed system call: errno's code (NotFound, PermissionDenied,
// ResourceExhausted, ...) and text, naming the step and the path.
absl::Status WriteFailed(const char* step, const std::string& path, int err) {
  return absl::ErrnoToStatus(err, absl::StrCat(step, " ", path));
}

}  // namespace

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) ::close(fd_);
}

int UniqueFd::Close() {
  const int rc = fd_ >= 0 ? ::close(fd_) : 0;
  fd_ = -1;
  return rc;
}

absl::Status RemoveTree(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::OkStatus();
    return absl::InternalError(absl::StrCat(path, ": ", std::strerror(errno)));
  }
  std::string failed;
  g_failed = &failed;
  const int rc = nftw(path.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS);
  g_failed = nullptr;
  if (rc != 0) return absl::InternalError(absl::StrCat("walking ", path, ": ", std::strerror(errno)));
  if (!failed.empty()) return absl::InternalError(absl::StrCat("cannot remove ", failed));
  return absl::OkStatus();
}

absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents, int mode) {
  // Unique per call (pid and a random part): concurrent writers of one path never share a
  // temporary file; the last rename wins.
  thread_local absl::BitGen gen;
  const std::string tmp = absl::StrFormat("%s.tmp.%d.%08x", path, ::getpid(),
                                          absl::Uniform<uint32_t>(gen));
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode));
  if (fd.get() < 0) return WriteFailed("create", tmp, errno);
  auto fail = [&](const char* step, const std::string& what) {
    const int err = errno;
    fd.Close();
    ::unlink(tmp.c_str());
    return WriteFailed(step, what, err);
  };
  size_t done = 0;
  while (done < contents.size()) {
    const ssize_t n = ::write(fd.get(), contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail("write", tmp);
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd.get()) != 0) return fail("fsync", tmp);
  if (fd.Close() != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return WriteFailed("close", tmp, err);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return WriteFailed("rename to", path, err);
  }
  return FsyncDir(DirOf(path));
}

absl::Status FsyncDir(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0) return WriteFailed("open directory", dir, errno);
  if (::fsync(fd.get()) != 0 && errno != EINVAL && errno != EROFS) {
    return WriteFailed("fsync directory", dir, errno);
  }
  return absl::OkStatus();
}

std::string ExecutableDir() {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  const std::string exe(buf, static_cast<size_t>(n));
  return DirOf(exe);
}

}  // namespace kiln
