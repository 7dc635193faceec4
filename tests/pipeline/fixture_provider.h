// The package provider of the pipeline tests that run the flux-tiny fixtures (scripts/test.sh):
// $KILN_TESTDATA/packages (or another fixture directory there: packages-batch holds the batch-2
// transformer and VAE too) as the local tier, no shared tier and no compiler, so a miss is
// NotFound rather than a compile.
#pragma once

#include <memory>
#include <string>

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

}  // namespace kiln::testing
