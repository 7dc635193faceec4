// Helpers shared by the libFuzzer targets of tests/fuzz (see README.md there): splitting one
// input into several files, in-memory files with a path (memfd), a per-process scratch folder,
// and the op stream that drives the coordinator and node message fuzzers.
//
// A finding must stop the fuzzer: FUZZ_CHECK aborts (libFuzzer saves the input as a crash).
#pragma once

#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#define FUZZ_CHECK(cond)                                                          \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                               \
    }                                                                             \
  } while (0)

namespace kiln::fuzz {

// The separator of the files packed into one input (tokenizer loaders): a line "--8<--".
inline constexpr std::string_view kFileSeparator = "\n--8<--\n";

// `data` cut at each separator into exactly `n` parts (missing parts are empty; the last part
// keeps any further separators).
inline std::vector<std::string> SplitFiles(std::string_view data, size_t n) {
  std::vector<std::string> parts;
  while (parts.size() + 1 < n) {
    const size_t at = data.find(kFileSeparator);
    if (at == std::string_view::npos) break;
    parts.emplace_back(data.substr(0, at));
    data.remove_prefix(at + kFileSeparator.size());
  }
  parts.emplace_back(data);
  parts.resize(n);
  return parts;
}

// A file that lives in memory (memfd_create) and has a path (/proc/self/fd/N), for readers that
// take a path. Rewritten for each input; one per target.
class MemFile {
 public:
  MemFile() : fd_(memfd_create("kiln-fuzz", 0)) { FUZZ_CHECK(fd_ >= 0); }
  ~MemFile() { close(fd_); }
  // Replaces the contents with `bytes`; returns the path.
  const std::string& Write(std::string_view bytes) {
    FUZZ_CHECK(ftruncate(fd_, 0) == 0);
    FUZZ_CHECK(pwrite(fd_, bytes.data(), bytes.size(), 0) == static_cast<ssize_t>(bytes.size()));
    path_ = "/proc/self/fd/" + std::to_string(fd_);
    return path_;
  }

 private:
  int fd_;
  std::string path_;
};

// A scratch folder for this process (under $TMPDIR, left behind for inspection: the fuzzer
// rewrites the same few files in it).
inline const std::string& ScratchDir() {
  static const std::string dir = [] {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/kiln-fuzz-XXXXXX";
    FUZZ_CHECK(mkdtemp(pattern.data()) != nullptr);
    return pattern;
  }();
  return dir;
}

// Files with fixed names in one folder (ScratchDir()/files) whose contents live in memory: each
// name is a symbolic link, made once, to a MemFile, so rewriting them for every input costs no
// disk I/O (rewriting three real files per input on ext4 made the tokenizer loader targets
// ~17x slower in wall time than on tmpfs). For loaders that take a folder.
class MemDir {
 public:
  explicit MemDir(const std::vector<std::string>& names) : path_(ScratchDir() + "/files") {
    FUZZ_CHECK(mkdir(path_.c_str(), 0700) == 0 || errno == EEXIST);
    for (const std::string& name : names) {
      auto& file = files_.emplace_back(name, std::make_unique<MemFile>());
      const std::string link = path_ + "/" + name;
      (void)unlink(link.c_str());
      FUZZ_CHECK(symlink(file.second->Write("").c_str(), link.c_str()) == 0);
    }
  }
  const std::string& path() const { return path_; }
  // Replaces the contents of `name` (one of those given to the constructor).
  void Write(const std::string& name, std::string_view bytes) {
    for (auto& [n, file] : files_) {
      if (n == name) {
        file->Write(bytes);
        return;
      }
    }
    FUZZ_CHECK(!"MemDir::Write: unknown name");
  }

 private:
  std::string path_;
  std::vector<std::pair<std::string, std::unique_ptr<MemFile>>> files_;
};

// The data folder of the encoder targets (tokenizers made by kiln.tokenizer_files):
// $KILN_FUZZ_DATA, written by tests/fuzz/run.sh. Aborts with a message when unset.
inline std::string DataDir() {
  const char* dir = std::getenv("KILN_FUZZ_DATA");
  if (dir == nullptr || *dir == '\0') {
    std::fprintf(stderr, "KILN_FUZZ_DATA is not set: run this target through tests/fuzz/run.sh\n");
    std::abort();
  }
  return dir;
}

// The op stream of the message-handling targets: a sequence of records
//   op (1 byte) | length (2 bytes, little-endian) | payload (length bytes)
// where op's low 2 bits say what to do (see each target) and its high bits pick a peer. A record
// cut short ends the stream (its payload is what is left).
struct Op {
  uint8_t op = 0;
  std::string_view payload;
};

class OpReader {
 public:
  OpReader(const uint8_t* data, size_t size)
      : data_(reinterpret_cast<const char*>(data), size) {}
  bool Next(Op* out) {
    if (data_.empty()) return false;
    out->op = static_cast<uint8_t>(data_[0]);
    size_t len = 0;
    if (data_.size() >= 3) {
      len = static_cast<uint8_t>(data_[1]) | static_cast<size_t>(static_cast<uint8_t>(data_[2])) << 8;
      data_.remove_prefix(3);
    } else {
      data_.remove_prefix(data_.size());
    }
    len = std::min(len, data_.size());
    out->payload = data_.substr(0, len);
    data_.remove_prefix(len);
    return true;
  }

 private:
  std::string_view data_;
};

// One record of the op stream (what the seed writer emits).
inline std::string OpRecord(uint8_t op, std::string_view payload) {
  std::string out(1, static_cast<char>(op));
  out.push_back(static_cast<char>(payload.size() & 0xff));
  out.push_back(static_cast<char>(payload.size() >> 8 & 0xff));
  out.append(payload);
  return out;
}

}  // namespace kiln::fuzz
