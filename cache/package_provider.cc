#include "cache/package_provider.h"

#include <chrono>
#include <iostream>

#include "absl/strings/str_cat.h"

namespace kiln::cache {
namespace {
double Since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}
}  // namespace

TieredPackageProvider::TieredPackageProvider(std::unique_ptr<LocalDiskStore> local,
                                             std::unique_ptr<PackageCompiler> compiler,
                                             nlohmann::json compile_options)
    : local_(std::move(local)),
      compiler_(std::move(compiler)),
      compile_options_(std::move(compile_options)) {}

absl::StatusOr<ProvidedPackage> TieredPackageProvider::Get(const ArtifactKey& key,
                                                           const std::string& model_dir) {
  ProvidedPackage out;
  auto found = local_->Find(key);
  if (found.ok()) {
    out.package = *std::move(found);
    out.provenance = "local";
    return out;
  }
  if (!absl::IsNotFound(found.status()) && !absl::IsDataLoss(found.status())) return found.status();
  if (absl::IsDataLoss(found.status())) out.warning = std::string(found.status().message());
  if (compiler_ == nullptr) {
    return absl::NotFoundError(absl::StrCat(found.status().message(), " and compiling is disabled"));
  }
  std::cerr << "kiln: compiling " << key.component << " package (" << key.Digest().substr(0, 12)
            << ") with kiln-compile; this happens once per key\n";
  const auto t = std::chrono::steady_clock::now();
  if (auto s = compiler_->Compile({model_dir, key, compile_options_, local_->root()}); !s.ok()) {
    return s;
  }
  out.compile_seconds = Since(t);
  found = local_->Find(key);
  if (!found.ok()) return found.status();
  out.package = *std::move(found);
  out.provenance = "compiled";
  return out;
}

}  // namespace kiln::cache
