#include "cache/local_disk_store.h"

#include <sys/stat.h>

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <iostream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/hash.h"

namespace kiln::cache {
namespace fs = std::filesystem;

absl::StatusOr<LocatedPackage> LocalDiskStore::Find(const ArtifactKey& key) const {
  const std::string digest = key.Digest();
  const std::string dir = DirFor(digest);
  std::error_code ec;
  if (!fs::exists(dir + "/manifest.json", ec)) {
    return absl::NotFoundError(absl::StrCat("no package for ", key.component, " (", digest, ") in ",
                                            root_));
  }
  auto fail = [&](const std::string& reason) -> absl::Status {
    auto q = Quarantine(digest, reason);
    return absl::DataLossError(absl::StrCat("package ", dir, " is corrupt (", reason, ")",
                                            q.ok() ? "; quarantined" : "; quarantine failed: ",
                                            q.ok() ? "" : q.message()));
  };
  auto manifest = PackageManifest::FromFile(dir + "/manifest.json");
  if (!manifest.ok()) return fail(std::string(manifest.status().message()));
  if (manifest->digest != digest) {
    return fail(absl::StrCat("manifest is for key ", manifest->digest));
  }
  LocatedPackage located{*manifest, dir, dir + "/" + manifest->package_file, ""};
  if (!manifest->extra_constants.empty()) {
    located.extra_constants_path = dir + "/" + manifest->extra_constants;
  }
  auto sha = Sha256File(located.package_path);
  if (!sha.ok()) return fail(std::string(sha.status().message()));
  if (*sha != manifest->package_sha256) {
    return fail(absl::StrCat("package sha256 ", *sha, " != manifest ", manifest->package_sha256));
  }
  return located;
}

absl::Status LocalDiskStore::Quarantine(const std::string& digest,
                                        const std::string& reason) const {
  std::error_code ec;
  fs::create_directories(root_ + "/quarantine", ec);
  if (ec) return absl::InternalError(ec.message());
  const std::string dest =
      absl::StrCat(root_, "/quarantine/", digest, "-", static_cast<long long>(std::time(nullptr)));
  fs::rename(DirFor(digest), dest, ec);
  if (ec) return absl::InternalError(ec.message());
  std::cerr << "kiln: quarantined package " << digest << " to " << dest << ": " << reason << "\n";
  return absl::OkStatus();
}

}  // namespace kiln::cache
