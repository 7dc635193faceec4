// Node-local package directory: ROOT/<digest>/{model.pt2, manifest.json[, constants.safetensors]}
// as kiln-compile writes it. Every Find() verifies the manifest against the key and the package
// against its SHA-256 before anyone loads it (a package is a shared library, i.e. code); a
// corrupt entry is moved to ROOT/quarantine/ so it can be rebuilt. Thread-compatible.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "cache/artifact_key.h"
#include "cache/manifest.h"

namespace kiln::cache {

struct LocatedPackage {
  PackageManifest manifest;
  std::string dir;                    // ROOT/<digest>
  std::string package_path;           // dir/model.pt2
  std::string extra_constants_path;   // dir/constants.safetensors or ""
};

class LocalDiskStore {
 public:
  explicit LocalDiskStore(std::string root) : root_(std::move(root)) {}

  // NotFound if no package is stored for `key`. DataLoss if one is stored but fails
  // verification; it has then been quarantined and the caller may rebuild it.
  absl::StatusOr<LocatedPackage> Find(const ArtifactKey& key) const;

  std::string DirFor(const std::string& digest) const { return root_ + "/" + digest; }
  const std::string& root() const { return root_; }

 private:
  absl::Status Quarantine(const std::string& digest, const std::string& reason) const;
  std::string root_;
};

}  // namespace kiln::cache
