// The package provider of the pipeline tests that run the flux-tiny fixtures (scripts/test.sh):
// $KILN_TESTDATA/packages (or another fixture directory there: packages-batch holds the batch-2
// transformer and VAE too) as the local tier, no shared tier and no compiler, so a miss is
// NotFound rather than a compile. ChainProvider reads one fixture directory before another.
#pragma once

#include <memory>
#include <string>
#include <utility>

#include "cache/package_provider.h"
#include "gtest/gtest.h"
#include "tests/pipeline/test_support.h"

namespace kiln::testing {

inline std::shared_ptr<cache::PackageProvider> FixtureProvider(
    const std::string& dir = "packages") {
  cache::TieredProviderConfig config;
  config.local.root = EnvOrEmpty("KILN_TESTDATA") + "/" + dir;
  auto provider = cache::OpenTieredProvider(std::move(config), nullptr);
  EXPECT_TRUE(provider.ok()) << provider.status();
  return provider.ok() ? std::shared_ptr<cache::PackageProvider>(*std::move(provider)) : nullptr;
}

// A provider over two (e.g. packages-sp, then packages-regional): what `first` does not have
// (NotFound) comes from `second`; any other answer of `first` is the answer. Compiles nothing.
class ChainProvider : public cache::PackageProvider {
 public:
  ChainProvider(std::shared_ptr<cache::PackageProvider> first,
                std::shared_ptr<cache::PackageProvider> second)
      : first_(std::move(first)), second_(std::move(second)) {}
  absl::StatusOr<cache::ProvidedPackage> Get(const cache::PackageRequest& request) override {
    auto got = first_->Get(request);
    if (got.ok() || !absl::IsNotFound(got.status())) return got;
    return second_->Get(request);
  }
  bool can_compile() const override { return false; }

 private:
  std::shared_ptr<cache::PackageProvider> first_, second_;
};

}  // namespace kiln::testing
