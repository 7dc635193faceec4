// Filesystem mechanics shared by the directory-backed stores (LocalDiskStore, SharedFsStore): one
// package = one directory ROOT/<digest>/ holding flat regular files (model.pt2, manifest.json and
// optionally constants.safetensors, as kiln-compile writes them). Verifying a directory, copying one
// into a root atomically (stage under a temporary name, fsync, rename) and quarantining a corrupt
// one. Internal to cache/; callers use the stores. Thread-safe (no state), safe across processes
// sharing a root: every visible change is a single rename.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "cache/artifact_key.h"
#include "cache/package.h"
#include "common/files.h"

namespace kiln::cache {

inline constexpr char kManifestFile[] = "manifest.json";
inline constexpr char kQuarantineDir[] = "quarantine";
// Prefix of directories being staged in a root (kiln-compile uses the same one).
inline constexpr char kStagingPrefix[] = ".tmp-";

// True if `name` is a lower-case hex SHA-256 (the name of a package directory).
bool IsDigest(const std::string& name);

// Random lower-case hex of 2*bytes characters, for unique temporary names.
std::string RandomToken(int bytes = 8);

// This machine's host name (gethostname), "unknown-host" if it cannot be read: who holds a lease.
std::string HostName();

// Checks that `dir` holds the package for `key`: manifest parses and is for key.Digest(), the
// package file has the manifest's size and SHA-256, declared extra constants exist.
// NotFound: `dir` does not exist (or vanished while being read). DataLoss: it exists but fails a
// check (message = the reason). Other codes: I/O errors that say nothing about the contents.
absl::StatusOr<LocatedPackage> VerifyPackageDir(const std::string& dir, const ArtifactKey& key);

// Paths of a verified package moved (renamed) from one directory to another.
LocatedPackage RelocatePackage(const LocatedPackage& package, const std::string& new_dir);

// A package directory copied into `root` under a temporary name, every file and the directory
// fsynced. Not yet visible under its digest: PublishStaged() makes it so.
struct StagedDir {
  std::string path;   // ROOT/.tmp-<digest prefix>-<token>
  int64_t bytes = 0;  // bytes copied
};

// Copies the regular files of `source_dir` (flat; dot-files and subdirectories are skipped) into a
// new staging directory under `root`. NotFound if the source vanished; other codes on I/O errors.
// On error nothing is left behind.
absl::StatusOr<StagedDir> StageCopy(const std::string& source_dir, const std::string& root,
                                    const std::string& digest);

// Renames `staged` to ROOT/<digest> and fsyncs ROOT. Returns true if it was published, false if a
// complete entry (one with a manifest) already existed; then `staged` has been removed. An
// existing entry without a manifest is debris and is quarantined first.
absl::StatusOr<bool> PublishStaged(const std::string& staged, const std::string& root,
                                   const std::string& digest);

// Moves ROOT/<digest> to ROOT/quarantine/<digest>-<unix ms>-<token> and logs `reason`. Returns the
// new path. NotFound if the entry is already gone (someone else quarantined or evicted it).
absl::StatusOr<std::string> QuarantinePackageDir(const std::string& root, const std::string& digest,
                                                 const std::string& reason);

// Sum of the sizes of the regular files directly in `dir` (0 if it does not exist).
int64_t DirBytes(const std::string& dir);

// Removes `path` (file or tree); errors are ignored (best-effort cleanup).
void RemoveTree(const std::string& path);

// A Status for a failed system call: NotFound (ENOENT), PermissionDenied, ResourceExhausted (disk
// full), Unavailable (EIO, stale NFS handle, timeout), Internal otherwise. `what` names the call.
absl::Status ErrnoStatus(int err, const std::string& what);

// Writes all of `data` to `fd` (retrying short writes and EINTR); ErrnoStatus naming `path`.
absl::Status WriteAll(int fd, absl::string_view data, const std::string& path);

// fsync of a directory (common/files.h), so that renames and creations in it are durable.
using kiln::FsyncDir;

}  // namespace kiln::cache
