// Each compiled flux-tiny package, run through the C++ runtime with the repository's weights
// (ComponentWeights → AotiPackage), against the same component run eagerly in PyTorch on the same
// inputs (tests/pipeline/ref_component.py). Needs the fixtures made by scripts/test.sh; the fused
// QKV case compiles its own transformer package (~20 s).
#include <cstdlib>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "cache/local_disk_store.h"
#include "cache/package_provider.h"
#include "gtest/gtest.h"
#include "pipeline/aoti_package.h"
#include "pipeline/flux_pipeline.h"
#include "pipeline/weights.h"
#include "tests/pipeline/test_support.h"

namespace kiln::pipeline {
namespace {

using kiln::testing::EnvOrEmpty;
using kiln::testing::RunPython;

// The seeded flux-tiny repository and its compiled packages, made once by scripts/test.sh.
std::string TinyRepo() { return EnvOrEmpty("KILN_TESTDATA") + "/flux-tiny"; }
std::string TinyPackages() { return EnvOrEmpty("KILN_TESTDATA") + "/packages"; }

// Runs ref_component.py for `component` with `compile_options`, then the package of `key` from
// `packages` through ComponentWeights → AotiPackage, and compares.
void ExpectParity(const std::string& component, const cache::ArtifactKey& key, int text_len,
                  const std::string& packages, const nlohmann::json& compile_options) {
  kiln::testing::TempDir tmp;
  const std::string ref = tmp.Join("ref_" + component + ".safetensors");
  auto py = RunPython("tests/pipeline/ref_component.py",
                      {TinyRepo(), component, "256", "256", std::to_string(text_len), ref,
                       compile_options.dump()});
  ASSERT_TRUE(py.ok()) << py.status();

  cache::LocalDiskStore store(packages);
  auto located = store.Find(key);
  ASSERT_TRUE(located.ok()) << located.status();
  auto pkg = AotiPackage::Load(*located, c10::kCPU);
  ASSERT_TRUE(pkg.ok()) << pkg.status();
  auto weights = ComponentWeights::Open(TinyRepo() + "/" + ComponentWeights::FolderFor(component),
                                        ComponentWeights::StemFor(component), c10::kCPU);
  ASSERT_TRUE(weights.ok()) << weights.status();
  auto constants = (*weights)->Gather(**pkg, located->extra_constants_path);
  ASSERT_TRUE(constants.ok()) << constants.status();
  ASSERT_TRUE((*pkg)->LoadConstants(*constants).ok());

  auto file = SafetensorsFile::Open(ref);
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<at::Tensor> inputs;
  for (size_t i = 0; (*file)->Find("input." + std::to_string(i)) != nullptr; ++i) {
    inputs.push_back(TensorFromView(*(*file)->Find("input." + std::to_string(i)))->clone());
  }
  at::Tensor expected = TensorFromView(*(*file)->Find("output.0"))->clone();
  auto out = (*pkg)->Run(inputs);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ((*out)[0].sizes(), expected.sizes());
  // fp32 on both sides; Inductor fuses and reorders reductions (matmul blocking, softmax, norms),
  // so results differ by accumulated rounding only: ~1e-6 relative per op over a few dozen ops.
  // 1e-4 of the output's scale leaves headroom while any real error (wrong weight, wrong layout,
  // missing RoPE/modulation term) moves outputs by O(1) of their scale.
  const double scale = expected.abs().max().item<double>();
  const double err = ((*out)[0] - expected).abs().max().item<double>();
  EXPECT_GT(scale, 0.0);
  EXPECT_LE(err, 1e-4 * std::max(scale, 1.0)) << component << ": max abs error " << err
                                               << " at output scale " << scale;
}

absl::StatusOr<std::unique_ptr<FluxPipeline>> TinyPipeline(const nlohmann::json& options) {
  PipelineOptions opts;
  opts.model_dir = TinyRepo();
  opts.compile_options = options;
  cache::TieredProviderConfig config;  // the fixtures' packages only, never compiling
  config.local.root = TinyPackages();
  auto provider = cache::OpenTieredProvider(std::move(config), nullptr);
  if (!provider.ok()) return provider.status();
  return FluxPipeline::Create(opts, *std::move(provider));
}

class ComponentParityTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ComponentParityTest, CompiledMatchesEager) {
  const std::string component = GetParam();
  ASSERT_TRUE(std::filesystem::exists(TinyPackages())) << "run via scripts/test.sh (fixtures)";
  auto pipeline = TinyPipeline(cache::DefaultCompileOptions());
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();
  const auto key = (*pipeline)->KeyFor(component, 256, 256);
  ExpectParity(component, key, key.bucket.text_len ? key.bucket.text_len : (*pipeline)->text_len(),
               TinyPackages(), cache::DefaultCompileOptions());
}

// The transformer compiled with fused QKV projections: the package asks for to_qkv / add_qkv_proj
// constants that the loader derives from the checkpoint's separate q, k, v tensors (concat0).
TEST(FusedQkvParityTest, CompiledFusedTransformerMatchesEager) {
  ASSERT_TRUE(std::filesystem::exists(TinyPackages())) << "run via scripts/test.sh (fixtures)";
  nlohmann::json options = cache::DefaultCompileOptions();
  options["fuse_qkv"] = true;
  auto pipeline = TinyPipeline(options);
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();
  const auto key = (*pipeline)->KeyFor("transformer", 256, 256);
  kiln::testing::TempDir packages;
  const std::string cmd = absl::StrCat(
      kiln::testing::ShellQuote(EnvOrEmpty("KILN_BIN") + "/kiln-compile"),
      " --model ", kiln::testing::ShellQuote(TinyRepo()),
      " --component transformer --precision fp32 --height 256 --width 256 --text-len ",
      key.bucket.text_len, " --target cpu --compile-options ",
      kiln::testing::ShellQuote(options.dump()), " --out-root ",
      kiln::testing::ShellQuote(packages.path()), " > ", packages.Join("compile.log"), " 2>&1");
  ASSERT_EQ(std::system(cmd.c_str()), 0)
      << kiln::testing::ReadFileOrDie(packages.Join("compile.log"));

  auto manifest = cache::PackageManifest::FromFile(packages.path() + "/" + key.Digest() +
                                                   "/manifest.json");
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  const auto& c = manifest->constants;
  EXPECT_EQ(c.count("transformer_blocks.0.attn.to_q.weight"), 0u);
  ASSERT_EQ(c.count("transformer_blocks.1.attn.add_qkv_proj.weight"), 1u);
  const auto& fused = c.at("transformer_blocks.1.attn.add_qkv_proj.weight");
  EXPECT_EQ(fused.derive.op, "concat0");
  EXPECT_EQ(fused.derive.sources, (std::vector<std::string>{
                                      "transformer_blocks.1.attn.add_q_proj.weight",
                                      "transformer_blocks.1.attn.add_k_proj.weight",
                                      "transformer_blocks.1.attn.add_v_proj.weight"}));
  EXPECT_EQ(c.at("single_transformer_blocks.0.attn.to_qkv.bias").derive.op, "concat0");
  EXPECT_TRUE(c.at("single_transformer_blocks.0.proj_out.weight").derive.op.empty());

  ExpectParity("transformer", key, key.bucket.text_len, packages.path(), options);
}

INSTANTIATE_TEST_SUITE_P(FluxTiny, ComponentParityTest,
                         ::testing::Values("text_encoder", "text_encoder_2", "transformer",
                                           "vae_decoder"));

}  // namespace
}  // namespace kiln::pipeline
