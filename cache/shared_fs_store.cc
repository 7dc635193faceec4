#include "cache/shared_fs_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "cache/held_lease.h"
#include "cache/package_dir.h"
#include "common/files.h"
#include "common/log.h"

namespace kiln::cache {
namespace fs = std::filesystem;
namespace {

constexpr char kLeasesDir[] = "leases";
constexpr char kRevokedFile[] = "revoked.txt";
// How long a takeover may hold a lease's break lock before another waiter may break that (ms).
constexpr int64_t kBreakLockMs = 30'000;

// NotFound if missing, DataLoss if not a lease document, other codes on I/O errors.
absl::StatusOr<LeaseInfo> ReadLeaseFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat("no lease ", path));
    return ErrnoStatus(errno, absl::StrCat("open ", path));
  }
  std::string text;
  char buf[4096];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      auto s = ErrnoStatus(errno, absl::StrCat("read ", path));
      ::close(fd);
      return s;
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::DataLossError(absl::StrCat("lease ", path, " is not JSON"));
  auto info = LeaseInfo::FromJson(j);
  if (!info.ok()) return absl::DataLossError(absl::StrCat(path, ": ", info.status().message()));
  return info;
}

// Writes `info` to a fresh temporary file in `dir` and fsyncs it; returns its path.
absl::StatusOr<std::string> WriteLeaseTemp(const std::string& dir, const LeaseInfo& info) {
  const std::string path = absl::StrCat(dir, "/.", info.digest, ".", RandomToken(), ".tmp");
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("create ", path));
  if (auto s = WriteAll(fd, info.ToJson().dump() + "\n", path); !s.ok()) {
    ::close(fd);
    ::unlink(path.c_str());
    return s;
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    auto s = ErrnoStatus(errno, absl::StrCat("fsync ", path));
    ::unlink(path.c_str());
    return s;
  }
  return path;
}

// Renames the lease at `path` aside and keeps it removed only if it carries `token` (the lease the
// caller judged); a successor that replaced it in between is put back. Returns true if the lease
// with `token` was removed, false if the file was gone or was another lease (its content then in
// *other, when readable).
absl::StatusOr<bool> RemoveLeaseIfToken(const std::string& path, const std::string& token,
                                        LeaseInfo* other) {
  const std::string aside = absl::StrCat(path, ".aside-", RandomToken());
  if (::rename(path.c_str(), aside.c_str()) != 0) {
    if (errno == ENOENT) return false;
    return ErrnoStatus(errno, absl::StrCat("rename ", path));
  }
  auto moved = ReadLeaseFile(aside);
  const std::string moved_token = moved.ok() ? moved->token : "";
  if (moved_token == token) {
    ::unlink(aside.c_str());
    return true;
  }
  if (moved.ok() && other != nullptr) *other = *moved;
  // Put the successor back. If yet another lease was created meanwhile (EEXIST), the successor
  // has lost its lease; it finds out on its next renewal.
  if (::link(aside.c_str(), path.c_str()) != 0 && errno != EEXIST) {
    kiln::LogError("cache", absl::StrCat("could not restore lease ", path, ": ",
                                         std::strerror(errno)));
  }
  ::unlink(aside.c_str());
  return false;
}

std::string DescribeLease(const LeaseInfo& l) {
  return absl::StrCat(l.holder, " (pid ", l.pid, " on ", l.host, ", expires at unix ms ",
                      l.expires_unix_ms, ")");
}

// A lease file in the store's leases directory, replaced by rename on every renewal.
class FsCompileLease : public HeldLease {
 public:
  FsCompileLease(std::string path, std::string dir, const Clock* clock, LeaseInfo info,
                 int64_t ttl_ms, bool took_over)
      : HeldLease(path, std::move(info), clock, ttl_ms, took_over),
        path_(std::move(path)),
        dir_(std::move(dir)) {}
  ~FsCompileLease() override { ReleaseOrLog(); }

 private:
  absl::Status RenewHeld(const LeaseInfo& info, int64_t new_expiry_unix_ms) override {
    if (clock().UnixMs() >= info.expires_unix_ms) {
      // A waiter may be replacing it right now; rewriting it could undo that takeover.
      return absl::AbortedError(absl::StrCat("lease for ", info.digest,
                                             " expired before it was renewed"));
    }
    auto cur = ReadLeaseFile(path_);
    if (absl::IsNotFound(cur.status()) || (cur.ok() && cur->token != info.token)) {
      return absl::AbortedError(absl::StrCat(
          "lease for ", info.digest, " was taken over",
          cur.ok() ? absl::StrCat(" by ", DescribeLease(*cur)) : std::string(" (lease file gone)")));
    }
    if (!cur.ok() && !absl::IsDataLoss(cur.status())) return cur.status();
    LeaseInfo next = info;
    next.expires_unix_ms = new_expiry_unix_ms;
    auto tmp = WriteLeaseTemp(dir_, next);
    if (!tmp.ok()) return tmp.status();
    if (::rename(tmp->c_str(), path_.c_str()) != 0) {
      auto s = ErrnoStatus(errno, absl::StrCat("rename ", *tmp, " to ", path_));
      ::unlink(tmp->c_str());
      return s;
    }
    return absl::OkStatus();
  }

  absl::Status ReleaseHeld(const LeaseInfo& info) override {
    return RemoveLeaseIfToken(path_, info.token, nullptr).status();
  }

  const std::string path_;
  const std::string dir_;
};

}  // namespace

nlohmann::json LeaseInfo::ToJson() const {
  return {{"digest", digest}, {"holder", holder}, {"pid", pid},
          {"host", host},     {"expires_unix_ms", expires_unix_ms}, {"token", token}};
}

absl::StatusOr<LeaseInfo> LeaseInfo::FromJson(const nlohmann::json& j) {
  LeaseInfo l;
  try {
    l.digest = j.at("digest").get<std::string>();
    l.holder = j.at("holder").get<std::string>();
    l.pid = j.at("pid").get<int64_t>();
    l.host = j.at("host").get<std::string>();
    l.expires_unix_ms = j.at("expires_unix_ms").get<int64_t>();
    l.token = j.at("token").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("lease: ", e.what()));
  }
  return l;
}

absl::Status SharedFsStoreOptions::Validate() const {
  if (root.empty()) return absl::InvalidArgumentError("shared store: root is empty");
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SharedFsStore>> SharedFsStore::Open(SharedFsStoreOptions options) {
  if (auto s = options.Validate(); !s.ok()) return s;
  std::error_code ec;
  fs::create_directories(absl::StrCat(options.root, "/", kLeasesDir), ec);
  if (ec) return ErrnoStatus(ec.value(), absl::StrCat("shared store: create ", options.root));
  return std::unique_ptr<SharedFsStore>(new SharedFsStore(std::move(options)));
}

SharedFsStore::SharedFsStore(SharedFsStoreOptions options)
    : root_(std::move(options.root)),
      leases_dir_(absl::StrCat(root_, "/", kLeasesDir)),
      host_(options.host.empty() ? HostName() : std::move(options.host)),
      clock_(options.clock) {
  if (clock_ == nullptr) {
    owned_clock_ = std::make_unique<SystemClock>();
    clock_ = owned_clock_.get();
  }
}

std::string SharedFsStore::Describe() const { return absl::StrCat("shared filesystem ", root_); }

std::string SharedFsStore::LeasePath(const std::string& digest) const {
  return absl::StrCat(leases_dir_, "/", digest, ".lease");
}

absl::StatusOr<bool> SharedFsStore::Has(const std::string& digest) const {
  struct stat st;
  const std::string manifest = absl::StrCat(DirFor(digest), "/", kManifestFile);
  if (::stat(manifest.c_str(), &st) == 0) return true;
  if (errno == ENOENT || errno == ENOTDIR) return false;
  return ErrnoStatus(errno, absl::StrCat("shared store: stat ", manifest));
}

absl::StatusOr<FetchResult> SharedFsStore::Fetch(const ArtifactKey& key, LocalDiskStore& local) {
  const std::string digest = key.Digest();
  const std::string dir = DirFor(digest);
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat("no package for ", key.component, " (", digest,
                                              ") in ", Describe()));
    }
    return ErrnoStatus(errno, absl::StrCat("shared store: stat ", dir));
  }
  auto inserted = local.Insert(key, dir);
  if (inserted.ok()) return FetchResult{std::move(inserted->package), inserted->bytes};
  if (!absl::IsDataLoss(inserted.status())) return inserted.status();
  // What we copied is what the store holds (entries are immutable): the stored copy is corrupt.
  const std::string reason(inserted.status().message());
  auto q = QuarantinePackageDir(root_, digest, reason);
  return absl::DataLossError(absl::StrCat(
      "shared copy ", dir, " is corrupt (", reason, ")",
      q.ok() ? absl::StrCat("; quarantined to ", *q)
             : absl::IsNotFound(q.status()) ? std::string("; already quarantined by another node")
                                            : absl::StrCat("; quarantine failed: ",
                                                           q.status().message())));
}

absl::Status SharedFsStore::Publish(const LocatedPackage& package) {
  const std::string& digest = package.manifest.digest;
  auto has = Has(digest);
  if (!has.ok()) return has.status();
  if (*has) return absl::OkStatus();
  auto staged = StageCopy(package.dir, root_, digest);
  if (!staged.ok()) return staged.status();
  // Read back what landed on the shared filesystem before anyone else can see it.
  auto verified = VerifyPackageDir(staged->path, package.manifest.key);
  if (!verified.ok()) {
    RemoveTree(staged->path);
    if (absl::IsDataLoss(verified.status())) {
      return absl::DataLossError(absl::StrCat("copy of ", package.dir, " in ", Describe(),
                                              " failed verification: ",
                                              verified.status().message()));
    }
    return verified.status();
  }
  auto published = PublishStaged(staged->path, root_, digest);
  if (!published.ok()) return published.status();
  if (*published) {
    kiln::LogInfo("cache", absl::StrCat("published package ", digest, " (", staged->bytes,
                                        " bytes) to ", Describe()));
  }
  return absl::OkStatus();
}

absl::StatusOr<Revocations> SharedFsStore::ReadRevocations() const {
  const std::string path = absl::StrCat(root_, "/", kRevokedFile);
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno == ENOENT) return Revocations{};
    return ErrnoStatus(errno, absl::StrCat("shared store: open ", path));
  }
  std::string text;
  char buf[65536];
  while (true) {
    const ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoStatus(errno, absl::StrCat("shared store: read ", path));
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  auto parsed = Revocations::Parse(text);
  if (!parsed.ok()) {
    return absl::DataLossError(absl::StrCat(path, ": ", parsed.status().message()));
  }
  return parsed;
}

absl::Status SharedFsStore::AddRevocation(const std::string& entry) {
  if (auto s = Revocations::CheckEntry(entry); !s.ok()) return s;
  const std::string path = absl::StrCat(root_, "/", kRevokedFile);
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
  if (fd.get() < 0) return ErrnoStatus(errno, absl::StrCat("open ", path));
  // One write() of a short line with O_APPEND: concurrent writers never interleave.
  if (auto s = WriteAll(fd.get(), entry + "\n", path); !s.ok()) return s;
  if (::fsync(fd.get()) != 0) return ErrnoStatus(errno, absl::StrCat("fsync ", path));
  return absl::OkStatus();
}

absl::Status SharedFsStore::Quarantine(const std::string& digest, const std::string& reason) {
  auto q = QuarantinePackageDir(root_, digest, reason);
  return q.ok() ? absl::OkStatus() : q.status();
}

absl::StatusOr<LeaseInfo> SharedFsStore::ReadLease(const std::string& digest) const {
  return ReadLeaseFile(LeasePath(digest));
}

absl::StatusOr<std::unique_ptr<CompileLease>> SharedFsStore::TryAcquireLease(
    const std::string& digest, const LeaseRequest& request) {
  if (auto s = CheckLeaseRequest(digest, request); !s.ok()) return s;
  std::error_code ec;
  fs::create_directories(leases_dir_, ec);
  if (ec) return ErrnoStatus(ec.value(), absl::StrCat("shared store: create ", leases_dir_));
  const std::string path = LeasePath(digest);
  for (int attempt = 0; attempt < 4; ++attempt) {
    LeaseInfo info{digest, request.holder, static_cast<int64_t>(::getpid()), host_,
                   clock_->UnixMs() + request.ttl_ms, RandomToken()};
    auto tmp = WriteLeaseTemp(leases_dir_, info);
    if (!tmp.ok()) return tmp.status();
    const int rc = ::link(tmp->c_str(), path.c_str());
    const int err = errno;
    if (rc == 0) {
      ::unlink(tmp->c_str());
      (void)FsyncDir(leases_dir_);  // best effort; the link itself is atomic
      return std::unique_ptr<CompileLease>(std::make_unique<FsCompileLease>(
          path, leases_dir_, clock_, std::move(info), request.ttl_ms, /*took_over=*/false));
    }
    if (err != EEXIST) {
      ::unlink(tmp->c_str());
      return ErrnoStatus(err, absl::StrCat("link lease ", path));
    }
    auto cur = ReadLeaseFile(path);
    if (absl::IsNotFound(cur.status())) {  // released meanwhile: try again
      ::unlink(tmp->c_str());
      continue;
    }
    if ((!cur.ok() && !absl::IsDataLoss(cur.status())) ||
        (cur.ok() && cur->expires_unix_ms > clock_->UnixMs())) {
      ::unlink(tmp->c_str());
      if (!cur.ok()) return cur.status();
      return absl::AlreadyExistsError(
          absl::StrCat("compile lease for ", digest, " is held by ", DescribeLease(*cur)));
    }
    // Expired (or not a lease document at all): replace it with ours.
    auto replaced = ReplaceExpiredLease(path, cur.ok() ? cur->token : "", *tmp, request.holder);
    if (!replaced.ok()) return replaced.status();
    if (*replaced) {
      (void)FsyncDir(leases_dir_);
      kiln::LogWarning("cache", absl::StrCat("took over expired compile lease for ",
                                             digest.substr(0, 12), " of ",
                                             cur.ok() ? DescribeLease(*cur)
                                                      : std::string("an unreadable lease file")));
      return std::unique_ptr<CompileLease>(std::make_unique<FsCompileLease>(
          path, leases_dir_, clock_, std::move(info), request.ttl_ms, /*took_over=*/true));
    }
    // The lease changed hands meanwhile: look again.
  }
  return absl::AlreadyExistsError(
      absl::StrCat("compile lease for ", digest, " is contended; try again"));
}

absl::StatusOr<bool> SharedFsStore::ReplaceExpiredLease(const std::string& path,
                                                        const std::string& stale_token,
                                                        const std::string& new_lease,
                                                        const std::string& holder) {
  // The break lock: one breaker at a time per lease, itself a lease (link-created, expiring) so a
  // breaker that dies in here blocks takeovers for kBreakLockMs at most.
  const std::string break_path = absl::StrCat(path, ".break");
  LeaseInfo lock{"", holder, static_cast<int64_t>(::getpid()), host_,
                 clock_->UnixMs() + kBreakLockMs, RandomToken()};
  auto discard = [&] { ::unlink(new_lease.c_str()); };
  auto lock_tmp = WriteLeaseTemp(leases_dir_, lock);
  if (!lock_tmp.ok()) {
    discard();
    return lock_tmp.status();
  }
  bool locked = false;
  for (int attempt = 0; attempt < 2 && !locked; ++attempt) {
    if (::link(lock_tmp->c_str(), break_path.c_str()) == 0) {
      locked = true;
      break;
    }
    if (errno != EEXIST) {
      auto s = ErrnoStatus(errno, absl::StrCat("link ", break_path));
      ::unlink(lock_tmp->c_str());
      discard();
      return s;
    }
    auto other = ReadLeaseFile(break_path);
    if (absl::IsNotFound(other.status())) continue;
    if (other.ok() && other->expires_unix_ms > clock_->UnixMs()) {
      ::unlink(lock_tmp->c_str());
      discard();
      return absl::AlreadyExistsError(absl::StrCat("compile lease ", path,
                                                   " is being taken over by ",
                                                   DescribeLease(*other)));
    }
    // A breaker died holding the break lock: remove exactly that lock and try once more.
    auto removed = RemoveLeaseIfToken(break_path, other.ok() ? other->token : "", nullptr);
    if (!removed.ok()) {
      ::unlink(lock_tmp->c_str());
      discard();
      return removed.status();
    }
  }
  ::unlink(lock_tmp->c_str());
  if (!locked) {
    discard();
    return false;
  }
  // Holding the break lock, no other breaker can act; the file may still have changed before we
  // took it (another breaker finished, or the holder released), so judge it again.
  bool replaced = false;
  absl::Status status = absl::OkStatus();
  auto cur = ReadLeaseFile(path);
  const bool same = cur.ok() ? (cur->token == stale_token &&
                                cur->expires_unix_ms <= clock_->UnixMs())
                             : (absl::IsDataLoss(cur.status()) && stale_token.empty());
  if (same) {
    // rename() replaces atomically: the lease name never disappears, so no third node can
    // create a lease in between, and the breaker is the one that holds it.
    if (::rename(new_lease.c_str(), path.c_str()) == 0) {
      replaced = true;
    } else {
      status = ErrnoStatus(errno, absl::StrCat("rename ", new_lease, " to ", path));
    }
  }
  if (!replaced) discard();
  if (auto r = RemoveLeaseIfToken(break_path, lock.token, nullptr); !r.ok()) {
    kiln::LogWarning("cache", absl::StrCat("removing break lock ", break_path, ": ",
                                           r.status().ToString()));
  }
  if (!status.ok()) return status;
  return replaced;
}

}  // namespace kiln::cache
