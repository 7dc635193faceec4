// Tests of the artifact key: C++ and Python (pipeline/python/kiln/artifact_key.py, run through
// tests/pipeline/ref_artifact_key.py) give the same canonical JSON and digests for keys, for real
// component configs and for configs full of awkward values, and the same code revision of the
// kiln package (BuildKilnRevision(), computed at build time, against Python's of the sources);
// Validate() names the bad field; FromJson(ToJson()) round-trips.
#include "cache/artifact_key.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/hash.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/pipeline/test_support.h"

namespace kiln::cache {
namespace {

using ::kiln::testing::ReadFileOrDie;
using ::kiln::testing::TempDir;
using ::kiln::testing::WriteFileOrDie;
using ::testing::HasSubstr;

// Component configs as the published checkpoints ship them (trimmed), and one of edge cases.
const char* kT5Config = R"({
  "_name_or_path": "google/t5-v1_1-xxl",
  "architectures": ["T5EncoderModel"],
  "classifier_dropout": 0.0,
  "d_ff": 10240,
  "d_kv": 64,
  "d_model": 4096,
  "decoder_start_token_id": 0,
  "dense_act_fn": "gelu_new",
  "dropout_rate": 0.1,
  "eos_token_id": 1,
  "feed_forward_proj": "gated-gelu",
  "initializer_factor": 1.0,
  "is_encoder_decoder": true,
  "is_gated_act": true,
  "layer_norm_epsilon": 1e-06,
  "model_type": "t5",
  "num_heads": 64,
  "num_layers": 24,
  "output_past": true,
  "pad_token_id": 0,
  "relative_attention_max_distance": 128,
  "relative_attention_num_buckets": 32,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.3",
  "use_cache": true,
  "vocab_size": 32128
})";

const char* kClipConfig = R"({
  "_name_or_path": "openai/clip-vit-large-patch14",
  "architectures": ["CLIPTextModel"],
  "attention_dropout": 0.0,
  "bos_token_id": 0,
  "dropout": 0.0,
  "eos_token_id": 2,
  "hidden_act": "quick_gelu",
  "hidden_size": 768,
  "initializer_factor": 1.0,
  "initializer_range": 0.02,
  "intermediate_size": 3072,
  "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77,
  "model_type": "clip_text_model",
  "num_attention_heads": 12,
  "num_hidden_layers": 12,
  "pad_token_id": 1,
  "projection_dim": 768,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.3",
  "vocab_size": 49408
})";

const char* kVaeConfig = R"({
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.30.0.dev0",
  "_name_or_path": "../checkpoints/flux-dev",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                       "DownEncoderBlock2D"],
  "force_upcast": true,
  "in_channels": 3,
  "latent_channels": 16,
  "latents_mean": null,
  "latents_std": null,
  "layers_per_block": 2,
  "mid_block_add_attention": true,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 1024,
  "scaling_factor": 0.3611,
  "shift_factor": 0.1159,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                     "UpDecoderBlock2D"],
  "use_post_quant_conv": false,
  "use_quant_conv": false
})";

const char* kTransformerConfig = R"({
  "_class_name": "FluxTransformer2DModel",
  "_diffusers_version": "0.30.0.dev0",
  "attention_head_dim": 128,
  "axes_dims_rope": [16, 56, 56],
  "guidance_embeds": true,
  "in_channels": 64,
  "joint_attention_dim": 4096,
  "num_attention_heads": 24,
  "num_layers": 19,
  "num_single_layers": 38,
  "patch_size": 1,
  "pooled_projection_dim": 768,
  "rope_theta": 10000.0,
  "max_shift": 1.15
})";

// Values where naive float printing or key ordering goes wrong.
const char* kEdgeConfig = R"({
  "_private": "dropped from the architecture digest",
  "transformers_version": "4.0", "torch_dtype": "float32",
  "eps": 1e-06, "eps5": 1e-05, "eps4": 0.0001, "eps_odd": 1.5e-07,
  "scaling_factor": 0.3611, "rope_theta": 10000.0, "max_shift": 1.15, "third": 0.3333333333333333,
  "float_int": 1.0, "exp_upper": 1E+2, "neg_zero": -0.0, "tiny": 5e-324,
  "huge": 1.7976931348623157e308,
  "e15": 1e15, "e15b": 1234567890123456.0, "e16": 1e16, "e16b": 12345678901234567.0,
  "grisu_not_shortest": 2.332715332206741e+16, "grisu_not_closest": 1.9491386107922027e+15,
  "grisu3": 31994810748573.188, "small": 6.137688561080735e-109,
  "ints": [0, -1, 9007199254740993, -9223372036854775808, 9223372036854775807,
           18446744073709551615],
  "bools": [true, false], "nothing": null,
  "nested": [[1, [2.5, []]], {}, {"z": {"a": null, "_kept_inside": 1}}],
  "unicode": "ünïcödé ✓ 日本語 😀",
  "escapes": "tab\tnl\ncr\rquote\"back\\slash/ctl\u0001\u001fdel\u007fls\u2028",
  "é": 1, "z": 2, "Z": 3, "日": 4, "😀": 5, "\uffff": 6, "a b": 7, "": 8
})";

ArtifactKey ValidKey() {
  ArtifactKey k;
  k.architecture = ArchitectureDigest(nlohmann::json::parse(kTransformerConfig));
  k.component = "transformer";
  k.precision = "bf16";
  k.bucket = Bucket{1, 1024, 1024, 512};
  k.compile = CompileOptionsDigest(DefaultCompileOptions());
  k.target = "cuda:sm_90";
  k.toolchain = Toolchain{"2.13.0+cu128", "12.8", "3.5.0", BuildKilnRevision()};
  return k;
}

std::vector<ArtifactKey> SampleKeys() {
  std::vector<ArtifactKey> keys;
  const std::vector<std::pair<std::string, const char*>> configs = {
      {"text_encoder", kClipConfig},
      {"text_encoder_2", kT5Config},
      {"transformer", kTransformerConfig},
      {"vae_decoder", kVaeConfig}};
  for (const auto& [component, config] : configs) {
    for (const std::string precision : {"fp32", "bf16", "fp8"}) {
      ArtifactKey k = ValidKey();
      k.architecture = ArchitectureDigest(nlohmann::json::parse(config));
      k.component = component;
      k.precision = precision;
      if (component == "text_encoder") k.bucket = Bucket{2, 0, 0, 77};
      if (component == "vae_decoder") k.bucket = Bucket{4, 768, 1360, 0};
      if (precision == "fp32") {
        k.target = "cpu";
        k.toolchain = Toolchain{"2.13.0+cpu", "", "", Sha256Hex("another checkout")};
        k.compile = CompileOptionsDigest({{"max_autotune", true}, {"eps", 1e-06}});
      }
      keys.push_back(k);
    }
  }
  return keys;
}

// Doubles as text: random bit patterns, random decimals, and the powers of ten around the
// fixed/exponent switch points. "%.17g" text parses to the same double on both sides.
std::string RandomFloatsJson(int n) {
  std::mt19937_64 rng(2024);
  std::string text = "[";
  char buf[64];
  auto add = [&](double d) {
    if (!std::isfinite(d)) return;
    std::snprintf(buf, sizeof(buf), "%.17g", d);
    if (text.size() > 1) text += ",";
    text += buf;
    // Also the shortest spelling, as config files have it.
    std::snprintf(buf, sizeof(buf), "%.6g", d);
    text += absl::StrCat(",", buf);
  };
  for (int e = -30; e <= 30; ++e) {
    add(std::pow(10.0, e));
    add(-1.5 * std::pow(10.0, e));
    add(std::nextafter(std::pow(10.0, e), 0.0));
  }
  for (int i = 0; i < n; ++i) {
    uint64_t bits = rng();
    double d;
    if (i % 2 == 0) {
      std::memcpy(&d, &bits, sizeof(d));
    } else {
      d = std::ldexp(static_cast<double>(bits >> 11), -53) *
          std::pow(10.0, static_cast<int>(rng() % 44) - 22);
    }
    add(d);
  }
  // A number JSON sees as a float must stay a float in both parsers.
  text = absl::StrCat(text, ",1.0,100.0,-0.0,0.0,1e2,1E-7]");
  return text;
}

// ---------------------------------------------------------------------------------------------

TEST(CanonicalJsonTest, FloatsAreWrittenAsPythonWritesThem) {
  const std::vector<std::pair<double, std::string>> cases = {
      {1e-06, "1e-06"},
      {1e-05, "1e-05"},
      {0.0001, "0.0001"},
      {0.3611, "0.3611"},
      {10000.0, "10000.0"},
      {1.15, "1.15"},
      {1.0, "1.0"},
      {-0.0, "-0.0"},
      {0.0, "0.0"},
      {1e15, "1000000000000000.0"},
      {1234567890123456.0, "1234567890123456.0"},
      {1e16, "1e+16"},
      {1.5e16, "1.5e+16"},
      {1e100, "1e+100"},
      {5e-324, "5e-324"},
      {1.7976931348623157e308, "1.7976931348623157e+308"},
      {2.332715332206741e+16, "2.332715332206741e+16"},  // nlohmann: 2.3327153322067408e+16
      {1949138610792202.8, "1949138610792202.8"},        // nlohmann: 1.9491386107922027e+15
      {31994810748573.188, "31994810748573.188"},        // nlohmann: 31994810748573.187
      {0.1 + 0.2, "0.30000000000000004"},
      {std::numeric_limits<double>::quiet_NaN(), "NaN"},
      {std::numeric_limits<double>::infinity(), "Infinity"},
      {-std::numeric_limits<double>::infinity(), "-Infinity"},
  };
  for (const auto& [value, want] : cases) {
    EXPECT_EQ(CanonicalJson(nlohmann::json(value)), want) << want;
  }
  const auto mixed = nlohmann::json::parse(R"({"b":[1,2.0,{"d":null,"c":"\u00e9"}],"a":true})");
  EXPECT_EQ(CanonicalJson(mixed), R"({"a":true,"b":[1,2.0,{"c":"é","d":null}]})");
}

TEST(ArtifactKeyTest, PythonAgreesOnDigestsAndCanonicalJson) {
  if (!kiln::testing::HavePython()) GTEST_SKIP() << "KILN_PYTHON / KILN_SOURCE not set";
  TempDir dir;
  const std::vector<const char*> configs = {kT5Config, kClipConfig, kVaeConfig,
                                            kTransformerConfig, kEdgeConfig};
  const std::string package =
      absl::StrCat(kiln::testing::EnvOrEmpty("KILN_SOURCE"), "/pipeline/python/kiln");
  nlohmann::json request = {{"config_files", nlohmann::json::array()},
                            {"keys", nlohmann::json::array()},
                            {"json_files", nlohmann::json::array()},
                            {"code_roots", {package}}};
  for (size_t i = 0; i < configs.size(); ++i) {
    const std::string path = dir.Join(absl::StrCat("config", i, ".json"));
    WriteFileOrDie(path, configs[i]);
    request["config_files"].push_back(path);
  }
  const auto keys = SampleKeys();
  for (const auto& k : keys) request["keys"].push_back(k.ToJson());
  const std::string floats_text = RandomFloatsJson(50000);
  WriteFileOrDie(dir.Join("floats.json"), floats_text);
  request["json_files"].push_back(dir.Join("floats.json"));
  WriteFileOrDie(dir.Join("request.json"), request.dump());

  auto run = kiln::testing::RunPython("tests/pipeline/ref_artifact_key.py",
                                      {dir.Join("request.json"), dir.Join("out.json")});
  ASSERT_TRUE(run.ok()) << run.status();
  const auto out = nlohmann::json::parse(ReadFileOrDie(dir.Join("out.json")));

  for (size_t i = 0; i < configs.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("config ", i));
    const auto config = nlohmann::json::parse(configs[i]);
    EXPECT_EQ(CanonicalJson(config), out["configs"][i]["canonical"].get<std::string>());
    EXPECT_EQ(ArchitectureDigest(config), out["configs"][i]["architecture_digest"]);
  }
  // The revision this binary was built with is that of the sources the tests run from (a stale
  // build, or the build's and Python's file lists or hashing parting, would differ).
  ASSERT_EQ(out["code"].size(), 1u);
  EXPECT_EQ(BuildKilnRevision(), out["code"][0]["revision"].get<std::string>())
      << "kiln code revision: this binary was built from other sources than " << package
      << " holds now (rebuild), or cache/code_revision.cmake and kiln.artifact_key.code_revision "
         "disagree; Python hashed "
      << out["code"][0]["files"].dump();
  ASSERT_EQ(out["keys"].size(), keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    SCOPED_TRACE(keys[i].ToJson().dump());
    EXPECT_EQ(CanonicalJson(keys[i].ToJson()), out["keys"][i]["canonical"].get<std::string>());
    EXPECT_EQ(keys[i].Digest(), out["keys"][i]["digest"]);
  }

  // 100k+ doubles: number by number for a readable failure, then the whole text.
  const auto floats = nlohmann::json::parse(floats_text);
  const auto& theirs = out["json_files"][0];
  ASSERT_EQ(theirs["elements"].size(), floats.size());
  int mismatches = 0;
  for (size_t i = 0; i < floats.size(); ++i) {
    const std::string mine = CanonicalJson(floats[i]);
    if (mine != theirs["elements"][i].get<std::string>() && ++mismatches <= 10) {
      ADD_FAILURE() << "element " << i << ": C++ " << mine << ", Python "
                    << theirs["elements"][i].get<std::string>();
    }
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(CanonicalJson(floats), theirs["canonical"].get<std::string>());
}

TEST(ArtifactKeyTest, ArchitectureDigestIgnoresBookkeepingKeys) {
  auto config = nlohmann::json::parse(kT5Config);
  const std::string digest = ArchitectureDigest(config);
  config["_name_or_path"] = "/somewhere/else";
  config["transformers_version"] = "9.9.9";
  config["torch_dtype"] = "float16";
  config["_commit_hash"] = "abc";
  EXPECT_EQ(ArchitectureDigest(config), digest);
  config["layer_norm_epsilon"] = 1e-05;
  EXPECT_NE(ArchitectureDigest(config), digest);
}

TEST(ArtifactKeyTest, ValidateNamesTheBadField) {
  ASSERT_TRUE(ValidKey().Validate().ok()) << ValidKey().Validate();
  struct Case {
    void (*breaks)(ArtifactKey&);
    const char* field;
  };
  const Case cases[] = {
      {[](ArtifactKey& k) { k.architecture = "not-a-digest"; }, "architecture"},
      {[](ArtifactKey& k) { k.architecture = std::string(64, 'A'); }, "architecture"},
      {[](ArtifactKey& k) { k.component = "unet"; }, "component"},
      {[](ArtifactKey& k) { k.precision = "fp16"; }, "precision"},
      {[](ArtifactKey& k) { k.bucket.batch = 0; }, "bucket.batch"},
      // The message says "bucket sizes", not which of height/width/text_len.
      {[](ArtifactKey& k) { k.bucket.height = -1; }, "bucket"},
      {[](ArtifactKey& k) { k.bucket.width = -8; }, "bucket"},
      {[](ArtifactKey& k) { k.bucket.text_len = -1; }, "bucket"},
      {[](ArtifactKey& k) { k.compile = ""; }, "compile"},
      {[](ArtifactKey& k) { k.target = "tpu"; }, "target"},
      {[](ArtifactKey& k) { k.target = "cpu"; }, "fp8"},  // with precision fp8 below
      {[](ArtifactKey& k) { k.toolchain.torch = ""; }, "toolchain.torch"},
      {[](ArtifactKey& k) { k.toolchain.kiln = ""; }, "toolchain.kiln"},
      {[](ArtifactKey& k) { k.toolchain.kiln = "0123abc"; }, "toolchain.kiln"},
  };
  for (const auto& c : cases) {
    ArtifactKey k = ValidKey();
    if (std::string(c.field) == "fp8") k.precision = "fp8";
    c.breaks(k);
    const absl::Status s = k.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(s.message(), HasSubstr(c.field));
    // FromJson applies Validate too.
    EXPECT_EQ(ArtifactKey::FromJson(k.ToJson()).status().code(),
              absl::StatusCode::kInvalidArgument)
        << c.field;
  }
}

TEST(ArtifactKeyTest, FromJsonRoundTripsToJson) {
  for (const auto& k : SampleKeys()) {
    auto back = ArtifactKey::FromJson(k.ToJson());
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->ToJson(), k.ToJson());
    EXPECT_EQ(back->Digest(), k.Digest());
    EXPECT_EQ(back->bucket, k.bucket);
    // And through text, as keys travel.
    auto text = ArtifactKey::FromJson(nlohmann::json::parse(CanonicalJson(k.ToJson())));
    ASSERT_TRUE(text.ok()) << text.status();
    EXPECT_EQ(text->Digest(), k.Digest());
  }
}

TEST(ArtifactKeyTest, FromJsonErrorsNameTheField) {
  nlohmann::json j = ValidKey().ToJson();
  j.erase("precision");
  auto missing = ArtifactKey::FromJson(j);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(missing.status().message(), HasSubstr("precision"));

  j = ValidKey().ToJson();
  j["bucket"]["batch"] = "1";
  auto wrong_type = ArtifactKey::FromJson(j);
  EXPECT_EQ(wrong_type.status().code(), absl::StatusCode::kInvalidArgument);

  EXPECT_EQ(ArtifactKey::FromJson(nlohmann::json::array()).status().code(),
            absl::StatusCode::kInvalidArgument);

  // The key of a package compiled before keys carried kiln's code revision.
  j = ValidKey().ToJson();
  j["toolchain"].erase("kiln");
  auto old = ArtifactKey::FromJson(j);
  EXPECT_EQ(old.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(old.status().message(), HasSubstr("kiln"));
}

TEST(ArtifactKeyTest, BuildKilnRevisionIsADigestAndPartOfTheKey) {
  const std::string revision = BuildKilnRevision();
  EXPECT_EQ(revision.size(), 64u);
  EXPECT_EQ(revision.find_first_not_of("0123456789abcdef"), std::string::npos) << revision;
  const ArtifactKey k = ValidKey();
  EXPECT_EQ(k.ToJson()["toolchain"]["kiln"], revision);
  // A stored package's key from before the field: its digest is not today's key's, so a lookup
  // by today's key misses it (and compiles) rather than serving it.
  nlohmann::json before = k.ToJson();
  before["toolchain"].erase("kiln");
  EXPECT_NE(Sha256Hex(CanonicalJson(before)), k.Digest());
}

TEST(ArtifactKeyTest, DigestChangesWithEveryField) {
  const ArtifactKey base = ValidKey();
  std::vector<ArtifactKey> variants(10, base);
  variants[0].architecture = ArchitectureDigest(nlohmann::json::parse(kVaeConfig));
  variants[1].component = "vae_decoder";
  variants[2].precision = "fp8";
  variants[3].bucket.batch = 2;
  variants[4].bucket.text_len = 256;
  variants[5].compile = CompileOptionsDigest({{"max_autotune", true}});
  variants[6].target = "cuda:sm_100";
  variants[7].toolchain.triton = "3.4.0";
  variants[8].toolchain.cuda = "12.9";
  variants[9].toolchain.kiln = Sha256Hex("models/flux.py with a new attention kernel");
  std::set<std::string> digests = {base.Digest()};
  for (const auto& v : variants) digests.insert(v.Digest());
  EXPECT_EQ(digests.size(), variants.size() + 1);
}

}  // namespace
}  // namespace kiln::cache
