// File-system helpers, written on POSIX calls rather than std::filesystem: processes that link
// the CUDA LibTorch wheel get that wheel's own copy of std::filesystem::remove_all, and calls
// bound to it crashed (null function pointer, seen on the GPU test host with torch 2.11+cu130).
// Thread-safe (no state).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kiln {

// Owns a file descriptor; closes it on scope exit.
class UniqueFd {
 public:
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd();
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const { return fd_; }
  // Closes now and returns close()'s result (NFS reports write errors there).
  int Close();

 private:
  int fd_;
};

// Removes `path` and everything under it (files, directories, symlinks themselves, never their
// targets). A missing path is OK. Internal naming the first entry that could not be removed.
absl::Status RemoveTree(const std::string& path);

// Replaces `path` with `contents` so that a reader (or a crash) sees either the old file or the
// whole new one, and the new one survives a power loss once this returns: writes a temporary
// file beside `path`, fsyncs it, renames it over `path`, fsyncs the directory. The temporary file
// is removed on failure. `mode`: permissions of a new file (less the umask). When a step fails,
// `path` is unchanged and the status has errno's code (NotFound for a missing directory,
// PermissionDenied, ResourceExhausted for a full disk, ...) and names the step and the path.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents,
                                 int mode = 0644);

// fsync of a directory, so that renames and creations in it are durable. Filesystems that refuse
// fsync on a directory (EINVAL, EROFS; some NFS clients) count as OK: the rename is still atomic.
absl::Status FsyncDir(const std::string& dir);

// The directory holding the running executable (from /proc/self/exe), "." if it cannot be read.
// Executables find their siblings with it (kiln-compile beside kiln-node).
std::string ExecutableDir();

}  // namespace kiln
