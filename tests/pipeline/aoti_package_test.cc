// The guards around AOTI packages: metadata checked before loading (device, torch version, key),
// constants (missing, misshaped, wrong dtype), inputs (shape, dtype, contiguity), Run() before
// constants, and corrupt packages in the store. Uses the flux-tiny fixtures made by
// scripts/test.sh (the text_encoder package: small and quick to load).
#include <filesystem>

#include "cache/local_disk_store.h"
#include "cache/package_provider.h"
#include "gtest/gtest.h"
#include "pipeline/aoti_package.h"
#include "pipeline/cuda_graph.h"
#include "pipeline/flux_pipeline.h"
#include "pipeline/weights.h"
#include "tests/pipeline/test_support.h"

namespace kiln::pipeline {
namespace {
namespace fs = std::filesystem;
using kiln::testing::EnvOrEmpty;

std::string TinyRepo() { return EnvOrEmpty("KILN_TESTDATA") + "/flux-tiny"; }
std::string TinyPackages() { return EnvOrEmpty("KILN_TESTDATA") + "/packages"; }
// The fixtures' package directory as the only tier, never compiling.
std::shared_ptr<cache::PackageProvider> TinyProvider() {
  cache::TieredProviderConfig config;
  config.local.root = TinyPackages();
  auto provider = cache::OpenTieredProvider(std::move(config), nullptr);
  EXPECT_TRUE(provider.ok()) << provider.status();
  return provider.ok() ? std::shared_ptr<cache::PackageProvider>(*std::move(provider)) : nullptr;
}

class AotiPackageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(TinyPackages())) << "run via scripts/test.sh (fixtures)";
    PipelineOptions opts;
    opts.model_dir = TinyRepo();
    auto p = FluxPipeline::Create(opts, TinyProvider());
    ASSERT_TRUE(p.ok()) << p.status();
    key_ = (*p)->KeyFor("text_encoder", 0, 0);
    // A private copy of the store, so tampering never touches the shared fixtures.
    root_ = tmp_.Join("packages");
    fs::create_directories(root_);
    fs::copy(TinyPackages() + "/" + key_.Digest(), root_ + "/" + key_.Digest(),
             fs::copy_options::recursive);
  }

  absl::StatusOr<std::unique_ptr<AotiPackage>> LoadCopy() {
    cache::LocalDiskStore store(root_);
    auto located = store.Find(key_);
    if (!located.ok()) return located.status();
    located_ = *located;
    return AotiPackage::Load(*located, c10::kCPU);
  }

  std::unordered_map<std::string, at::Tensor> Weights(const AotiPackage& pkg) {
    auto w = ComponentWeights::Open(TinyRepo() + "/text_encoder", "model", c10::kCPU);
    EXPECT_TRUE(w.ok()) << w.status();
    auto c = (*w)->Gather(pkg, located_.extra_constants_path);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *c : std::unordered_map<std::string, at::Tensor>{};
  }

  kiln::testing::TempDir tmp_;
  std::string root_;
  cache::ArtifactKey key_;
  cache::LocatedPackage located_;
};

TEST_F(AotiPackageTest, RunsWithValidInputsAndRejectsBadOnes) {
  auto pkg = LoadCopy();
  ASSERT_TRUE(pkg.ok()) << pkg.status();
  at::Tensor ids = torch::zeros({1, 77}, torch::kLong);

  // Before constants: refused instead of the runtime's segfault.
  auto early = (*pkg)->Run({ids});
  EXPECT_EQ(early.status().code(), absl::StatusCode::kFailedPrecondition) << early.status();

  ASSERT_TRUE((*pkg)->LoadConstants(Weights(**pkg)).ok());
  auto ok = (*pkg)->Run({ids});
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)[0].size(0), 1);

  auto shape = (*pkg)->Run({torch::zeros({1, 76}, torch::kLong)});
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(shape.status().message().find("shape [1, 76], expected [1, 77]"), std::string::npos)
      << shape.status();
  auto dtype = (*pkg)->Run({torch::zeros({1, 77}, torch::kInt)});
  EXPECT_EQ(dtype.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(dtype.status().message().find("dtype int32, expected int64"), std::string::npos)
      << dtype.status();
  at::Tensor strided = torch::zeros({1, 154}, torch::kLong).slice(1, 0, 154, 2);
  ASSERT_FALSE(strided.is_contiguous());
  auto contig = (*pkg)->Run({strided});
  EXPECT_EQ(contig.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(contig.status().message().find("not contiguous"), std::string::npos) << contig.status();
  auto count = (*pkg)->Run({ids, ids});
  EXPECT_EQ(count.status().code(), absl::StatusCode::kInvalidArgument);
}

// After ReleaseConstants (the loader's step between the canary and the weights) the package holds
// no tensors and refuses to run until it is given constants again; then it gives the same output.
TEST_F(AotiPackageTest, ReleasedConstantsMustBeLoadedAgainBeforeARun) {
  auto pkg = LoadCopy();
  ASSERT_TRUE(pkg.ok()) << pkg.status();
  at::Tensor ids = torch::zeros({1, 77}, torch::kLong);
  ASSERT_TRUE((*pkg)->LoadConstants(Weights(**pkg)).ok());
  auto before = (*pkg)->Run({ids});
  ASSERT_TRUE(before.ok()) << before.status();
  (*pkg)->ReleaseConstants();
  auto refused = (*pkg)->Run({ids});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  ASSERT_TRUE((*pkg)->LoadConstants(Weights(**pkg)).ok());
  auto after = (*pkg)->Run({ids});
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_TRUE(torch::equal((*before)[0], (*after)[0]));
}

// The runtime's user-managed load (load_constants(..., user_managed=true)) makes its own
// at::Tensor for every constant and never deletes it (torch 2.11 and 2.13:
// MaybeOwningAtenTensorHandle with user_managed holds a handle from aoti_torch_new_tensor_handle
// that nothing frees), so a set
// the package no longer uses would stay in memory for the life of the process: on the GPU host the
// canary's synthetic flux-dev weights (24 GB) stayed beside the real ones, and every LoRA set ever
// merged stayed too. The package frees the memory of a set once nothing but those leaked
// references holds it; one still held elsewhere (the caller's copy here) is left alone.
TEST_F(AotiPackageTest, ASetNoLongerUsedIsFreedDespiteTheRuntimesLeakedReferences) {
  auto pkg = LoadCopy();
  ASSERT_TRUE(pkg.ok()) << pkg.status();
  at::Tensor ids = torch::zeros({1, 77}, torch::kLong);
  auto weights = Weights(**pkg);
  ASSERT_FALSE(weights.empty());
  // A set of fresh copies, as the canary's synthetic constants are: nobody else holds them.
  std::unordered_map<std::string, at::Tensor> copies;
  for (const auto& [fqn, t] : weights) copies.emplace(fqn, t.clone());
  const std::string probe_fqn = copies.begin()->first;
  c10::weak_intrusive_ptr<c10::StorageImpl> probe(
      copies.begin()->second.storage().getWeakStorageImpl());
  const size_t probe_bytes = copies.begin()->second.storage().nbytes();
  ASSERT_GT(probe_bytes, 0u);
  ASSERT_TRUE((*pkg)->LoadConstants(copies).ok());
  ASSERT_TRUE((*pkg)->Run({ids}).ok());
  copies.clear();  // the package holds the set now
  {
    auto alive = probe.lock();
    ASSERT_TRUE(alive);
    EXPECT_EQ(alive->nbytes(), probe_bytes);  // in use: untouched
  }
  AotiPackage::FreeUnusedConstants();  // the set is loaded: not freed
  {
    auto alive = probe.lock();
    ASSERT_TRUE(alive);
    EXPECT_EQ(alive->nbytes(), probe_bytes);
  }
  // The set replaced by the real weights: freed (or at least its bytes are).
  ASSERT_TRUE((*pkg)->LoadConstants(weights).ok());
  EXPECT_GE(AotiPackage::FreeUnusedConstants(), probe_bytes);
  {
    auto alive = probe.lock();
    EXPECT_TRUE(!alive || alive->nbytes() == 0)
        << "the replaced set still holds " << (alive ? alive->nbytes() : 0) << " bytes of "
        << probe_fqn;
  }
  // The real weights are still held by the caller (`weights`): a release must not free them.
  auto before = (*pkg)->Run({ids});
  ASSERT_TRUE(before.ok()) << before.status();
  (*pkg)->ReleaseConstants();
  AotiPackage::FreeUnusedConstants();
  for (const auto& [fqn, t] : weights) {
    ASSERT_GE(t.storage().nbytes(), static_cast<size_t>(t.numel() * t.element_size()))
        << fqn << " was freed";
  }
  ASSERT_TRUE((*pkg)->LoadConstants(weights).ok());
  auto after = (*pkg)->Run({ids});
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_TRUE(torch::equal((*before)[0], (*after)[0]));
}

// kiln-run --lora's order: the base set loaded, a LoRA set swapped in before the first run, then
// every job's runs, then back to the base. On the GPU host (torch 2.11, the single-threaded CUDA
// runner) the runtime's own buffer swap made every run after the first fail ("Unknown constant
// state: ConstantState::INITIALIZED": it checks the primary buffer's fold state while running the
// secondary), so the commit now loads the active buffer. Every run must give the set's output,
// and the base comes back exactly; a commit with nothing prepared is refused.
TEST_F(AotiPackageTest, ASetSwappedInBeforeTheFirstRunServesEveryRunAfterIt) {
  auto pkg = LoadCopy();
  ASSERT_TRUE(pkg.ok()) << pkg.status();
  auto reference = LoadCopy();  // runs the scaled set from the start, for its expected output
  ASSERT_TRUE(reference.ok()) << reference.status();
  at::Tensor ids = torch::arange(77, torch::kLong).unsqueeze(0);
  auto base = Weights(**pkg);
  ASSERT_FALSE(base.empty());
  std::unordered_map<std::string, at::Tensor> scaled;
  for (const auto& [fqn, t] : base) {
    scaled.emplace(fqn, t.is_floating_point() ? (t * 1.5).contiguous() : t.clone());
  }
  ASSERT_TRUE((*reference)->LoadConstants(scaled).ok());
  auto want = (*reference)->RunFirst({ids});
  ASSERT_TRUE(want.ok()) << want.status();

  ASSERT_TRUE((*pkg)->LoadConstants(base).ok());
  EXPECT_EQ((*pkg)->CommitConstants().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*pkg)->SwapConstants(scaled).ok());  // before any run
  for (int i = 0; i < 3; ++i) {
    auto got = (*pkg)->RunFirst({ids});
    ASSERT_TRUE(got.ok()) << "run " << i << ": " << got.status();
    EXPECT_TRUE(torch::equal(*got, *want)) << "run " << i;
  }
  ASSERT_TRUE((*pkg)->PrepareConstants(base).ok());
  auto still = (*pkg)->RunFirst({ids});  // prepared, not committed: the scaled set runs on
  ASSERT_TRUE(still.ok()) << still.status();
  EXPECT_TRUE(torch::equal(*still, *want));
  ASSERT_TRUE((*pkg)->CommitConstants().ok());
  ASSERT_TRUE((*reference)->SwapConstants(base).ok());
  auto base_want = (*reference)->RunFirst({ids});
  ASSERT_TRUE(base_want.ok()) << base_want.status();
  EXPECT_FALSE(torch::equal(*base_want, *want));  // the two sets do differ
  for (int i = 0; i < 2; ++i) {
    auto got = (*pkg)->RunFirst({ids});
    ASSERT_TRUE(got.ok()) << "base run " << i << ": " << got.status();
    EXPECT_TRUE(torch::equal(*got, *base_want)) << "base run " << i;
  }
}

TEST_F(AotiPackageTest, MissingAndMisshapedWeightsAreNamed) {
  auto pkg = LoadCopy();
  ASSERT_TRUE(pkg.ok()) << pkg.status();
  auto weights = Weights(**pkg);
  ASSERT_FALSE(weights.empty());

  auto missing = weights;
  missing.erase("text_model.final_layer_norm.weight");
  auto s = (*pkg)->LoadConstants(missing);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.message().find("text_model.final_layer_norm.weight"), std::string::npos) << s;

  auto misshaped = weights;
  misshaped["text_model.final_layer_norm.weight"] = torch::zeros({3});
  s = (*pkg)->LoadConstants(misshaped);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("text_model.final_layer_norm.weight"), std::string::npos) << s;

  auto wrong_dtype = weights;
  wrong_dtype["text_model.final_layer_norm.weight"] =
      weights["text_model.final_layer_norm.weight"].to(torch::kDouble);
  s = (*pkg)->LoadConstants(wrong_dtype);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("dtype float64"), std::string::npos) << s;
}

TEST_F(AotiPackageTest, PackageFromAnotherTorchVersionIsRefusedBeforeLoading) {
  auto r = kiln::testing::RunPython("tests/pipeline/tamper_package.py",
                                    {root_ + "/" + key_.Digest(), "kiln.torch_version=2.9.0+cpu"});
  ASSERT_TRUE(r.ok()) << r.status();
  auto pkg = LoadCopy();
  EXPECT_EQ(pkg.status().code(), absl::StatusCode::kFailedPrecondition) << pkg.status();
  EXPECT_NE(pkg.status().message().find("2.9.0+cpu"), std::string::npos) << pkg.status();
}

TEST_F(AotiPackageTest, PackageForAnotherDeviceIsRefusedBeforeLoading) {
  auto r = kiln::testing::RunPython("tests/pipeline/tamper_package.py",
                                    {root_ + "/" + key_.Digest(), "AOTI_DEVICE_KEY=cuda"});
  ASSERT_TRUE(r.ok()) << r.status();
  auto pkg = LoadCopy();
  EXPECT_EQ(pkg.status().code(), absl::StatusCode::kFailedPrecondition) << pkg.status();
  EXPECT_NE(pkg.status().message().find("built for device 'cuda'"), std::string::npos)
      << pkg.status();
}

TEST_F(AotiPackageTest, CorruptPackageIsRefusedAndQuarantined) {
  const std::string pt2 = root_ + "/" + key_.Digest() + "/model.pt2";
  {
    std::fstream f(pt2, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(1000);
    f.put('\x5a');
  }
  cache::LocalDiskStore store(root_);
  auto located = store.Find(key_);
  EXPECT_EQ(located.status().code(), absl::StatusCode::kDataLoss) << located.status();
  EXPECT_FALSE(fs::exists(root_ + "/" + key_.Digest()));
  EXPECT_TRUE(fs::exists(root_ + "/quarantine"));
  // Gone from the store: the next lookup is a plain miss, so the caller recompiles.
  EXPECT_EQ(store.Find(key_).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(AotiPackageTest, CudaGraphCaptureRefusesCpuPackagesAndProfilerIsInertOnCpu) {
  auto pkg = LoadCopy();
  ASSERT_TRUE(pkg.ok()) << pkg.status();
  ASSERT_TRUE((*pkg)->LoadConstants(Weights(**pkg)).ok());
  auto graph = PackageGraph::Capture(pkg->get(), {torch::zeros({1, 77}, torch::kLong)});
  EXPECT_EQ(graph.status().code(), absl::StatusCode::kFailedPrecondition) << graph.status();
  EXPECT_NE(graph.status().message().find("CUDA graphs need a CUDA package"), std::string::npos);

  StepProfiler profiler(c10::kCPU);
  profiler.BeginStep();
  auto out = (*pkg)->Run({torch::zeros({1, 77}, torch::kLong)});  // no sync check on the CPU
  ASSERT_TRUE(out.ok()) << out.status();
  profiler.EndStep();
  const auto r = profiler.Finish();
  EXPECT_FALSE(r.sync_checked);
  EXPECT_TRUE(r.step_ms.empty());
}

}  // namespace
}  // namespace kiln::pipeline
