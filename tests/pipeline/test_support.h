// Helpers shared by the tests of the LibTorch-free pipeline pieces (and the artifact key test):
// a temporary folder removed at the end of the test, file I/O, and running a reference Python
// script from tests/pipeline/ with the project virtualenv. ctest sets KILN_SOURCE (repo root) and
// KILN_PYTHON (venv python); without them the Python-backed tests skip.
#pragma once

#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/files.h"

namespace kiln::testing {

// A fresh folder under $TMPDIR (or /tmp), removed with its contents on destruction.
class TempDir {
 public:
  TempDir() {
    const char* base = getenv("TMPDIR");
    std::string tmpl = absl::StrCat(base != nullptr && *base ? base : "/tmp", "/kiln_test_XXXXXX");
    if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    if (!path_.empty()) (void)kiln::RemoveTree(path_);  // not std::filesystem: common/files.h
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string Join(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

inline void WriteFileOrDie(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Paths from the ctest environment; empty when unset.
inline std::string EnvOrEmpty(const char* name) {
  const char* v = getenv(name);
  return v == nullptr ? "" : v;
}

inline bool HavePython() {
  return !EnvOrEmpty("KILN_PYTHON").empty() && !EnvOrEmpty("KILN_SOURCE").empty();
}

inline std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

// Runs $KILN_PYTHON $KILN_SOURCE/<script> args... with PYTHONPATH=$KILN_SOURCE/pipeline/python.
// Returns its combined stdout+stderr; Internal (with that output) when it exits non-zero. Scripts
// write their results to files named in `args`, so warnings on stderr do not matter.
inline absl::StatusOr<std::string> RunPython(const std::string& script,
                                             const std::vector<std::string>& args) {
  const std::string source = EnvOrEmpty("KILN_SOURCE");
  std::string cmd = absl::StrCat("PYTHONPATH=", ShellQuote(source + "/pipeline/python"), " ",
                                 ShellQuote(EnvOrEmpty("KILN_PYTHON")), " ",
                                 ShellQuote(source + "/" + script));
  for (const auto& a : args) absl::StrAppend(&cmd, " ", ShellQuote(a));
  absl::StrAppend(&cmd, " 2>&1");
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return absl::InternalError("popen failed: " + cmd);
  std::string output;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) output.append(buf, n);
  int rc = pclose(pipe);
  if (rc != 0) {
    return absl::InternalError(absl::StrCat(cmd, " exited with status ", rc, ":\n", output));
  }
  return output;
}

}  // namespace kiln::testing
