// RegionalTransformer (pipeline/regional.h) on the flux-tiny fixtures of scripts/test.sh: the
// regional set in KILN_TESTDATA/packages-regional (compiled on a miss by kiln-run with
// --compile_options '{"layout":"regional"}') beside the whole-graph package of the same bucket.
// The loop over layers gives the whole-graph package's output bit for bit on the same inputs
// (the same Inductor CPU kernels on the same values); it refuses to run before its weights and
// checks its inputs; a malformed region table is DataLoss; a checkpoint without the layers'
// tensors is NotFound naming them.
#include "pipeline/regional.h"

#include <filesystem>

#include "cache/package_dir.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "pipeline/aoti_package.h"
#include "pipeline/flux_pipeline.h"
#include "pipeline/weights.h"
#include "tests/pipeline/test_support.h"

namespace kiln::pipeline {
namespace {
namespace fs = std::filesystem;
using kiln::testing::EnvOrEmpty;
using ::testing::HasSubstr;

std::string Testdata() { return EnvOrEmpty("KILN_TESTDATA"); }
std::string TinyRepo() { return Testdata() + "/flux-tiny"; }
std::string RegionalPackages() { return Testdata() + "/packages-regional"; }

class RegionalTransformerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(RegionalPackages())) {
      GTEST_SKIP() << "needs " << RegionalPackages() << " (scripts/test.sh makes it)";
    }
    for (const bool regional : {false, true}) {
      PipelineOptions o;
      o.model_dir = TinyRepo();
      if (regional) o.compile_options["layout"] = "regional";
      auto p = FluxPipeline::Create(o, std::make_shared<NoProvider>());
      ASSERT_TRUE(p.ok()) << p.status();
      const auto key = (*p)->KeyFor("transformer", 256, 256);
      auto found = cache::VerifyPackageDir(RegionalPackages() + "/" + key.Digest(), key);
      ASSERT_TRUE(found.ok()) << found.status();
      (regional ? set_ : whole_) = *found;
    }
    ASSERT_EQ(set_.manifest.layout, "regional");
    auto w = ComponentWeights::Open(TinyRepo() + "/transformer", "diffusion_pytorch_model",
                                    c10::kCPU);
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = *std::move(w);
    // The whole-graph transformer's inputs, seeded.
    at::manual_seed(3);
    for (const auto& spec : set_.manifest.inputs) {
      if (spec.name == "timestep") {
        inputs_.push_back(torch::full(spec.shape, 0.5f));
      } else if (spec.name == "guidance") {
        inputs_.push_back(torch::full(spec.shape, 3.5f));
      } else {
        inputs_.push_back(torch::randn(spec.shape));
      }
    }
  }

  // Keys only: the pipeline is created to compute them, never asked for a package.
  class NoProvider : public cache::PackageProvider {
   public:
    absl::StatusOr<cache::ProvidedPackage> Get(const cache::PackageRequest&) override {
      return absl::UnimplementedError("keys only");
    }
    bool can_compile() const override { return false; }
    absl::Status Quarantine(const cache::ArtifactKey&, const std::string&,
                            const std::string&) override {
      return absl::OkStatus();
    }
  };

  cache::LocatedPackage whole_, set_;
  std::unique_ptr<ComponentWeights> weights_;
  std::vector<at::Tensor> inputs_;
};

TEST_F(RegionalTransformerTest, TheLoopOverLayersIsTheWholeGraphBitForBit) {
  torch::NoGradGuard no_grad;
  auto whole = AotiPackage::Load(whole_, c10::kCPU);
  ASSERT_TRUE(whole.ok()) << whole.status();
  auto constants = weights_->Gather(**whole, whole_.extra_constants_path);
  ASSERT_TRUE(constants.ok()) << constants.status();
  ASSERT_TRUE((*whole)->LoadConstants(*constants).ok());
  auto expected = (*whole)->RunFirst(inputs_);
  ASSERT_TRUE(expected.ok()) << expected.status();

  auto set = RegionalTransformer::Load(set_, c10::kCPU);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ((*set)->layers("head"), 1);
  EXPECT_EQ((*set)->layers("double"), 2);
  EXPECT_EQ((*set)->layers("single"), 2);
  EXPECT_EQ((*set)->layers("tail"), 1);
  ASSERT_TRUE((*set)->LoadWeights(*weights_).ok());
  EXPECT_GT((*set)->weight_bytes(), 0u);
  auto got = (*set)->RunOn(inputs_, nullptr);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), 1u);
  EXPECT_TRUE(torch::equal((*got)[0], *expected))
      << "max |diff| " << ((*got)[0] - *expected).abs().max().item<float>();
  // Deterministic across calls (the held weights are not modified by a run).
  auto again = (*set)->RunOn(inputs_, nullptr);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(torch::equal((*again)[0], (*got)[0]));
}

TEST_F(RegionalTransformerTest, RefusesToRunBeforeItsWeightsAndChecksInputs) {
  torch::NoGradGuard no_grad;
  auto set = RegionalTransformer::Load(set_, c10::kCPU);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ((*set)->RunOn(inputs_, nullptr).status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*set)->LoadWeights(*weights_).ok());
  // An ordinary set has one rank: 0.
  EXPECT_EQ((*set)->sequence_parallel(), 1);
  EXPECT_TRUE((*set)->SetSequenceParallelRank(0).ok());
  EXPECT_EQ((*set)->SetSequenceParallelRank(1).code(), absl::StatusCode::kInvalidArgument);
  auto few = (*set)->RunOn({inputs_[0]}, nullptr);
  EXPECT_EQ(few.status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<at::Tensor> bad = inputs_;
  bad[0] = torch::zeros({1, 3, 64});
  auto shaped = (*set)->RunOn(bad, nullptr);
  EXPECT_EQ(shaped.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(shaped.status().message(), HasSubstr("region head layer 0"));
  EXPECT_THAT(shaped.status().message(), HasSubstr("hidden_states"));
}

TEST_F(RegionalTransformerTest, MalformedRegionTableIsDataLoss) {
  cache::LocatedPackage no_head = set_;
  no_head.manifest.raw["regions"].erase("head");
  auto a = RegionalTransformer::Load(no_head, c10::kCPU);
  EXPECT_EQ(a.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(a.status().message(), HasSubstr("no head region"));
  cache::LocatedPackage no_layers = set_;
  no_layers.manifest.raw["regions"]["double"].erase("layers");
  auto b = RegionalTransformer::Load(no_layers, c10::kCPU);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(b.status().message(), HasSubstr("region double"));
  cache::LocatedPackage whole = whole_;
  EXPECT_EQ(RegionalTransformer::Load(whole, c10::kCPU).status().code(),
            absl::StatusCode::kDataLoss);
  // A sequence-parallel set must say which process group its all-to-alls resolve, and its
  // rank count must be one.
  cache::LocatedPackage sp = set_;
  sp.manifest.raw["compile_options"]["sequence_parallel"] = 2;
  auto c = RegionalTransformer::Load(sp, c10::kCPU);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(c.status().message(), HasSubstr("without the process_group"));
  sp.manifest.raw["compile_options"]["sequence_parallel"] = 0;
  auto d = RegionalTransformer::Load(sp, c10::kCPU);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(d.status().message(), HasSubstr("sequence_parallel 0 is not a rank count"));
}

TEST_F(RegionalTransformerTest, ACheckpointWithoutTheLayersIsNotFound) {
  auto set = RegionalTransformer::Load(set_, c10::kCPU);
  ASSERT_TRUE(set.ok()) << set.status();
  // The VAE's checkpoint holds none of the transformer's tensors.
  auto vae = ComponentWeights::Open(TinyRepo() + "/vae", "diffusion_pytorch_model", c10::kCPU);
  ASSERT_TRUE(vae.ok()) << vae.status();
  auto s = (*set)->LoadWeights(**vae);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("transformer_blocks.0.norm1.linear.weight"));
}

}  // namespace
}  // namespace kiln::pipeline
