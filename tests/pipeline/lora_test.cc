// LoRAs merged by the pipeline without recompiling, on the flux-tiny fixtures (scripts/test.sh):
// two seeded LoRAs (kiln.make_lora: one in the diffusers/PEFT layout with alpha, one in kohya's
// Black Forest Labs layout with fused QKV / linear1 factors) applied together make the image of
// the same model with the LoRAs merged eagerly by the Python reference (kiln.make_lora merge),
// within the tolerance below; switching back to no LoRA gives the fixture's base PNG byte for
// byte; the same set again switches nothing. A missing, misshaped, unknown, unverified or
// undigested LoRA is an error naming the file (and the tensor), and leaves the weights as they
// were.
//
// Tolerance: every RGB byte within 1 of the reference. Both sides compute
// W + Σ scale·(alpha/r)·(B·A) in float32 with the same torch ops, so the images are expected to
// be equal; one unit allows for a matmul whose blocking differs with the split of a fused
// factor (kohya's qkv rows multiplied per target here, as one matrix nowhere).
#include "pipeline/lora.h"

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <iostream>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cache/package_provider.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "pipeline/flux_pipeline.h"
#include "pipeline/png.h"
#include "tests/pipeline/fixture_provider.h"
#include "tests/pipeline/test_support.h"

namespace kiln::pipeline {
namespace {
namespace fs = std::filesystem;
using kiln::testing::EnvOrEmpty;
using kiln::testing::FixtureProvider;
using ::testing::HasSubstr;

std::string TestData() { return EnvOrEmpty("KILN_TESTDATA"); }
constexpr char kMakeLora[] = "pipeline/python/kiln/make_lora.py";

std::unique_ptr<FluxPipeline> Pipeline(const std::string& model_dir,
                                       std::vector<std::string> lora_dirs) {
  PipelineOptions o;
  o.model_dir = model_dir;
  o.lora_dirs = std::move(lora_dirs);
  auto p = FluxPipeline::Create(o, FixtureProvider());
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? *std::move(p) : nullptr;
}

// The request scripts/test.sh made first.png with.
GenerateRequest FixtureRequest(std::vector<LoraChoice> loras = {}) {
  GenerateRequest r;
  r.prompt = "a lighthouse on a cliff at dusk";
  r.width = 256;
  r.height = 256;
  r.steps = 4;
  r.seed = 7;
  r.loras = std::move(loras);
  return r;
}

std::string Png(const GenerateResult& r) {
  auto png = EncodePng(r.rgb.data(), r.width, r.height);
  EXPECT_TRUE(png.ok()) << png.status();
  return png.ok() ? std::string(png->begin(), png->end()) : "";
}

// Writes a float32 safetensors file of zeros with the given tensor shapes.
void WriteZeros(const std::string& path, const std::map<std::string, std::vector<int64_t>>& shapes) {
  nlohmann::json header = nlohmann::json::object();
  size_t offset = 0;
  for (const auto& [name, shape] : shapes) {
    size_t n = 4;
    for (auto d : shape) n *= d;
    header[name] = {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string h = header.dump();
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((h.size() >> (8 * i)) & 0xff);
  bytes += h + std::string(offset, '\0');
  kiln::testing::WriteFileOrDie(path, bytes);
}

// Records `path`'s digest beside it, as sha256sum writes it.
void RecordDigest(const std::string& path) {
  auto hex = kiln::testing::RunPython(kMakeLora, {"digest", path});
  ASSERT_TRUE(hex.ok()) << hex.status();
}

class LoraTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(TestData() + "/first.png") || !kiln::testing::HavePython()) {
      GTEST_SKIP() << "run via scripts/test.sh (fixtures, KILN_PYTHON)";
    }
    model_ = TestData() + "/flux-tiny";
    loras_ = dir_.Join("loras");
    for (const auto& args : std::vector<std::vector<std::string>>{
             {"make", "--model", model_, "--out", loras_, "--name", "style", "--layout", "peft",
              "--rank", "4", "--alpha", "2", "--seed", "0"},
             {"make", "--model", model_, "--out", loras_, "--name", "kohya-style", "--layout",
              "kohya", "--rank", "8", "--seed", "1"}}) {
      auto made = kiln::testing::RunPython(kMakeLora, args);
      ASSERT_TRUE(made.ok()) << made.status();
    }
  }
  kiln::testing::TempDir dir_;
  std::string model_;
  std::string loras_;
};

TEST_F(LoraTest, MergedLorasMatchTheEagerMergeAndSwitchingBackGivesTheBaseBytes) {
  const std::vector<LoraChoice> set = {{"style", 0.8}, {"kohya-style", -0.5}};
  const std::string merged = dir_.Join("merged");
  auto ref_made = kiln::testing::RunPython(
      kMakeLora, {"merge", "--model", model_, "--out", merged, "--lora",
                  loras_ + "/style.safetensors:0.8", "--lora",
                  loras_ + "/kohya-style.safetensors:-0.5"});
  ASSERT_TRUE(ref_made.ok()) << ref_made.status();

  auto pipeline = Pipeline(model_, {loras_});
  ASSERT_NE(pipeline, nullptr);
  const std::string base_png = kiln::testing::ReadFileOrDie(TestData() + "/first.png");
  auto base = pipeline->Generate(FixtureRequest());
  ASSERT_TRUE(base.ok()) << base.status();
  EXPECT_EQ(Png(*base), base_png);
  EXPECT_FALSE(base->lora_switched);

  auto with = pipeline->Generate(FixtureRequest(set));
  ASSERT_TRUE(with.ok()) << with.status();
  EXPECT_TRUE(with->lora_switched);
  EXPECT_EQ(with->loras, "style@0.800000012,kohya-style@-0.5");
  EXPECT_EQ(pipeline->applied_loras(), with->loras);
  EXPECT_EQ(with->packages.at("transformer"), "resident");  // no package loaded for the LoRA

  auto reference_pipeline = Pipeline(merged, {});
  ASSERT_NE(reference_pipeline, nullptr);
  auto reference = reference_pipeline->Generate(FixtureRequest());
  ASSERT_TRUE(reference.ok()) << reference.status();
  ASSERT_EQ(with->rgb.size(), reference->rgb.size());
  int max_diff = 0, differ_from_base = 0;
  for (size_t i = 0; i < with->rgb.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(int(with->rgb[i]) - int(reference->rgb[i])));
    differ_from_base += with->rgb[i] != base->rgb[i];
  }
  EXPECT_LE(max_diff, 1) << "kiln's merge differs from the eager reference merge";
  std::cout << "largest RGB difference from the eager merge: " << max_diff << "\n";
  // The LoRAs change the picture (the comparison above would pass for an unapplied set too if
  // they did not).
  EXPECT_GT(differ_from_base, static_cast<int>(with->rgb.size() / 2));

  auto again = pipeline->Generate(FixtureRequest(set));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->lora_switched);
  EXPECT_EQ(again->rgb, with->rgb);

  auto back = pipeline->Generate(FixtureRequest());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->lora_switched);
  EXPECT_EQ(back->loras, "");
  EXPECT_EQ(Png(*back), base_png) << "switching back did not restore the base weights exactly";
}

// The regional layout (packages-regional: the transformer as one package per block type, every
// layer's weights run-time inputs) merges a set into each layer's weight inputs by the same rules
// as the whole layout: the image with the set equals the whole layout's with the same set, byte
// for byte (the regional loop is the whole graph bit for bit on the CPU, regional_test.cc, and the
// merged weights are the same tensors, so any difference is a bug), and differs from the base;
// the set is merged ahead in the encoding and only swapped at the switch; back to none gives the
// fixture's base PNG byte for byte.
TEST_F(LoraTest, TheRegionalLayoutMergesASetAsTheWholeLayoutDoes) {
  if (!fs::is_directory(TestData() + "/packages-regional")) {
    GTEST_SKIP() << "needs packages-regional (scripts/test.sh makes it)";
  }
  const std::vector<LoraChoice> set = {{"style", 0.8}, {"kohya-style", -0.5}};
  auto whole = Pipeline(model_, {loras_});
  ASSERT_NE(whole, nullptr);
  auto want = whole->Generate(FixtureRequest(set));
  ASSERT_TRUE(want.ok()) << want.status();
  whole.reset();

  PipelineOptions o;
  o.model_dir = model_;
  o.lora_dirs = {loras_};
  o.compile_options["layout"] = "regional";
  auto regional = FluxPipeline::Create(o, FixtureProvider("packages-regional"));
  ASSERT_TRUE(regional.ok()) << regional.status();
  const std::string base_png = kiln::testing::ReadFileOrDie(TestData() + "/first.png");
  auto base = (*regional)->Generate(FixtureRequest());
  ASSERT_TRUE(base.ok()) << base.status();
  EXPECT_EQ(Png(*base), base_png);

  auto with = (*regional)->Generate(FixtureRequest(set));
  ASSERT_TRUE(with.ok()) << with.status();
  EXPECT_TRUE(with->lora_switched);
  EXPECT_TRUE(with->lora_prepared) << "the set was not merged ahead in the encoding";
  EXPECT_EQ(with->loras, "style@0.800000012,kohya-style@-0.5");
  EXPECT_EQ((*regional)->applied_loras(), with->loras);
  EXPECT_EQ(with->packages.at("transformer"), "resident");
  ASSERT_EQ(with->rgb.size(), want->rgb.size());
  int max_diff = 0, differ_from_base = 0;
  for (size_t i = 0; i < with->rgb.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(int(with->rgb[i]) - int(want->rgb[i])));
    differ_from_base += with->rgb[i] != base->rgb[i];
  }
  std::cout << "regional vs whole layout with the set: largest RGB difference " << max_diff
            << "; switch " << with->seconds.lora_switch << " s, merged ahead in "
            << with->seconds.lora_prepare << " s\n";
  EXPECT_EQ(max_diff, 0) << "the regional layout merged the set otherwise than the whole one";
  EXPECT_GT(differ_from_base, static_cast<int>(with->rgb.size() / 2));

  auto back = (*regional)->Generate(FixtureRequest());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->lora_switched);
  EXPECT_EQ(back->loras, "");
  EXPECT_EQ(Png(*back), base_png) << "switching back did not restore the base weights exactly";
}

// The node's overlapped stages encode the next job while the current one denoises: a LoRA job
// encoded behind a base job (and the reverse) must not change the weights the job before it
// denoises with; the switch happens at the start of its own DenoiseDecode.
TEST_F(LoraTest, AJobEncodedAheadSwitchesOnlyWhenItsDenoiseStarts) {
  const std::vector<LoraChoice> set = {{"style", 0.8}};
  auto pipeline = Pipeline(model_, {loras_});
  ASSERT_NE(pipeline, nullptr);
  const std::string base_png = kiln::testing::ReadFileOrDie(TestData() + "/first.png");

  auto base_encoded = pipeline->EncodePrompt(FixtureRequest());
  ASSERT_TRUE(base_encoded.ok()) << base_encoded.status();
  auto lora_encoded = pipeline->EncodePrompt(FixtureRequest(set));  // the prefetched job
  ASSERT_TRUE(lora_encoded.ok()) << lora_encoded.status();
  EXPECT_EQ(pipeline->applied_loras(), "");
  auto base = pipeline->DenoiseDecode(*std::move(base_encoded));
  ASSERT_TRUE(base.ok()) << base.status();
  EXPECT_FALSE(base->lora_switched);
  EXPECT_EQ(Png(*base), base_png) << "the job before ran with the next job's LoRA";
  auto with = pipeline->DenoiseDecode(*std::move(lora_encoded));
  ASSERT_TRUE(with.ok()) << with.status();
  EXPECT_TRUE(with->lora_switched);
  EXPECT_EQ(with->loras, "style@0.800000012");
  EXPECT_EQ(pipeline->applied_loras(), with->loras);
  EXPECT_NE(with->rgb, base->rgb);

  // And back: a base job encoded while the LoRA job waits to denoise.
  auto lora_again = pipeline->EncodePrompt(FixtureRequest(set));
  ASSERT_TRUE(lora_again.ok()) << lora_again.status();
  auto base_again = pipeline->EncodePrompt(FixtureRequest());
  ASSERT_TRUE(base_again.ok()) << base_again.status();
  auto again = pipeline->DenoiseDecode(*std::move(lora_again));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->lora_switched);
  EXPECT_EQ(again->rgb, with->rgb);
  auto back = pipeline->DenoiseDecode(*std::move(base_again));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->lora_switched);
  EXPECT_EQ(Png(*back), base_png);

  // A LoRA that cannot be read fails its encoding, before the job before it is touched.
  auto missing = pipeline->EncodePrompt(FixtureRequest({{"nope", 1}}));
  EXPECT_TRUE(absl::IsNotFound(missing.status())) << missing.status();
  EXPECT_EQ(pipeline->applied_loras(), "");
}

// PipelineOptions::lora_prepare_ahead: a LoRA job's encoding, run while the job before it is in
// the middle of its denoise loop (its progress callback holds it after step 1 until the encoding
// is done, so the merge into new weight tensors happens between its steps), merges its set
// there; the job before still gives the base bytes (a merge that touched the weights in use
// would change its remaining steps), and the LoRA job's switch only loads the prepared tensors
// and gives the bytes of the switch merged at denoise time (lora_prepare_ahead off). A set
// prepared and then made stale by a job with another set in between is merged again, not used.
TEST_F(LoraTest, ASetPreparedBesideTheDenoiseBeforeItIsOnlySwappedIn) {
  const std::vector<LoraChoice> set = {{"style", 0.8}};
  const std::vector<LoraChoice> other = {{"kohya-style", -0.5}};
  const std::string base_png = kiln::testing::ReadFileOrDie(TestData() + "/first.png");
  // The reference: the switch as it was, merged at the start of the LoRA job's denoise.
  PipelineOptions ref_options;
  ref_options.model_dir = model_;
  ref_options.lora_dirs = {loras_};
  ref_options.lora_prepare_ahead = false;
  auto ref_pipeline = FluxPipeline::Create(ref_options, FixtureProvider());
  ASSERT_TRUE(ref_pipeline.ok()) << ref_pipeline.status();
  auto ref = (*ref_pipeline)->Generate(FixtureRequest(set));
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_TRUE(ref->lora_switched);
  EXPECT_FALSE(ref->lora_prepared);
  EXPECT_EQ(ref->seconds.lora_prepare, 0);
  auto ref_other = (*ref_pipeline)->Generate(FixtureRequest(other));
  ASSERT_TRUE(ref_other.ok()) << ref_other.status();

  auto pipeline = Pipeline(model_, {loras_});
  ASSERT_NE(pipeline, nullptr);
  auto base_encoded = pipeline->EncodePrompt(FixtureRequest());
  ASSERT_TRUE(base_encoded.ok()) << base_encoded.status();
  EXPECT_EQ(base_encoded->partial.seconds.lora_prepare, 0);  // the set merged now: nothing to do

  // The base job denoises on a thread, held after its first step until the LoRA job's encoding
  // (with its merge ahead) is done.
  std::mutex mu;
  std::condition_variable cv;
  bool at_step = false, encoded = false;
  std::thread denoise_thread;
  absl::StatusOr<GenerateResult> base = absl::UnknownError("not run");
  denoise_thread = std::thread([&] {
    base = pipeline->DenoiseDecode(*std::move(base_encoded), [&](const std::string& phase,
                                                                 int step, int) {
      if (phase != "denoising" || step != 1) return;
      std::unique_lock<std::mutex> lock(mu);
      at_step = true;
      cv.notify_all();
      cv.wait_for(lock, std::chrono::seconds(60), [&] { return encoded; });
    });
  });
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return at_step; }));
  }
  auto lora_encoded = pipeline->EncodePrompt(FixtureRequest(set));
  {
    std::lock_guard<std::mutex> lock(mu);
    encoded = true;
    cv.notify_all();
  }
  denoise_thread.join();
  ASSERT_TRUE(lora_encoded.ok()) << lora_encoded.status();
  EXPECT_GT(lora_encoded->partial.seconds.lora_prepare, 0);
  ASSERT_TRUE(base.ok()) << base.status();
  EXPECT_FALSE(base->lora_switched);
  EXPECT_EQ(Png(*base), base_png) << "merging ahead changed the weights the job before ran on";
  EXPECT_EQ(pipeline->applied_loras(), "");

  auto with = pipeline->DenoiseDecode(*std::move(lora_encoded));
  ASSERT_TRUE(with.ok()) << with.status();
  EXPECT_TRUE(with->lora_switched);
  EXPECT_TRUE(with->lora_prepared) << "the switch merged again instead of swapping";
  EXPECT_EQ(with->loras, "style@0.800000012");
  EXPECT_EQ(with->rgb, ref->rgb) << "the set merged ahead differs from the one merged at switch";
  std::cout << "switch prepared ahead: prepare " << with->seconds.lora_prepare << " s, swap "
            << with->seconds.lora_switch << " s; merged at switch: " << ref->seconds.lora_switch
            << " s\n";

  // Back to the base weights, prepared ahead as well: the base bytes.
  auto back = pipeline->Generate(FixtureRequest());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->lora_switched);
  EXPECT_TRUE(back->lora_prepared);
  EXPECT_EQ(Png(*back), base_png);

  // Stale: `set` is prepared for a job that waits; a job with another set runs whole in between
  // (its encoding leaves the pending set alone, its switch merges at denoise time and drops
  // what was prepared). The waiting job then merges its set again.
  auto waiting = pipeline->EncodePrompt(FixtureRequest(set));
  ASSERT_TRUE(waiting.ok()) << waiting.status();
  EXPECT_GT(waiting->partial.seconds.lora_prepare, 0);
  auto between = pipeline->Generate(FixtureRequest(other));
  ASSERT_TRUE(between.ok()) << between.status();
  EXPECT_TRUE(between->lora_switched);
  EXPECT_FALSE(between->lora_prepared);
  EXPECT_EQ(between->seconds.lora_prepare, 0);
  EXPECT_EQ(between->rgb, ref_other->rgb);
  auto late = pipeline->DenoiseDecode(*std::move(waiting));
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_TRUE(late->lora_switched);
  EXPECT_FALSE(late->lora_prepared) << "a stale prepared set was swapped in";
  EXPECT_EQ(late->rgb, ref->rgb);
}

TEST_F(LoraTest, ABadLoraIsAnErrorNamingTheFileAndTensorAndChangesNothing) {
  auto pipeline = Pipeline(model_, {loras_});
  ASSERT_NE(pipeline, nullptr);
  auto expect_error = [&](const std::vector<LoraChoice>& set, absl::StatusCode code,
                          const std::vector<std::string>& words) {
    auto r = pipeline->Generate(FixtureRequest(set));
    EXPECT_EQ(r.status().code(), code) << r.status();
    for (const auto& w : words) EXPECT_THAT(r.status().message(), HasSubstr(w));
  };
  expect_error({{"absent", 1}}, absl::StatusCode::kNotFound, {loras_ + "/absent.safetensors"});

  const std::string misshaped = loras_ + "/misshaped.safetensors";
  WriteZeros(misshaped, {{"transformer.transformer_blocks.0.attn.to_q.lora_A.weight", {4, 31}},
                         {"transformer.transformer_blocks.0.attn.to_q.lora_B.weight", {32, 4}}});
  RecordDigest(misshaped);
  expect_error({{"style", 1}, {"misshaped", 1}}, absl::StatusCode::kInvalidArgument,
               {misshaped, "transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "[4, 31]"});

  const std::string unknown = loras_ + "/unknown.safetensors";
  WriteZeros(unknown, {{"lora_unet_double_blocks_0_img_attn_xyz.lora_down.weight", {4, 32}},
                       {"lora_unet_double_blocks_0_img_attn_xyz.lora_up.weight", {32, 4}}});
  RecordDigest(unknown);
  expect_error({{"unknown", 1}}, absl::StatusCode::kInvalidArgument,
               {unknown, "lora_unet_double_blocks_0_img_attn_xyz.lora_down.weight"});

  const std::string half = loras_ + "/half.safetensors";
  WriteZeros(half, {{"transformer.proj_out.lora_A.weight", {4, 32}}});
  RecordDigest(half);
  expect_error({{"half", 1}}, absl::StatusCode::kInvalidArgument,
               {half, "transformer.proj_out.lora_A.weight", "lora_B"});

  // A file that is not the one whose digest was recorded.
  fs::copy_file(loras_ + "/style.safetensors", loras_ + "/swapped.safetensors");
  kiln::testing::WriteFileOrDie(loras_ + "/swapped.safetensors.sha256",
                                std::string(64, '0') + "  swapped.safetensors\n");
  expect_error({{"swapped", 1}}, absl::StatusCode::kDataLoss,
               {loras_ + "/swapped.safetensors", "differs from the recorded"});
  fs::copy_file(loras_ + "/style.safetensors", loras_ + "/undigested.safetensors");
  expect_error({{"undigested", 1}}, absl::StatusCode::kFailedPrecondition,
               {loras_ + "/undigested.safetensors", "no digest recorded"});

  // None of that changed the weights.
  EXPECT_EQ(pipeline->applied_loras(), "");
  auto base = pipeline->Generate(FixtureRequest());
  ASSERT_TRUE(base.ok()) << base.status();
  EXPECT_EQ(Png(*base), kiln::testing::ReadFileOrDie(TestData() + "/first.png"));
  EXPECT_THAT(pipeline->AvailableLoras(),
              ::testing::ElementsAre("half", "kohya-style", "misshaped", "style", "swapped",
                                     "unknown"));
}

}  // namespace
}  // namespace kiln::pipeline
