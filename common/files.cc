#include "common/files.h"

#include <ftw.h>
#include <unistd.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/str_cat.h"

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

}  // namespace kiln
