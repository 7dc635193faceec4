// ClipTokenizer and T5Tokenizer against the reference tokenizations (transformers, as diffusers'
// FluxPipeline calls them), id for id. The tokenizer files are generated into a temp dir by
// kiln.tokenizer_files; tests/pipeline/ref_tokenize.py computes the reference ids. Needs
// KILN_PYTHON and KILN_SOURCE (set by ctest); skips without them.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/files.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "pipeline/tokenizer_clip.h"
#include "pipeline/tokenizer_t5.h"
#include "pipeline/tokenizer_unicode.h"

namespace kiln::pipeline {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const fs::path& path, const std::string& data) {
  std::ofstream(path, std::ios::binary) << data;
}

class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* python = std::getenv("KILN_PYTHON");
    const char* source = std::getenv("KILN_SOURCE");
    if (python == nullptr || source == nullptr) {
      skip_ = "KILN_PYTHON / KILN_SOURCE not set (run through ctest)";
      return;
    }
    python_ = python;
    source_ = source;
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl =
        absl::StrCat(tmp != nullptr && *tmp ? tmp : "/tmp", "/kiln_tokenizer_XXXXXX");
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    const std::string script = absl::StrCat(
        "import kiln.tokenizer_files as t; t.write_clip_tokenizer(", Quote2(ClipDir()),
        "); t.write_t5_tokenizer(", Quote2(T5Dir()), ")");
    ASSERT_EQ(RunPython(absl::StrCat("-c ", Quote(script))), 0) << Log();
    auto clip = ClipTokenizer::Load(ClipDir());
    ASSERT_TRUE(clip.ok()) << clip.status();
    clip_ = std::move(*clip).release();
    auto t5 = T5Tokenizer::Load(T5Dir());
    ASSERT_TRUE(t5.ok()) << t5.status();
    t5_ = std::move(*t5).release();
  }

  static void TearDownTestSuite() {
    delete clip_;
    delete t5_;
    clip_ = nullptr;
    t5_ = nullptr;
    if (!dir_.empty()) (void)kiln::RemoveTree(dir_);
  }

  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    ASSERT_NE(clip_, nullptr);
    ASSERT_NE(t5_, nullptr);
  }

  static std::string ClipDir() { return dir_ + "/clip"; }
  static std::string T5Dir() { return dir_ + "/t5"; }
  static std::string Quote2(const std::string& s) { return "'" + s + "'"; }  // Python literal
  static std::string Log() { return ReadFile(dir_ + "/python.log"); }

  // Runs the venv Python with kiln on the path; stderr goes to python.log.
  static int RunPython(const std::string& args) {
    const std::string cmd =
        absl::StrCat("PYTHONPATH=", Quote(source_ + "/pipeline/python"), " ", Quote(python_), " ",
                     args, " 2>", Quote(dir_ + "/python.log"));
    return std::system(cmd.c_str());
  }
  static std::string RefScript() { return Quote(source_ + "/tests/pipeline/ref_tokenize.py"); }

  // Runs ref_tokenize.py with `args` and parses the JSON it writes.
  static nlohmann::json Reference(const std::string& args) {
    const std::string out = dir_ + "/ref_out.json";
    fs::remove(out);
    const int rc = RunPython(absl::StrCat(RefScript(), " ", args, " ", Quote(out)));
    EXPECT_EQ(rc, 0) << Log();
    if (rc != 0) return nlohmann::json();
    return nlohmann::json::parse(ReadFile(out));
  }

  static nlohmann::json ReferenceFor(const std::vector<std::string>& strings,
                                     const std::vector<int>& t5_lengths) {
    const std::string in = dir_ + "/ref_in.json";
    WriteFile(in, nlohmann::json({{"strings", strings},
                                  {"clip_max_length", 77},
                                  {"t5_max_lengths", t5_lengths}})
                      .dump());
    return Reference(absl::StrCat("tokenize ", Quote(ClipDir()), " ", Quote(T5Dir()), " ",
                                  Quote(in)));
  }

  // Compares one encoding with the reference's {"ids": [...], "content": n}.
  static void ExpectMatches(const absl::StatusOr<TokenizeResult>& got, const nlohmann::json& ref,
                            int max_length, int specials, const std::string& what) {
    ASSERT_TRUE(got.ok()) << what << ": " << got.status();
    const auto want = ref["ids"].get<std::vector<int64_t>>();
    EXPECT_EQ(got->ids, want) << what;
    const int content = ref["content"].get<int>();
    const int room = max_length - specials;
    EXPECT_EQ(got->truncated, content > room) << what;
    EXPECT_EQ(got->dropped, std::max(0, content - room)) << what;
    EXPECT_EQ(got->length, std::min(content, room) + specials) << what;
  }

  // Encodes every reference string with both tokenizers and compares.
  static void ExpectAllMatch(const nlohmann::json& ref) {
    ASSERT_TRUE(ref.contains("strings")) << "no reference output";
    const auto strings = ref["strings"].get<std::vector<std::string>>();
    for (size_t i = 0; i < strings.size(); ++i) {
      const std::string what = absl::StrCat("string #", i, " ", nlohmann::json(strings[i]).dump());
      ExpectMatches(clip_->Encode(strings[i], 77), ref["clip"][i], 77, 2, "CLIP " + what);
      for (const auto& [len, encodings] : ref["t5"].items()) {
        const int n = std::stoi(len);
        ExpectMatches(t5_->Encode(strings[i], n), encodings[i], n, 1,
                      absl::StrCat("T5@", n, " ", what));
      }
    }
  }

  static inline std::string skip_, python_, source_, dir_;
  static inline ClipTokenizer* clip_ = nullptr;
  static inline T5Tokenizer* t5_ = nullptr;
};

std::string Repeat(const std::string& s, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += s;
  return out;
}

TEST_F(TokenizerTest, MatchesReferenceOnFixedStrings) {
  const std::vector<std::string> strings = {
      "",
      "A red fox sits in the snow at the edge of a pine forest.",
      "MiXeD CaSe WoRdS, ALL CAPS and lower case",
      "Hello, world! (really?) [yes]; {maybe}: \"quoted\" 'single' - dash -- double... end.",
      "don't it's we're they've I'm you'll she'd DON'T IT'S rock'n'roll ''s '''",
      "digits 0123456789 3.14 1,000,000 50mm f/1.8 1024x768 2024-05-17 #42 100%",
      "  multiple   spaces\tand\t\ttabs\nnew\nlines\r\nwindows  \n\n  trailing   ",
      " ",
      "\t\n",
      "café naïve façade Zürich São Paulo smörgåsbord Łódź Dvořák crème brûlée",
      "cafe\xcc\x81 nai\xcc\x88ve (decomposed accents) o\xcc\x82\xcc\xa3",
      "日本語のテキスト 中文 한국어 가",
      "emoji 😀 👍🏽 👨‍👩‍👧 🇫🇷 ❤️ ©️ 🦊",
      "Greek ΣΑΣ σας, Cyrillic Москва Київ, Turkish İstanbul, German STRAẞE",
      "fullwidth ＡＢＣ１２３ ligature ﬁﬂ ½ ² ① ℃ ™ … — “quotes” €5",
      "<|endoftext|> literal <|startoftext|> and <|ENDOFTEXT|> upper <|endof text|>",
      "</s> <pad> <unk> <extra_id_0> <extra_id_99> literal T5 specials<extra_id_5>x",
      "＜/s＞ fullwidth specials ＜unk＞",
      std::string("control \x01\x02\x7f chars, nul ") + std::string(1, '\0') +
          " here, zero\xe2\x80\x8bwidth, nbsp\xc2\xa0x, ideographic\xe3\x80\x80space, "
          "nel\xc2\x85x",
      "\xe2\x96\x81" "already metaspace \xe2\x96\x81\xe2\x96\x81" "double x\xe2\x96\x81y",
      "combining after keys: \xef\xbc\xa1\xcc\x81 \xef\xac\x81\xcc\x81 a\xcc\x88\xcc\x81 "
      "\xc2\xa0\xcc\x81 \xe2\x80\x8b\xcc\x81 \xef\xac\x81\xe2\x80\x8d \xef\xbc\x93\xe2\x80\x8d "
      "e\xcc\x81\xf0\x9f\x8f\xbb \xd8\x80\xef\xbc\xa1",
      Repeat("0", 75),
      Repeat("0", 76),
      Repeat("a watercolor painting of a quiet harbor at dawn, with boats and gulls. ", 6),
      Repeat("A watercolor painting of a quiet harbor at dawn, with fishing boats, gulls "
             "and soft pink light on the water. ",
             40),
  };
  ExpectAllMatch(ReferenceFor(strings, {512, 32, 1}));
}

TEST_F(TokenizerTest, MatchesReferenceOnRandomStrings) {
  // 3000 random strings over an alphabet of both pipelines' edge cases (see ref_tokenize.py).
  ExpectAllMatch(
      Reference(absl::StrCat("fuzz ", Quote(ClipDir()), " ", Quote(T5Dir()), " 7 3000")));
}

TEST_F(TokenizerTest, TruncationIsReported) {
  auto fits = clip_->Encode(Repeat("0", 75));
  ASSERT_TRUE(fits.ok());
  EXPECT_FALSE(fits->truncated);
  EXPECT_EQ(fits->dropped, 0);
  EXPECT_EQ(fits->length, 77);
  auto over = clip_->Encode(Repeat("0", 80));
  ASSERT_TRUE(over.ok());
  EXPECT_TRUE(over->truncated);
  EXPECT_EQ(over->dropped, 5);
  ASSERT_EQ(over->ids.size(), 77u);
  EXPECT_EQ(over->ids.front(), clip_->bos_id());
  EXPECT_EQ(over->ids.back(), clip_->eos_id());

  auto t5 = t5_->Encode(Repeat("fox ", 40), 16);
  ASSERT_TRUE(t5.ok());
  EXPECT_TRUE(t5->truncated);
  EXPECT_EQ(t5->dropped, 40 - 15);
  EXPECT_EQ(t5->ids.back(), t5_->eos_id());
}

TEST_F(TokenizerTest, SpecialIdsAreFluxs) {
  // Flux pads CLIP input with <|endoftext|> (its pad_token), T5 input with <pad> = 0.
  EXPECT_EQ(clip_->pad_id(), clip_->eos_id());
  EXPECT_EQ(clip_->eos_id(), clip_->vocab_size() - 1);
  EXPECT_EQ(clip_->bos_id(), clip_->vocab_size() - 2);
  EXPECT_EQ(t5_->pad_id(), 0);
  EXPECT_EQ(t5_->eos_id(), 1);
  EXPECT_EQ(t5_->vocab_size(), 1100);
  auto empty = clip_->Encode("");
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->length, 2);
  EXPECT_EQ(empty->ids[1], clip_->eos_id());
  EXPECT_EQ(empty->ids[76], clip_->pad_id());
  auto t5_empty = t5_->Encode("", 8);
  ASSERT_TRUE(t5_empty.ok());
  EXPECT_EQ(t5_empty->ids, std::vector<int64_t>({1, 0, 0, 0, 0, 0, 0, 0}));
}

TEST_F(TokenizerTest, RejectsInvalidUtf8WithOffset) {
  const std::vector<std::pair<std::string, int>> cases = {
      {"\xff", 0},                     // never a UTF-8 byte
      {"abc\xc3", 3},                  // truncated sequence
      {"ab\xc3(", 2},                  // bad continuation byte
      {"x\xed\xa0\x80", 1},            // surrogate U+D800
      {"\xc0\xaf", 0},                 // overlong '/'
      {"ok\xe0\x80\xaf", 2},           // overlong, 3 bytes
      {"ok \xf4\x90\x80\x80", 3},      // above U+10FFFF
      {"valid \xe2\x82\xac then \x80", 15},  // stray continuation byte
  };
  for (const auto& [text, offset] : cases) {
    for (const auto& status : {clip_->Encode(text).status(), t5_->Encode(text, 32).status()}) {
      EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << offset;
      EXPECT_THAT(status.message(), HasSubstr(absl::StrCat("byte offset ", offset, " ")));
    }
  }
}

TEST_F(TokenizerTest, RejectsMaxLengthWithoutRoomForSpecialTokens) {
  EXPECT_EQ(clip_->Encode("fox", 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t5_->Encode("fox", 0).status().code(), absl::StatusCode::kInvalidArgument);
  auto one = t5_->Encode("fox", 1);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->ids, std::vector<int64_t>({1}));
}

TEST_F(TokenizerTest, LoadErrorsNameTheProblem) {
  EXPECT_EQ(ClipTokenizer::Load(dir_ + "/missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(T5Tokenizer::Load(dir_ + "/missing").status().code(), absl::StatusCode::kNotFound);

  const fs::path bad_clip = dir_ + "/bad_clip";
  fs::create_directories(bad_clip);
  for (const char* f : {"vocab.json", "merges.txt", "tokenizer_config.json"}) {
    fs::copy_file(ClipDir() + "/" + f, bad_clip / f, fs::copy_options::overwrite_existing);
  }
  WriteFile(bad_clip / "merges.txt", "#version: 0.2\nt h\nnot-a-pair\n");
  auto merges = ClipTokenizer::Load(bad_clip.string());
  EXPECT_EQ(merges.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(merges.status().message(), HasSubstr("merges.txt:3"));
  WriteFile(bad_clip / "merges.txt", "#version: 0.2\nzz qq\n");
  EXPECT_EQ(ClipTokenizer::Load(bad_clip.string()).status().code(),
            absl::StatusCode::kInvalidArgument);
  WriteFile(bad_clip / "vocab.json", "{not json");
  EXPECT_EQ(ClipTokenizer::Load(bad_clip.string()).status().code(),
            absl::StatusCode::kInvalidArgument);

  const fs::path bad_t5 = dir_ + "/bad_t5";
  fs::create_directories(bad_t5);
  fs::copy_file(T5Dir() + "/tokenizer_config.json", bad_t5 / "tokenizer_config.json",
                fs::copy_options::overwrite_existing);
  WriteFile(bad_t5 / "spiece.model", "this is not a model");
  EXPECT_EQ(T5Tokenizer::Load(bad_t5.string()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(TokenizerTest, ConfigsWithoutAddedTokensDecoderGiveTheSameIds) {
  // Older tokenizer_config.json files have no added_tokens_decoder: the special tokens then come
  // from the token fields (CLIP) and from the model's control pieces plus extra_ids (T5).
  const fs::path clip_dir = dir_ + "/clip_plain", t5_dir = dir_ + "/t5_plain";
  fs::create_directories(clip_dir);
  fs::create_directories(t5_dir);
  for (const char* f : {"vocab.json", "merges.txt"}) {
    fs::copy_file(ClipDir() + "/" + f, clip_dir / f, fs::copy_options::overwrite_existing);
  }
  fs::copy_file(T5Dir() + "/spiece.model", t5_dir / "spiece.model",
                fs::copy_options::overwrite_existing);
  for (const auto& [from, to] : {std::pair(ClipDir(), clip_dir), std::pair(T5Dir(), t5_dir)}) {
    auto config = nlohmann::json::parse(ReadFile(from + "/tokenizer_config.json"));
    config.erase("added_tokens_decoder");
    WriteFile(to / "tokenizer_config.json", config.dump());
  }
  auto clip = ClipTokenizer::Load(clip_dir.string());
  ASSERT_TRUE(clip.ok()) << clip.status();
  auto t5 = T5Tokenizer::Load(t5_dir.string());
  ASSERT_TRUE(t5.ok()) << t5.status();
  EXPECT_EQ((*t5)->vocab_size(), t5_->vocab_size());
  for (const std::string s : {"a red fox <|endoftext|> x <|STARTOFTEXT|>",
                              "</s> <pad> <unk> <extra_id_0> <extra_id_99> <extra_id_100>"}) {
    EXPECT_EQ((*clip)->Encode(s)->ids, clip_->Encode(s)->ids) << s;
    EXPECT_EQ((*t5)->Encode(s, 32)->ids, t5_->Encode(s, 32)->ids) << s;
  }
}

TEST_F(TokenizerTest, ConcurrentEncodesAgree) {
  const std::vector<std::string> prompts = {"a red fox in the snow", "A RED FOX, IN THE SNOW!",
                                            "café crème 日本 😀", "it's 12:30 and we're late"};
  std::vector<std::vector<int64_t>> want;
  for (const auto& p : prompts) want.push_back(clip_->Encode(p)->ids);
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        const size_t k = (i + t) % prompts.size();
        if (clip_->Encode(prompts[k])->ids != want[k]) ++mismatches[t];
        if (!t5_->Encode(prompts[k], 64).ok()) ++mismatches[t];
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_THAT(mismatches, ::testing::Each(0));
}

TEST_F(TokenizerTest, UnicodeTablesMatchReference) {
  const nlohmann::json ref = Reference("unicode");
  ASSERT_TRUE(ref.contains("letters"));
  auto check_ranges = [](const nlohmann::json& ranges, bool (*pred)(char32_t), const char* name) {
    char32_t next = 0;  // first code point not yet checked
    int bad = 0;
    auto expect = [&](char32_t c, bool want) {
      if (c >= 0xD800 && c < 0xE000) return;
      if (pred(c) != want && ++bad <= 5) ADD_FAILURE() << name << " U+" << std::hex << c;
    };
    for (const auto& r : ranges) {
      const char32_t first = r[0].get<uint32_t>(), last = r[1].get<uint32_t>();
      for (char32_t c = next; c < first; ++c) expect(c, false);
      for (char32_t c = first; c <= last; ++c) expect(c, true);
      next = last + 1;
    }
    for (char32_t c = next; c < 0x110000; ++c) expect(c, false);
    EXPECT_EQ(bad, 0) << name;
  };
  check_ranges(ref["letters"], unicode::IsLetter, "IsLetter");
  check_ranges(ref["numbers"], unicode::IsNumber, "IsNumber");
  check_ranges(ref["spaces"], unicode::IsWhiteSpace, "IsWhiteSpace");

  std::unordered_map<char32_t, std::u32string> lowered;
  for (const auto& e : ref["lower"]) {
    lowered[e[0].get<uint32_t>()] = *unicode::DecodeUtf8(e[1].get<std::string>());
  }
  int bad = 0;
  for (char32_t c = 0; c < 0x110000; ++c) {
    if (c >= 0xD800 && c < 0xE000) continue;
    std::u32string got;
    unicode::AppendLowercase(c, &got);
    const auto it = lowered.find(c);
    const std::u32string want = it == lowered.end() ? std::u32string(1, c) : it->second;
    if (got != want && ++bad <= 5) ADD_FAILURE() << "lowercase U+" << std::hex << c;
  }
  EXPECT_EQ(bad, 0);

  bad = 0;
  for (const auto& e : ref["nfc"]) {
    const auto in = *unicode::DecodeUtf8(e[0].get<std::string>());
    const auto want = *unicode::DecodeUtf8(e[1].get<std::string>());
    if (unicode::Nfc(in) != want && ++bad <= 5) ADD_FAILURE() << "NFC of " << e[0].dump();
  }
  EXPECT_EQ(bad, 0);
}

}  // namespace
}  // namespace kiln::pipeline
