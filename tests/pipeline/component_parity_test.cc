// Each compiled flux-tiny package, run through the C++ runtime with the repository's weights
// (ComponentWeights → AotiPackage), against the same component run eagerly in PyTorch on the same
// inputs (tests/pipeline/ref_component.py). Needs the fixtures made by scripts/test.sh.
#include <filesystem>

#include "cache/local_disk_store.h"
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

class ComponentParityTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ComponentParityTest, CompiledMatchesEager) {
  const std::string component = GetParam();
  ASSERT_TRUE(std::filesystem::exists(TinyPackages())) << "run via scripts/test.sh (fixtures)";
  PipelineOptions opts;
  opts.model_dir = TinyRepo();
  opts.package_dir = TinyPackages();
  opts.allow_compile = false;
  auto pipeline = FluxPipeline::Create(opts);
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();
  const auto key = (*pipeline)->KeyFor(component, 256, 256);

  kiln::testing::TempDir tmp;
  const std::string ref = tmp.Join("ref_" + component + ".safetensors");
  auto py = RunPython("tests/pipeline/ref_component.py",
                      {TinyRepo(), component, "256", "256",
                       std::to_string(key.bucket.text_len ? key.bucket.text_len
                                                          : (*pipeline)->text_len()),
                       ref});
  ASSERT_TRUE(py.ok()) << py.status();

  cache::LocalDiskStore store(TinyPackages());
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

INSTANTIATE_TEST_SUITE_P(FluxTiny, ComponentParityTest,
                         ::testing::Values("text_encoder", "text_encoder_2", "transformer",
                                           "vae_decoder"));

}  // namespace
}  // namespace kiln::pipeline
