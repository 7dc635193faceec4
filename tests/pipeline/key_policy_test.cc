// Tests of KeyPolicy (pipeline/key_policy.h): which resolutions a pipeline serves, the bucket
// each component's package depends on, and the artifact keys built from them (fp8's shared bf16
// packages, the compile options' digest, target and toolchain). No LibTorch work, no fixtures.
#include "pipeline/key_policy.h"

#include "pipeline/flux_pipeline.h"

#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "pipeline/toolchain.h"

namespace kiln::pipeline {
namespace {

using ::testing::HasSubstr;

KeyPolicyOptions Options(const std::string& precision = "fp32",
                         const std::string& target = "cpu") {
  KeyPolicyOptions o;
  for (const auto& c : FluxComponents()) o.configs[c] = {{"_class_name", c}, {"width", 8}};
  o.precision = precision;
  o.compile_options = cache::DefaultCompileOptions();
  o.target = target;
  o.resolutions = {{256, 256}, {512, 256}};
  o.clip_len = 77;
  o.text_len = 64;
  o.vae_scale = 8;
  return o;
}

TEST(KeyPolicyTest, OnlyServedResolutionsThatPackIntoPatches) {
  KeyPolicy policy(Options());
  EXPECT_TRUE(policy.CheckResolution(256, 256).ok());
  EXPECT_TRUE(policy.CheckResolution(512, 256).ok());
  auto s = policy.CheckResolution(256, 512);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("resolution 256x512 is not one of the compiled buckets: "
                                     "256x256, 512x256"));

  KeyPolicyOptions coarse = Options();
  coarse.vae_scale = 16;  // 2x2 patches of 16-pixel latents: multiples of 32
  coarse.resolutions = {{272, 256}};
  s = KeyPolicy(coarse).CheckResolution(272, 256);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("must be a multiple of 32"));
}

TEST(KeyPolicyTest, EachComponentDependsOnItsOwnBucketFields) {
  KeyPolicy policy(Options());
  auto b = policy.BucketFor("text_encoder", 512, 256);
  EXPECT_EQ(b.height, 0);
  EXPECT_EQ(b.width, 0);
  EXPECT_EQ(b.text_len, 77);
  b = policy.BucketFor("text_encoder_2", 512, 256);
  EXPECT_EQ(b.width, 0);
  EXPECT_EQ(b.text_len, 64);
  b = policy.BucketFor("transformer", 512, 256);
  EXPECT_EQ(b.width, 512);
  EXPECT_EQ(b.height, 256);
  EXPECT_EQ(b.text_len, 64);
  b = policy.BucketFor("vae_decoder", 512, 256);
  EXPECT_EQ(b.width, 512);
  EXPECT_EQ(b.height, 256);
  EXPECT_EQ(b.text_len, 0);
  EXPECT_EQ(policy.BucketFor("transformer", 256, 256).batch, 1);

  // Text encoders are shared by every size; the transformer and the VAE are not.
  const auto small = policy.DigestsFor(256, 256), wide = policy.DigestsFor(512, 256);
  ASSERT_EQ(small.size(), 4u);
  EXPECT_EQ(std::set<std::string>(small.begin(), small.end()).size(), 4u);
  EXPECT_EQ(small[0], wide[0]);
  EXPECT_EQ(small[1], wide[1]);
  EXPECT_NE(small[2], wide[2]);
  EXPECT_NE(small[3], wide[3]);
  EXPECT_EQ(small[2], policy.KeyFor("transformer", 256, 256).Digest());
}

TEST(KeyPolicyTest, Fp8TransformerSharesTheBf16PackagesOfTheOtherComponents) {
  KeyPolicy fp8(Options("fp8", "cuda:sm_90")), bf16(Options("bf16", "cuda:sm_90"));
  EXPECT_EQ(fp8.KeyFor("transformer", 256, 256).precision, "fp8");
  for (const char* c : {"text_encoder", "text_encoder_2", "vae_decoder"}) {
    EXPECT_EQ(fp8.KeyFor(c, 256, 256).precision, "bf16") << c;
    EXPECT_EQ(fp8.KeyFor(c, 256, 256).Digest(), bf16.KeyFor(c, 256, 256).Digest()) << c;
  }
  EXPECT_NE(fp8.KeyFor("transformer", 256, 256).Digest(),
            bf16.KeyFor("transformer", 256, 256).Digest());
}

TEST(KeyPolicyTest, KeysCarryCompileOptionsTargetAndToolchain) {
  KeyPolicyOptions o = Options();
  const cache::ArtifactKey cpu = KeyPolicy(o).KeyFor("transformer", 256, 256);
  EXPECT_TRUE(cpu.Validate().ok()) << cpu.Validate();
  EXPECT_EQ(cpu.compile, cache::CompileOptionsDigest(o.compile_options));
  EXPECT_EQ(cpu.architecture, cache::ArchitectureDigest(o.configs["transformer"]));
  EXPECT_EQ(cpu.target, "cpu");
  EXPECT_EQ(cpu.toolchain.torch, BuildTorchVersion());
  EXPECT_EQ(cpu.toolchain.cuda, "");
  EXPECT_EQ(cpu.toolchain.triton, "");
  // kiln's code revision, on every target (the CPU keys keep it while dropping CUDA and Triton).
  EXPECT_EQ(cpu.toolchain.kiln, cache::BuildKilnRevision());

  o.compile_options["fuse_qkv"] = true;
  const cache::ArtifactKey fused = KeyPolicy(o).KeyFor("transformer", 256, 256);
  EXPECT_EQ(fused.compile, cache::CompileOptionsDigest(o.compile_options));
  EXPECT_NE(fused.Digest(), cpu.Digest());

  const cache::ArtifactKey gpu = KeyPolicy(Options("bf16", "cuda:sm_90")).KeyFor("vae_decoder", 256, 256);
  EXPECT_EQ(gpu.target, "cuda:sm_90");
  EXPECT_EQ(gpu.toolchain.cuda, BuildCudaVersion());
  EXPECT_EQ(gpu.toolchain.triton, BuildTritonVersion());
  EXPECT_EQ(gpu.toolchain.kiln, cache::BuildKilnRevision());
}

TEST(KeyPolicyTest, ResolutionListsParseAndFormat) {
  auto r = ParseResolutions("256x256, 512x768");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(FormatResolutions(*r), "256x256, 512x768");
  auto bad = ParseResolutions("256x256,100x100");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("resolution '100x100'"));
  EXPECT_EQ(ParseResolutions(" , ").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(KeyPolicyTest, TheTransformerLayoutIsPartOfTheKey) {
  KeyPolicyOptions o = Options();
  const std::string plain = KeyPolicy(o).KeyFor("transformer", 256, 256).Digest();
  o.compile_options["layout"] = "whole";
  const std::string whole = KeyPolicy(o).KeyFor("transformer", 256, 256).Digest();
  o.compile_options["layout"] = "regional";
  const std::string regional = KeyPolicy(o).KeyFor("transformer", 256, 256).Digest();
  EXPECT_NE(regional, plain);
  EXPECT_NE(regional, whole);
  // The layout is the transformer's alone: the other components' keys (and the options sent to
  // kiln-compile for them) leave it out, so both layouts share their packages.
  for (const std::string c : {"text_encoder", "text_encoder_2", "vae_decoder"}) {
    EXPECT_EQ(KeyPolicy(o).KeyFor(c, 256, 256).Digest(),
              KeyPolicy(Options()).KeyFor(c, 256, 256).Digest())
        << c;
    EXPECT_FALSE(ComponentCompileOptions(o.compile_options, c).contains("layout")) << c;
  }
  EXPECT_EQ(ComponentCompileOptions(o.compile_options, "transformer")["layout"], "regional");
}

TEST(KeyPolicyTest, APipelineRunsBothLayoutsAndRefusesOthers) {
  PipelineOptions p;
  p.model_dir = "/nonexistent";
  ASSERT_TRUE(p.Validate().ok()) << p.Validate();
  p.compile_options["layout"] = "whole";
  EXPECT_TRUE(p.Validate().ok()) << p.Validate();
  p.compile_options["layout"] = "regional";
  EXPECT_TRUE(p.Validate().ok()) << p.Validate();
  p.compile_options["layout"] = "regionl";
  EXPECT_EQ(p.Validate().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(p.Validate().message()), ::testing::HasSubstr("layout"));
  // One rank's set of a sequence-parallel group cannot run alone.
  p.compile_options["layout"] = "regional";
  p.compile_options["sequence_parallel"] = 1;
  EXPECT_TRUE(p.Validate().ok()) << p.Validate();
  p.compile_options["sequence_parallel"] = 2;
  EXPECT_EQ(p.Validate().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(p.Validate().message()),
              ::testing::HasSubstr("compile_options sequence_parallel: 2 ranks; this pipeline "
                                   "runs one"));
  // With a denoise_loop (parallel::SequenceParallelPipeline's, over the group's ranks) it runs.
  p.denoise_loop = [](DenoiseJob&) { return absl::OkStatus(); };
  EXPECT_TRUE(p.Validate().ok()) << p.Validate();
  p.compile_options["layout"] = "whole";
  EXPECT_THAT(std::string(p.Validate().message()), ::testing::HasSubstr("need layout regional"));
  p.compile_options["layout"] = "regional";
  p.compile_options["sequence_parallel"] = 0;
  EXPECT_THAT(std::string(p.Validate().message()), ::testing::HasSubstr("a rank count"));
}

TEST(KeyPolicyTest, ASequenceParallelTransformerIsKeyedByOneRanksBucket) {
  KeyPolicyOptions o = Options();
  o.resolutions = {{256, 256}, {256, 272}, {512, 256}};
  o.compile_options["layout"] = "regional";
  const KeyPolicy one(o);
  o.compile_options["sequence_parallel"] = 2;
  const KeyPolicy two(o);
  EXPECT_EQ(one.sequence_parallel(), 1);
  EXPECT_EQ(two.sequence_parallel(), 2);
  // The rank's rows (height / 2) and text (text_len / 2); the option itself in the digest.
  auto b = two.BucketFor("transformer", 512, 256);
  EXPECT_EQ(b.height, 128);
  EXPECT_EQ(b.width, 512);
  EXPECT_EQ(b.text_len, 32);
  EXPECT_NE(two.KeyFor("transformer", 512, 256).compile,
            one.KeyFor("transformer", 512, 256).compile);
  // The other components are the single-rank pipeline's.
  for (const std::string c : {"text_encoder", "text_encoder_2", "vae_decoder"}) {
    EXPECT_EQ(two.KeyFor(c, 512, 256).Digest(), one.KeyFor(c, 512, 256).Digest()) << c;
  }
  EXPECT_TRUE(two.CheckResolution(256, 256).ok());
  // 272 px = 17 patch rows: not whole rows per rank.
  auto s = two.CheckResolution(256, 272);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("its 17 patch rows do not divide over 2 sequence-parallel"));
  EXPECT_TRUE(one.CheckResolution(256, 272).ok());
  o.text_len = 63;
  auto t = KeyPolicy(o).CheckResolution(256, 256);
  EXPECT_EQ(t.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(t.message(), HasSubstr("text length 63 does not divide over 2"));
}

// Compile option process_group (docs/multi_gpu.md): the name of the group a sequence-parallel
// set's all-to-alls resolve. Absent and "0" are one key (the keys made before it stay); another
// name is another transformer key, the other components' keys never change. Twin of
// test_regional.py's test_process_group_option_keys_and_names_the_all_to_alls.
TEST(KeyPolicyTest, TheProcessGroupNameIsPartOfTheTransformerKeyUnlessItIsTheDefault) {
  KeyPolicyOptions o = Options();
  o.compile_options["layout"] = "regional";
  o.compile_options["sequence_parallel"] = 2;
  const KeyPolicy absent(o);
  o.compile_options["process_group"] = "0";
  const KeyPolicy zero(o);
  o.compile_options["process_group"] = "flux-tiny/fp32";
  const KeyPolicy named(o);
  EXPECT_EQ(ProcessGroupName(absent.options().compile_options), "0");
  EXPECT_EQ(ProcessGroupName(named.options().compile_options), "flux-tiny/fp32");
  EXPECT_EQ(zero.KeyFor("transformer", 256, 256).Digest(),
            absent.KeyFor("transformer", 256, 256).Digest());
  EXPECT_NE(named.KeyFor("transformer", 256, 256).Digest(),
            absent.KeyFor("transformer", 256, 256).Digest());
  for (const std::string c : {"text_encoder", "text_encoder_2", "vae_decoder"}) {
    EXPECT_EQ(named.KeyFor(c, 256, 256).Digest(), absent.KeyFor(c, 256, 256).Digest()) << c;
    EXPECT_FALSE(ComponentCompileOptions(o.compile_options, c).contains("process_group")) << c;
  }
  // What a pipeline accepts: a name of a model name's characters, only for a set of P > 1.
  PipelineOptions p;
  p.model_dir = "/nonexistent";
  p.denoise_loop = [](DenoiseJob&) { return absl::OkStatus(); };
  p.compile_options = o.compile_options;
  EXPECT_TRUE(p.Validate().ok()) << p.Validate();
  for (const nlohmann::json& bad : {nlohmann::json(""), nlohmann::json(2),
                                    nlohmann::json("a b"), nlohmann::json(std::string(257, 'a'))}) {
    p.compile_options["process_group"] = bad;
    EXPECT_EQ(p.Validate().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(p.Validate().message()),
                HasSubstr("compile_options process_group: " + bad.dump() + " (want 1..256"));
  }
  p.compile_options["process_group"] = "flux-tiny/fp32";
  p.compile_options["sequence_parallel"] = 1;
  EXPECT_THAT(std::string(p.Validate().message()),
              HasSubstr("there is none without sequence_parallel > 1"));
  p.compile_options["process_group"] = "0";
  EXPECT_TRUE(p.Validate().ok()) << p.Validate();
}

TEST(KeyPolicyTest, CompileOptionsFlagIsMergedOverTheDefaults) {
  auto parsed = ParseCompileOptions(R"({"layout":"regional"})");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  nlohmann::json want = cache::DefaultCompileOptions();
  want["layout"] = "regional";
  EXPECT_EQ(*parsed, want);
  auto changed = ParseCompileOptions(R"({"max_autotune":true})");
  ASSERT_TRUE(changed.ok());
  EXPECT_EQ((*changed)["max_autotune"], true);
  EXPECT_EQ((*changed)["attention"], "cudnn");
  EXPECT_EQ(ParseCompileOptions("[1]").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kiln::pipeline
