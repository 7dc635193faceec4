#include "cache/package_dir.h"

#include "common/files.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/clock.h"
#include "common/hash.h"
#include "common/log.h"

namespace kiln::cache {
namespace fs = std::filesystem;
absl::Status ErrnoStatus(int err, const std::string& what) {
  const std::string msg = absl::StrCat(what, ": ", std::strerror(err));
  switch (err) {
    case ENOENT:
      return absl::NotFoundError(msg);
    case EACCES:
    case EPERM:
    case EROFS:
      return absl::PermissionDeniedError(msg);
    case ENOSPC:
    case EDQUOT:
      return absl::ResourceExhaustedError(msg);
    case EIO:
    case ESTALE:
    case ETIMEDOUT:
      return absl::UnavailableError(msg);
    default:
      return absl::InternalError(msg);
  }
}

absl::Status WriteAll(int fd, absl::string_view data, const std::string& path) {
  size_t off = 0;
  while (off < data.size()) {
    const ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoStatus(errno, absl::StrCat("write ", path));
    off += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

namespace {

using Fd = kiln::UniqueFd;

absl::Status CopyFile(const std::string& from, const std::string& to, int64_t* bytes) {
  Fd in(::open(from.c_str(), O_RDONLY | O_CLOEXEC));
  if (in.get() < 0) return ErrnoStatus(errno, absl::StrCat("open ", from));
  Fd out(::open(to.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (out.get() < 0) return ErrnoStatus(errno, absl::StrCat("create ", to));
  std::vector<char> buf(1 << 20);
  while (true) {
    ssize_t n = ::read(in.get(), buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, absl::StrCat("read ", from));
    }
    if (n == 0) break;
    if (auto s = WriteAll(out.get(), absl::string_view(buf.data(), static_cast<size_t>(n)), to);
        !s.ok()) {
      return s;
    }
    *bytes += n;
  }
  if (::fsync(out.get()) != 0) return ErrnoStatus(errno, absl::StrCat("fsync ", to));
  if (out.Close() != 0) return ErrnoStatus(errno, absl::StrCat("close ", to));
  return absl::OkStatus();
}

bool IsDir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace

bool IsDigest(const std::string& s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

std::string HostName() {
  char buf[256] = {0};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) return "unknown-host";
  return buf;
}

std::string RandomToken(int bytes) {
  std::vector<unsigned char> raw(static_cast<size_t>(bytes));
  size_t got = 0;
  while (got < raw.size()) {
    ssize_t n = ::getrandom(raw.data() + got, raw.size() - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      // getrandom cannot fail on Linux >= 3.17 with these flags; fall back to time and pid.
      auto t = std::chrono::steady_clock::now().time_since_epoch().count() ^ (::getpid() << 16);
      for (size_t i = got; i < raw.size(); ++i) raw[i] = static_cast<unsigned char>(t >> (i % 8));
      break;
    }
    got += static_cast<size_t>(n);
  }
  static const char* kHex = "0123456789abcdef";
  std::string out;
  for (unsigned char c : raw) {
    out += kHex[c >> 4];
    out += kHex[c & 15];
  }
  return out;
}

absl::StatusOr<LocatedPackage> VerifyPackageDir(const std::string& dir, const ArtifactKey& key) {
  const std::string digest = key.Digest();
  if (!IsDir(dir)) {
    return absl::NotFoundError(
        absl::StrCat("no package for ", key.component, " (", digest, ") at ", dir));
  }
  auto corrupt = [&](const std::string& reason) -> absl::Status {
    // A directory removed under us (evicted, quarantined by another node) is a miss, not damage.
    if (!IsDir(dir)) {
      return absl::NotFoundError(absl::StrCat("package ", dir, " vanished while being read"));
    }
    return absl::DataLossError(reason);
  };
  const std::string manifest_path = absl::StrCat(dir, "/", kManifestFile);
  auto manifest = PackageManifest::FromFile(manifest_path);
  if (!manifest.ok()) {
    if (absl::IsNotFound(manifest.status())) return corrupt("no manifest.json");
    return corrupt(std::string(manifest.status().message()));
  }
  if (manifest->digest != digest) {
    return corrupt(absl::StrCat("manifest is for key ", manifest->digest, ", not ", digest));
  }
  LocatedPackage located{*manifest, dir, "", ""};
  if (!manifest->package_file.empty()) {
    located.package_path = absl::StrCat(dir, "/", manifest->package_file);
  }
  if (!manifest->extra_constants.empty()) {
    located.extra_constants_path = absl::StrCat(dir, "/", manifest->extra_constants);
    if (!fs::is_regular_file(located.extra_constants_path)) {
      return corrupt(absl::StrCat("extra constants ", manifest->extra_constants, " are missing"));
    }
  }
  // The package file of a whole-graph package, or every region's of a regional set.
  std::vector<RegionPackage> files = manifest->region_packages;
  if (manifest->layout != "regional") {
    files = {{"", manifest->package_file, manifest->package_sha256, manifest->package_bytes}};
  }
  for (const RegionPackage& f : files) {
    const std::string what =
        f.region.empty() ? "package" : absl::StrCat("region ", f.region, " package");
    const std::string path = absl::StrCat(dir, "/", f.file);
    struct stat st;
    if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
      return corrupt(absl::StrCat(what, " file ", f.file, " is missing"));
    }
    if (st.st_size != f.bytes) {
      return corrupt(absl::StrCat(what, " is ", st.st_size, " bytes, manifest says ", f.bytes));
    }
    auto sha = Sha256File(path);
    if (!sha.ok()) {
      if (absl::IsNotFound(sha.status())) return corrupt(std::string(sha.status().message()));
      return sha.status();
    }
    if (*sha != f.sha256) {
      return corrupt(absl::StrCat(what, " sha256 ", *sha, " != manifest ", f.sha256));
    }
  }
  return located;
}

LocatedPackage RelocatePackage(const LocatedPackage& p, const std::string& new_dir) {
  LocatedPackage out = p;
  out.dir = new_dir;
  out.package_path =
      p.manifest.package_file.empty() ? "" : absl::StrCat(new_dir, "/", p.manifest.package_file);
  out.extra_constants_path =
      p.manifest.extra_constants.empty() ? "" : absl::StrCat(new_dir, "/", p.manifest.extra_constants);
  return out;
}

absl::StatusOr<StagedDir> StageCopy(const std::string& source_dir, const std::string& root,
                                    const std::string& digest) {
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) return ErrnoStatus(ec.value(), absl::StrCat("create ", root));
  StagedDir staged;
  staged.path = absl::StrCat(root, "/", kStagingPrefix, digest.substr(0, 12), "-", RandomToken());
  if (::mkdir(staged.path.c_str(), 0755) != 0) {
    return ErrnoStatus(errno, absl::StrCat("mkdir ", staged.path));
  }
  auto fail = [&](absl::Status s) {
    RemoveTree(staged.path);
    return s;
  };
  DIR* d = ::opendir(source_dir.c_str());
  if (d == nullptr) return fail(ErrnoStatus(errno, absl::StrCat("open ", source_dir)));
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    names.emplace_back(e->d_name);
  }
  ::closedir(d);
  for (const auto& name : names) {
    const std::string from = absl::StrCat(source_dir, "/", name);
    struct stat st;
    if (::stat(from.c_str(), &st) != 0) {
      return fail(ErrnoStatus(errno, absl::StrCat("stat ", from)));
    }
    if (!S_ISREG(st.st_mode)) continue;
    if (auto s = CopyFile(from, absl::StrCat(staged.path, "/", name), &staged.bytes); !s.ok()) {
      return fail(s);
    }
  }
  if (auto s = FsyncDir(staged.path); !s.ok()) return fail(s);
  return staged;
}

absl::StatusOr<bool> PublishStaged(const std::string& staged, const std::string& root,
                                   const std::string& digest) {
  const std::string final_dir = absl::StrCat(root, "/", digest);
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (::rename(staged.c_str(), final_dir.c_str()) == 0) {
      if (auto s = FsyncDir(root); !s.ok()) return s;
      return true;
    }
    const int err = errno;
    if (err != EEXIST && err != ENOTEMPTY) {
      RemoveTree(staged);
      return ErrnoStatus(err, absl::StrCat("rename ", staged, " to ", final_dir));
    }
    if (fs::exists(absl::StrCat(final_dir, "/", kManifestFile))) {
      // Someone published the same digest first; theirs is as good as ours (same key).
      RemoveTree(staged);
      return false;
    }
    // A directory without a manifest is debris (a foreign copy or a crash outside kiln's atomic
    // publishing); it would block every publish of this digest.
    auto q = QuarantinePackageDir(root, digest, "entry without a manifest blocks publishing");
    if (!q.ok() && !absl::IsNotFound(q.status())) {
      RemoveTree(staged);
      return q.status();
    }
  }
  RemoveTree(staged);
  return absl::AbortedError(absl::StrCat("could not publish ", final_dir, ": contended"));
}

absl::StatusOr<std::string> QuarantinePackageDir(const std::string& root, const std::string& digest,
                                                 const std::string& reason) {
  const std::string qdir = absl::StrCat(root, "/", kQuarantineDir);
  std::error_code ec;
  fs::create_directories(qdir, ec);
  if (ec) return ErrnoStatus(ec.value(), absl::StrCat("create ", qdir));
  const std::string dest =
      absl::StrCat(qdir, "/", digest, "-", kiln::UnixMs(), "-", RandomToken(3));
  const std::string src = absl::StrCat(root, "/", digest);
  if (::rename(src.c_str(), dest.c_str()) != 0) {
    return ErrnoStatus(errno, absl::StrCat("quarantine ", src));
  }
  kiln::LogWarning("cache", absl::StrCat("quarantined package ", src, " to ", dest, ": ", reason));
  return dest;
}

int64_t DirBytes(const std::string& dir) {
  int64_t total = 0;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return 0;
  while (dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
    struct stat st;
    if (::stat(absl::StrCat(dir, "/", e->d_name).c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      total += st.st_size;
    }
  }
  ::closedir(d);
  return total;
}

void RemoveTree(const std::string& path) {
  (void)kiln::RemoveTree(path);  // not std::filesystem: see common/files.h
}

}  // namespace kiln::cache
