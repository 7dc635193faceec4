// The tokenizer loaders on malformed files: the regression tests of what the fuzz targets found
// (tests/fuzz/README.md, "Runs and findings"). The T5 model is built here by hand in protobuf
// wire format (a few pieces, optionally a one-key charsmap), so the test needs neither Python nor
// LibTorch; it also runs in the sanitizer build.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "nlohmann/json.hpp"
#include "pipeline/tokenizer_clip.h"
#include "pipeline/tokenizer_common.h"
#include "pipeline/tokenizer_t5.h"

namespace kiln::pipeline {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string Varint(uint64_t v) {
  std::string out;
  while (v >= 0x80) {
    out.push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
  return out;
}
std::string Bytes(int field, const std::string& payload) {
  return Varint(static_cast<uint64_t>(field) << 3 | 2) + Varint(payload.size()) + payload;
}
// sentencepiece.ModelProto.SentencePiece {piece = 1, score = 2 (float), type = 3}.
std::string Piece(const std::string& piece, float score, int type) {
  std::string score_bytes(4, '\0');
  std::memcpy(score_bytes.data(), &score, 4);
  return Bytes(1, Bytes(1, piece) + Varint(2 << 3 | 5) + score_bytes + Varint(3 << 3) +
                      Varint(static_cast<uint64_t>(type)));
}
// A charsmap with one key, "A" -> `replacement`: the darts-clone trie of
// tests/fuzz/make_file_seeds.py, then the NUL-terminated replacement.
std::string OneKeyCharsmap(const std::string& replacement) {
  std::vector<uint32_t> units(66, 0);
  units[0] = 1u << 10;
  units[64] = 1u << 10 | 1u << 8 | 0x41;
  units[65] = 0x80000000u;
  std::string out;
  auto u32 = [&out](uint32_t v) {
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
  };
  u32(static_cast<uint32_t>(units.size() * 4));
  for (uint32_t u : units) u32(u);
  return out + replacement + std::string(1, '\0');
}
// pad, eos (control), unk, and a few normal pieces; `charsmap` "" = no normalizer.
std::string T5Model(const std::string& charsmap) {
  std::string model = Piece("<pad>", 0, 3) + Piece("</s>", 0, 3) + Piece("<unk>", 0, 2) +
                      Piece("\xe2\x96\x81", -1, 1) + Piece("a", -2, 1) + Piece("c", -2, 1) +
                      Piece("t", -2, 1) + Piece("\xe2\x96\x81" "a", -1.5, 1);
  if (!charsmap.empty()) model += Bytes(3, Bytes(2, charsmap));
  return model;
}

class TokenizerMalformedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("tokenizer_malformed_" + std::string(
                ::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void Write(const std::string& name, const std::string& bytes) {
    std::ofstream(dir_ / name, std::ios::binary) << bytes;
  }
  absl::StatusOr<std::unique_ptr<T5Tokenizer>> LoadT5(const std::string& charsmap,
                                                      const nlohmann::json& config) {
    Write("spiece.model", T5Model(charsmap));
    Write("tokenizer_config.json", config.dump());
    return T5Tokenizer::Load(dir_.string());
  }
  fs::path dir_;
};

TEST_F(TokenizerMalformedTest, HandMadeT5ModelLoadsAndUsesItsCharsmap) {
  auto tok = LoadT5(OneKeyCharsmap("a"), {{"extra_ids", 2}});
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 10);  // 8 pieces + <extra_id_1>, <extra_id_0>
  auto upper = (*tok)->Encode("A", 4);
  auto lower = (*tok)->Encode("a", 4);
  ASSERT_TRUE(upper.ok()) << upper.status();
  ASSERT_TRUE(lower.ok()) << lower.status();
  EXPECT_EQ(upper->ids, lower->ids);  // the charsmap maps "A" to "a"
}

TEST_F(TokenizerMalformedTest, CharsmapReplacementThatIsNotUtf8IsRefusedAtLoad) {
  // Before the fix this loaded, and every Encode meeting "A" failed with INTERNAL.
  auto tok = LoadT5(OneKeyCharsmap("\xff"), {{"extra_ids", 0}});
  ASSERT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tok.status().message(), HasSubstr("malformed charsmap"));
}

TEST_F(TokenizerMalformedTest, HugeExtraIdsIsRefused) {
  // Before the fix: signed overflow computing the sentinels' ids (UBSan), then a huge loop.
  for (int64_t extra : {int64_t{2147483647}, int64_t{-1}, int64_t{1} << 40}) {
    auto tok = LoadT5("", {{"extra_ids", extra}});
    ASSERT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << extra;
    EXPECT_THAT(tok.status().message(), HasSubstr("extra_ids"));
  }
}

TEST_F(TokenizerMalformedTest, AddedTokenIdsMustBeSmallNonNegativeIntegers) {
  // Before the fix: "-7" gave a negative id in the output, "9223372036854775807" overflowed the
  // vocabulary size (UBSan), and "12abc" was read as 12.
  for (const char* key : {"-7", "9223372036854775807", "2147483648", "12abc", " 3", ""}) {
    nlohmann::json config = {
        {"added_tokens_decoder", {{"0", {{"content", "<pad>"}}}, {"1", {{"content", "</s>"}}},
                                  {key, {{"content", "<x>"}}}}}};
    auto tok = LoadT5("", config);
    ASSERT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_THAT(tok.status().message(), HasSubstr("is not an id")) << key;
  }
  nlohmann::json config = {{"added_tokens_decoder",
                            {{"0", {{"content", "<pad>"}}}, {"1", {{"content", "</s>"}}},
                             {"2147483647", {{"content", "<x>"}}}}}};
  auto tok = LoadT5("", config);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), int64_t{2147483648});
}

TEST_F(TokenizerMalformedTest, ClipAddedTokenIdMustBeNonNegative) {
  nlohmann::json vocab;
  for (int c = 'a'; c <= 'z'; ++c) {
    vocab[std::string(1, static_cast<char>(c))] = c - 'a';
    vocab[std::string(1, static_cast<char>(c)) + "</w>"] = 26 + c - 'a';
  }
  vocab["<|startoftext|>"] = 52;
  vocab["<|endoftext|>"] = 53;
  Write("vocab.json", vocab.dump());
  Write("merges.txt", "#version: 0.2\n");
  for (const char* key : {"-3", "99999999999"}) {
    nlohmann::json config = {
        {"bos_token", "<|startoftext|>"},
        {"eos_token", "<|endoftext|>"},
        {"added_tokens_decoder", {{"52", {{"content", "<|startoftext|>"}, {"normalized", true}}},
                                  {key, {{"content", "<|endoftext|>"}, {"normalized", true}}}}}};
    Write("tokenizer_config.json", config.dump());
    auto tok = ClipTokenizer::Load(dir_.string());
    ASSERT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_THAT(tok.status().message(), HasSubstr("is not an id")) << key;
  }
}

TEST(ParseTokenIdTest, AcceptsOnlyPlainDecimalIds) {
  EXPECT_EQ(ParseTokenId("0"), 0);
  EXPECT_EQ(ParseTokenId("49407"), 49407);
  EXPECT_EQ(ParseTokenId("2147483647"), 2147483647);
  for (const char* bad : {"", "-1", "+1", "1e3", "2147483648", "99999999999", "1 ", "0x10"}) {
    EXPECT_EQ(ParseTokenId(bad), std::nullopt) << bad;
  }
}

}  // namespace
}  // namespace kiln::pipeline
