#include "cache/local_disk_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cache/package_dir.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "common/log.h"

namespace kiln::cache {
namespace fs = std::filesystem;
namespace {

constexpr char kLastUsedDir[] = ".last_used";
constexpr char kTrashPrefix[] = ".trash-";
// Staging directories older than this are debris from a crashed copy or compile. Generous: a
// max-autotune compile stages its output for as long as it runs.
constexpr int64_t kStagingMaxAgeSeconds = 24 * 3600;

int64_t MtimeMs(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return -1;
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000 + st.st_mtim.tv_nsec / 1'000'000;
}

std::vector<std::string> ListNames(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
      out.emplace_back(e->d_name);
    }
  }
  ::closedir(d);
  return out;
}

}  // namespace

absl::Status LocalDiskStoreOptions::Validate() const {
  if (root.empty()) return absl::InvalidArgumentError("local store: root is empty");
  if (max_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("local store: max_bytes ", max_bytes, " is negative (0 = unbounded)"));
  }
  return absl::OkStatus();
}

PackagePin::~PackagePin() { store_->Unpin(digest_); }

absl::StatusOr<std::unique_ptr<LocalDiskStore>> LocalDiskStore::Open(
    LocalDiskStoreOptions options, prometheus::Registry* registry) {
  if (auto s = options.Validate(); !s.ok()) return s;
  std::error_code ec;
  fs::create_directories(options.root, ec);
  if (ec) return ErrnoStatus(ec.value(), absl::StrCat("local store: create ", options.root));
  return std::unique_ptr<LocalDiskStore>(new LocalDiskStore(std::move(options), registry));
}

LocalDiskStore::LocalDiskStore(std::string root)
    : LocalDiskStore(LocalDiskStoreOptions{std::move(root), 0, nullptr}, nullptr) {}

LocalDiskStore::LocalDiskStore(LocalDiskStoreOptions options, prometheus::Registry* registry)
    : root_(std::move(options.root)), max_bytes_(options.max_bytes), clock_(options.clock) {
  if (clock_ == nullptr) {
    owned_clock_ = std::make_unique<SystemClock>();
    clock_ = owned_clock_.get();
  }
  if (registry != nullptr) {
    evictions_ = &prometheus::BuildCounter()
                      .Name("kiln_artifact_evictions_total")
                      .Help("Packages evicted from the node-local disk to respect its size bound")
                      .Register(*registry)
                      .Add({});
    bytes_gauge_ = &prometheus::BuildGauge()
                        .Name("kiln_artifact_local_bytes")
                        .Help("Bytes of packages (and quarantined copies) on the node-local disk")
                        .Register(*registry)
                        .Add({});
  }
}

LocalDiskStore::~LocalDiskStore() = default;

absl::StatusOr<LocatedPackage> LocalDiskStore::Find(const ArtifactKey& key) const {
  const std::string digest = key.Digest();
  const std::string dir = DirFor(digest);
  auto verified = VerifyPackageDir(dir, key);
  if (verified.ok()) {
    MarkUsed(digest);
    return verified;
  }
  if (absl::IsNotFound(verified.status())) {
    return absl::NotFoundError(
        absl::StrCat("no package for ", key.component, " (", digest, ") in ", root_));
  }
  if (!absl::IsDataLoss(verified.status())) return verified.status();
  const std::string reason(verified.status().message());
  auto q = QuarantinePackageDir(root_, digest, reason);
  return absl::DataLossError(absl::StrCat("package ", dir, " is corrupt (", reason, ")",
                                          q.ok() ? "; quarantined" : "; quarantine failed: ",
                                          q.ok() ? "" : q.status().message()));
}

absl::StatusOr<InsertResult> LocalDiskStore::Insert(const ArtifactKey& key,
                                                   const std::string& source_dir) {
  const std::string digest = key.Digest();
  // Two rounds: an existing entry that turns out corrupt is quarantined and replaced once.
  for (int round = 0; round < 2; ++round) {
    auto staged = StageCopy(source_dir, root_, digest);
    if (!staged.ok()) return staged.status();
    auto verified = VerifyPackageDir(staged->path, key);
    if (!verified.ok()) {
      RemoveTree(staged->path);
      if (absl::IsDataLoss(verified.status())) {
        return absl::DataLossError(absl::StrCat("copy of ", source_dir,
                                                " is corrupt: ", verified.status().message()));
      }
      return verified.status();
    }
    auto published = PublishStaged(staged->path, root_, digest);
    if (!published.ok()) return published.status();
    InsertResult result;
    if (*published) {
      result.package = RelocatePackage(*verified, DirFor(digest));
      result.bytes = staged->bytes;
    } else {
      auto existing = Find(key);
      if (absl::IsDataLoss(existing.status())) continue;  // quarantined by Find; copy again
      if (!existing.ok()) return existing.status();
      result.package = *std::move(existing);
    }
    MarkUsed(digest);
    EnforceBound(digest);
    return result;
  }
  return absl::AbortedError(
      absl::StrCat("local store ", root_, ": entry for ", digest, " kept turning up corrupt"));
}

void LocalDiskStore::Admit(const std::string& digest) {
  MarkUsed(digest);
  EnforceBound(digest);
}

std::unique_ptr<PackagePin> LocalDiskStore::Pin(const std::string& digest) {
  absl::MutexLock l(&mu_);
  ++pins_[digest];
  return std::unique_ptr<PackagePin>(new PackagePin(this, digest));
}

void LocalDiskStore::Unpin(const std::string& digest) {
  absl::MutexLock l(&mu_);
  auto it = pins_.find(digest);
  if (it != pins_.end() && --it->second <= 0) pins_.erase(it);
}

bool LocalDiskStore::IsPinned(const std::string& digest) const {
  absl::MutexLock l(&mu_);
  return pins_.count(digest) > 0;
}

void LocalDiskStore::MarkUsed(const std::string& digest) const {
  // An unbounded store evicts nothing, so it keeps no bookkeeping: its root holds exactly what
  // kiln-compile writes (tools and tests list it).
  if (max_bytes_ == 0) return;
  // Bookkeeping only: a failure here costs LRU accuracy, never a lookup.
  const std::string dir = absl::StrCat(root_, "/", kLastUsedDir);
  ::mkdir(dir.c_str(), 0755);
  const std::string path = absl::StrCat(dir, "/", digest);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return;
  const int64_t ms = clock_->UnixMs();
  struct timespec times[2];
  times[0].tv_sec = times[1].tv_sec = static_cast<time_t>(ms / 1000);
  times[0].tv_nsec = times[1].tv_nsec = static_cast<long>((ms % 1000) * 1'000'000);
  ::futimens(fd, times);
  ::close(fd);
}

int64_t LocalDiskStore::LastUsedMs(const std::string& digest) const {
  int64_t ms = MtimeMs(absl::StrCat(root_, "/", kLastUsedDir, "/", digest));
  return ms >= 0 ? ms : MtimeMs(DirFor(digest));
}

std::vector<std::string> LocalDiskStore::List() const {
  std::vector<std::pair<int64_t, std::string>> entries;
  for (auto& name : ListNames(root_)) {
    if (IsDigest(name)) entries.emplace_back(LastUsedMs(name), name);
  }
  std::sort(entries.begin(), entries.end());
  std::vector<std::string> out;
  for (auto& e : entries) out.push_back(std::move(e.second));
  return out;
}

int64_t LocalDiskStore::BytesUsed() const {
  int64_t total = 0;
  for (const auto& name : ListNames(root_)) {
    if (IsDigest(name)) total += DirBytes(DirFor(name));
  }
  const std::string qdir = absl::StrCat(root_, "/", kQuarantineDir);
  for (const auto& name : ListNames(qdir)) total += DirBytes(absl::StrCat(qdir, "/", name));
  return total;
}

void LocalDiskStore::SweepStaging() const {
  const int64_t now_ms = static_cast<int64_t>(std::time(nullptr)) * 1000;
  for (const auto& name : ListNames(root_)) {
    const std::string path = absl::StrCat(root_, "/", name);
    if (absl::StartsWith(name, kTrashPrefix)) {
      RemoveTree(path);  // an eviction that crashed between rename and removal
    } else if (absl::StartsWith(name, kStagingPrefix)) {
      const int64_t m = MtimeMs(path);
      if (m >= 0 && now_ms - m > kStagingMaxAgeSeconds * 1000) RemoveTree(path);
    }
  }
}

void LocalDiskStore::EnforceBound(const std::string& keep) {
  absl::MutexLock evict_lock(&evict_mu_);
  SweepStaging();
  struct Entry {
    int64_t last_used_ms;
    std::string name;
    std::string path;
    int64_t bytes;
    bool quarantined;
  };
  std::vector<Entry> entries;
  int64_t total = 0;
  for (auto& name : ListNames(root_)) {
    if (!IsDigest(name)) continue;
    Entry e{LastUsedMs(name), name, DirFor(name), DirBytes(DirFor(name)), false};
    total += e.bytes;
    entries.push_back(std::move(e));
  }
  const std::string qdir = absl::StrCat(root_, "/", kQuarantineDir);
  for (auto& name : ListNames(qdir)) {
    const std::string path = absl::StrCat(qdir, "/", name);
    Entry e{MtimeMs(path), name, path, DirBytes(path), true};
    total += e.bytes;
    entries.push_back(std::move(e));
  }
  if (max_bytes_ > 0 && total > max_bytes_) {
    // Quarantined copies go first (kept only for inspection), then packages by last use.
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
      if (a.quarantined != b.quarantined) return a.quarantined;
      return a.last_used_ms < b.last_used_ms;
    });
    for (const Entry& e : entries) {
      if (total <= max_bytes_) break;
      if (e.quarantined) {
        RemoveTree(e.path);
        total -= e.bytes;
        continue;
      }
      if (e.name == keep) continue;
      const std::string trash = absl::StrCat(root_, "/", kTrashPrefix, e.name, "-", RandomToken(4));
      {
        // Pin check and rename under one lock: a Pin() either lands first (entry kept) or finds
        // the entry gone (a plain miss for that caller).
        absl::MutexLock l(&mu_);
        if (pins_.count(e.name)) continue;
        if (::rename(e.path.c_str(), trash.c_str()) != 0) continue;  // gone already
      }
      RemoveTree(trash);
      ::unlink(absl::StrCat(root_, "/", kLastUsedDir, "/", e.name).c_str());
      total -= e.bytes;
      if (evictions_ != nullptr) evictions_->Increment();
      kiln::LogInfo("cache", absl::StrCat("evicted package ", e.name, " (", e.bytes,
                                          " bytes) from ", root_, " to stay under ", max_bytes_,
                                          " bytes"));
    }
    if (total > max_bytes_) {
      kiln::LogWarning("cache", absl::StrCat("local store ", root_, " holds ", total,
                                             " bytes of pinned or just-added packages, over its",
                                             " bound of ", max_bytes_));
    }
  }
  if (bytes_gauge_ != nullptr) bytes_gauge_->Set(static_cast<double>(total));
}

}  // namespace kiln::cache
