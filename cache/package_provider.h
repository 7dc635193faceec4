// PackageProvider: the package for an artifact key, from the nearest tier that holds it.
// TieredPackageProvider walks node-local disk → shared tier (optional) → compile (optional), and
// reports where the package came from and what it cost. The pipeline asks it for every package;
// a node gives it the cluster's shared store, kiln-run only a local directory and a compiler.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "cache/artifact_key.h"
#include "cache/compiler.h"
#include "cache/local_disk_store.h"

namespace kiln::cache {

struct ProvidedPackage {
  LocatedPackage package;    // always in the node-local store, verified
  std::string provenance;    // "local", "shared" or "compiled"
  double fetch_seconds = 0;  // copying from the shared tier
  double compile_seconds = 0;
  std::string warning;       // e.g. a corrupt copy was quarantined on the way
};

class PackageProvider {
 public:
  virtual ~PackageProvider() = default;
  // `model_dir` is the repository to compile from on a miss.
  virtual absl::StatusOr<ProvidedPackage> Get(const ArtifactKey& key,
                                              const std::string& model_dir) = 0;
  // True if Get() may compile (a node advertises it).
  virtual bool can_compile() const = 0;
};

class TieredPackageProvider : public PackageProvider {
 public:
  // `compiler` may be null: a miss is then NotFound.
  TieredPackageProvider(std::unique_ptr<LocalDiskStore> local,
                        std::unique_ptr<PackageCompiler> compiler,
                        nlohmann::json compile_options);
  absl::StatusOr<ProvidedPackage> Get(const ArtifactKey& key, const std::string& model_dir) override;
  bool can_compile() const override { return compiler_ != nullptr; }
  LocalDiskStore& local() { return *local_; }

 private:
  std::unique_ptr<LocalDiskStore> local_;
  std::unique_ptr<PackageCompiler> compiler_;
  nlohmann::json compile_options_;
};

}  // namespace kiln::cache
