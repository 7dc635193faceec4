// Helpers for the cache tests: artifact keys, fake packages in the layout kiln-compile writes
// (model.pt2 bytes + manifest.json with the right digest and SHA-256; not a real AOTI package),
// a fake PackageCompiler that writes one and counts its calls (in memory and, for tests spanning
// processes, in a counter file), and readers for metric values in a prometheus::Registry.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cache/artifact_key.h"
#include "cache/compiler.h"
#include "cache/package_dir.h"
#include "common/hash.h"
#include "nlohmann/json.hpp"
#include "prometheus/registry.h"
#include "tests/pipeline/test_support.h"

namespace kiln::cache::testing {

// A valid key; `height` tells keys apart.
inline ArtifactKey MakeKey(int height = 64) {
  ArtifactKey k;
  k.architecture = Sha256Hex("fake architecture");
  k.component = "transformer";
  k.precision = "bf16";
  k.bucket = Bucket{1, height, 64, 32};
  k.compile = CompileOptionsDigest(DefaultCompileOptions());
  k.target = "cuda:sm_90";
  k.toolchain = Toolchain{"2.13.0", "12.8", "3.4.0", BuildKilnRevision()};
  return k;
}

// Package bytes, different per key.
inline std::string FakePackageBytes(const ArtifactKey& key, int64_t size) {
  std::string seed = key.Digest();
  std::string out;
  out.reserve(static_cast<size_t>(size));
  while (static_cast<int64_t>(out.size()) < size) out += seed;
  out.resize(static_cast<size_t>(size));
  return out;
}

inline nlohmann::json FakeManifest(const ArtifactKey& key, const std::string& package_bytes) {
  return {{"format", 1},
          {"digest", key.Digest()},
          {"key", key.ToJson()},
          {"package",
           {{"file", "model.pt2"},
            {"sha256", Sha256Hex(package_bytes)},
            {"bytes", static_cast<int64_t>(package_bytes.size())}}},
          {"extra_constants", ""},
          {"constants", nlohmann::json::object()},
          {"inputs", nlohmann::json::array()},
          {"outputs", nlohmann::json::array()},
          {"compile_seconds", 0.1},
          {"built_by", "fake-compiler"},
          {"built_at", "2025-01-01T00:00:00+00:00"}};
}

// Writes a package directory for `key` into `dir` (created; not atomic: for fixtures).
inline void WriteFakePackageDir(const std::string& dir, const ArtifactKey& key,
                                int64_t size = 1000) {
  std::filesystem::create_directories(dir);
  const std::string bytes = FakePackageBytes(key, size);
  kiln::testing::WriteFileOrDie(dir + "/model.pt2", bytes);
  kiln::testing::WriteFileOrDie(dir + "/manifest.json", FakeManifest(key, bytes).dump(1));
}

// Publishes a package for `key` under ROOT/<digest> the way kiln-compile does (temp dir, rename).
inline void PublishFakePackage(const std::string& root, const ArtifactKey& key,
                               int64_t size = 1000) {
  const std::string tmp = absl::StrCat(root, "/.tmp-", key.Digest().substr(0, 12), "-",
                                       RandomToken());
  WriteFakePackageDir(tmp, key, size);
  std::error_code ec;
  std::filesystem::rename(tmp, root + "/" + key.Digest(), ec);
  if (ec) std::filesystem::remove_all(tmp, ec);  // someone published first
}

// Flips one byte of `path` (a package file) in place.
inline void CorruptFile(const std::string& path, size_t offset = 10) {
  std::string bytes = kiln::testing::ReadFileOrDie(path);
  bytes[offset % bytes.size()] ^= 0x5a;
  kiln::testing::WriteFileOrDie(path, bytes);
}

// A PackageCompiler that writes a fake package after `delay` and counts its calls.
class FakeCompiler : public PackageCompiler {
 public:
  struct Options {
    int64_t package_bytes = 1000;
    std::chrono::milliseconds delay{0};
    std::string counter_file;  // if set, one byte is appended per call (O_APPEND: across processes)
    absl::Status fail = absl::OkStatus();  // returned instead of compiling when not OK
    bool write_corrupt = false;            // publish a package whose bytes do not match
  };
  FakeCompiler() = default;
  explicit FakeCompiler(Options o) : o_(std::move(o)) {}

  absl::Status Compile(const CompileRequest& r) override {
    ++calls_;
    if (!o_.counter_file.empty()) {
      int fd = ::open(o_.counter_file.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        (void)!::write(fd, "c", 1);
        ::close(fd);
      }
    }
    if (o_.delay.count() > 0) std::this_thread::sleep_for(o_.delay);
    if (!o_.fail.ok()) return o_.fail;
    PublishFakePackage(r.out_root, r.key, o_.package_bytes);
    if (o_.write_corrupt) CorruptFile(r.out_root + "/" + r.key.Digest() + "/model.pt2");
    return absl::OkStatus();
  }
  int calls() const { return calls_.load(); }

 private:
  Options o_;
  std::atomic<int> calls_{0};
};

inline int64_t FileSize(const std::string& path) {
  std::error_code ec;
  auto n = std::filesystem::file_size(path, ec);
  return ec ? 0 : static_cast<int64_t>(n);
}

inline int CountEntries(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::exists(dir, ec)) return 0;
  int n = 0;
  for (auto it = std::filesystem::directory_iterator(dir, ec);
       !ec && it != std::filesystem::directory_iterator(); ++it) {
    ++n;
  }
  return n;
}

// The metric `name` with exactly `labels`, or nullptr.
inline const prometheus::ClientMetric* FindMetric(
    const std::vector<prometheus::MetricFamily>& families, const std::string& name,
    const std::map<std::string, std::string>& labels) {
  for (const auto& f : families) {
    if (f.name != name) continue;
    for (const auto& m : f.metric) {
      std::map<std::string, std::string> have;
      for (const auto& l : m.label) have[l.name] = l.value;
      if (have == labels) return &m;
    }
  }
  return nullptr;
}

inline double CounterValue(prometheus::Registry& registry, const std::string& name,
                           const std::map<std::string, std::string>& labels = {}) {
  auto families = registry.Collect();
  const auto* m = FindMetric(families, name, labels);
  return m == nullptr ? -1 : m->counter.value;
}

inline double GaugeValue(prometheus::Registry& registry, const std::string& name) {
  auto families = registry.Collect();
  const auto* m = FindMetric(families, name, {});
  return m == nullptr ? -1 : m->gauge.value;
}

inline int64_t HistogramCount(prometheus::Registry& registry, const std::string& name) {
  auto families = registry.Collect();
  const auto* m = FindMetric(families, name, {});
  return m == nullptr ? -1 : static_cast<int64_t>(m->histogram.sample_count);
}

}  // namespace kiln::cache::testing
