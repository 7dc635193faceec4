// File-system helpers that must not go through std::filesystem in processes that link the CUDA
// LibTorch wheel: that wheel exports its own copy of std::filesystem::remove_all, and calls bound
// to it crashed (null function pointer, seen on the GPU test host with torch 2.11+cu130).
#pragma once

#include <string>

#include "absl/status/status.h"

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

}  // namespace kiln
