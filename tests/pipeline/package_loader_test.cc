// PackageLoader's handling of packages that verify but cannot be used (issue 12): a package that
// fails to load, or whose numerical canary disagrees with its record, is quarantined through the
// provider and asked for once more, and the replacement serves. The canary records are made by
// the Python recorder (kiln/canary.py, through tests/pipeline/add_canary.py), so the passing case
// also checks that the C++ canary (pipeline/canary.h) reproduces what Python recorded. Uses the
// flux-tiny fixtures made by scripts/test.sh (the vae_decoder package: small and quick to load).
#include <deque>
#include <filesystem>

#include "cache/package_dir.h"
#include "cache/package_provider.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "pipeline/canary.h"
#include "pipeline/flux_pipeline.h"
#include "pipeline/package_loader.h"
#include "tests/pipeline/test_support.h"

namespace kiln::pipeline {
namespace {
namespace fs = std::filesystem;
using kiln::testing::EnvOrEmpty;
using ::testing::HasSubstr;

std::string TinyRepo() { return EnvOrEmpty("KILN_TESTDATA") + "/flux-tiny"; }
std::string TinyPackages() { return EnvOrEmpty("KILN_TESTDATA") + "/packages"; }

// Hands out the package directories it was given, one per Get(), and records quarantines.
class ScriptedProvider : public cache::PackageProvider {
 public:
  explicit ScriptedProvider(std::deque<std::string> dirs) : dirs_(std::move(dirs)) {}
  absl::StatusOr<cache::ProvidedPackage> Get(const cache::PackageRequest& r) override {
    if (dirs_.empty()) return absl::NotFoundError("scripted provider: no more packages");
    const std::string dir = dirs_.front();
    dirs_.pop_front();
    auto located = cache::VerifyPackageDir(dir, r.key);
    if (!located.ok()) return located.status();
    cache::ProvidedPackage p;
    p.package = *located;
    p.provenance = "local";
    return p;
  }
  bool can_compile() const override { return false; }
  absl::Status Quarantine(const cache::ArtifactKey&, const std::string& label,
                          const std::string& why) override {
    quarantined.push_back(label + ": " + why);
    return absl::OkStatus();
  }
  std::vector<std::string> quarantined;

 private:
  std::deque<std::string> dirs_;
};

class PackageLoaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(TinyPackages())) << "run via scripts/test.sh (fixtures)";
    cache::TieredProviderConfig config;
    config.local.root = TinyPackages();
    auto provider = cache::OpenTieredProvider(std::move(config), nullptr);
    ASSERT_TRUE(provider.ok()) << provider.status();
    PipelineOptions opts;
    opts.model_dir = TinyRepo();
    auto p = FluxPipeline::Create(opts, *std::move(provider));
    ASSERT_TRUE(p.ok()) << p.status();
    key_ = (*p)->KeyFor("vae_decoder", 256, 256);
  }

  // A private copy of the fixture package, named `name`.
  std::string Copy(const std::string& name) {
    const std::string dir = tmp_.Join(name);
    fs::copy(TinyPackages() + "/" + key_.Digest(), dir, fs::copy_options::recursive);
    return dir;
  }

  void AddCanary(const std::string& dir, double scale = 1.0) {
    std::vector<std::string> args = {dir};
    if (scale != 1.0) args.insert(args.end(), {"--scale", std::to_string(scale)});
    auto r = kiln::testing::RunPython("tests/pipeline/add_canary.py", args);
    ASSERT_TRUE(r.ok()) << r.status();
  }

  absl::StatusOr<std::map<std::string, LoadedComponent>> Ensure(PackageLoader& loader,
                                                                 LoadReport* report) {
    return loader.EnsureAll({{"vae_decoder", key_}}, report);
  }

  kiln::testing::TempDir tmp_;
  cache::ArtifactKey key_;
};

TEST_F(PackageLoaderTest, UnloadablePackageIsQuarantinedAndItsReplacementServes) {
  const std::string bad = Copy("bad");
  const std::string good = Copy("good");
  // Random bytes with a manifest that agrees: verification passes, loading cannot.
  auto r = kiln::testing::RunPython("tests/pipeline/tamper_package.py", {bad, "--garbage"});
  ASSERT_TRUE(r.ok()) << r.status();
  auto provider = std::make_shared<ScriptedProvider>(std::deque<std::string>{bad, good});
  PackageLoader loader(provider, TinyRepo(), cache::DefaultCompileOptions(), c10::kCPU);
  LoadReport report;
  auto loaded = Ensure(loader, &report);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(provider->quarantined.size(), 1u);
  EXPECT_THAT(provider->quarantined[0], HasSubstr("unloadable"));
  ASSERT_FALSE(report.warnings.empty());
  EXPECT_THAT(report.warnings.back(), HasSubstr("quarantined the vae_decoder package"));
}

TEST_F(PackageLoaderTest, CanaryPassesOnTheRecordPythonMadeAndCatchesAnAlteredOutput) {
  const std::string altered = Copy("altered");
  const std::string good = Copy("good");
  AddCanary(altered, /*scale=*/1.5);
  AddCanary(good);
  auto provider = std::make_shared<ScriptedProvider>(std::deque<std::string>{altered, good});
  PackageLoader loader(provider, TinyRepo(), cache::DefaultCompileOptions(), c10::kCPU);
  LoadReport report;
  auto loaded = Ensure(loader, &report);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(provider->quarantined.size(), 1u);
  EXPECT_THAT(provider->quarantined[0], HasSubstr("canary"));
  EXPECT_THAT(provider->quarantined[0], HasSubstr("relative L2 error"));
  EXPECT_GT(report.canary_seconds, 0);  // the good package's canary ran and passed
}

TEST_F(PackageLoaderTest, CanaryDisagreeingTwiceFailsTheLoadAsDataLoss) {
  const std::string a = Copy("a");
  AddCanary(a, 0.5);
  const std::string b = tmp_.Join("b");
  fs::copy(a, b, fs::copy_options::recursive);
  auto provider = std::make_shared<ScriptedProvider>(std::deque<std::string>{a, b});
  PackageLoader loader(provider, TinyRepo(), cache::DefaultCompileOptions(), c10::kCPU);
  LoadReport report;
  auto loaded = Ensure(loader, &report);
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss) << loaded.status();
  EXPECT_EQ(provider->quarantined.size(), 2u);
}

TEST(SyntheticConstantTest, MatchesThePythonRecipe) {
  // kiln/canary.py's synthetic_constant for index 3, shape [4, 9], float32: spot values.
  at::Tensor t = SyntheticConstant(3, {4, 9}, at::kFloat, c10::kCPU);
  ASSERT_EQ(t.sizes(), (std::vector<int64_t>{4, 9}));
  const float scale = 1.0f / 3.0f;
  EXPECT_NEAR(t[0][0].item<float>(), std::sin(3 * 0.5698402909980532) * scale, 1e-6);
  EXPECT_NEAR(t[1][2].item<float>(), std::sin(11 * 0.7548776662466927 + 3 * 0.5698402909980532) *
                                         scale,
              1e-6);
  at::Tensor v = SyntheticConstant(0, {5}, at::kBFloat16, c10::kCPU);
  EXPECT_EQ(v.scalar_type(), at::kBFloat16);
  EXPECT_NEAR(v[1].item<float>(), std::sin(0.7548776662466927) * 0.5, 1e-2);
}

}  // namespace
}  // namespace kiln::pipeline
