// Tests of the safetensors reader: files written by the Python safetensors library for every dtype
// and the folder layouts diffusers/transformers use (tests/pipeline/make_safetensors.py), read back
// byte for byte; hand-made corrupt files, each refused with its specific code; and a fuzz loop of
// random corruptions that must never crash.
#include "pipeline/safetensors.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/pipeline/test_support.h"

namespace kiln::pipeline {
namespace {

using ::kiln::testing::ReadFileOrDie;
using ::kiln::testing::TempDir;
using ::kiln::testing::WriteFileOrDie;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string Hex(const TensorView& t) {
  return absl::BytesToHexString(
      absl::string_view(static_cast<const char*>(t.data), t.data ? t.nbytes : 0));
}

// A safetensors file from a header text and a data section.
std::string MakeFile(const std::string& header, const std::string& data = "") {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

// ---------------------------------------------------------------------------------------------
// Files written by Python.

class SafetensorsPythonTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!kiln::testing::HavePython()) return;
    dir_ = new TempDir();
    auto out = kiln::testing::RunPython("tests/pipeline/make_safetensors.py", {dir_->path()});
    ASSERT_TRUE(out.ok()) << out.status();
    manifest_ =
        new nlohmann::json(nlohmann::json::parse(ReadFileOrDie(dir_->Join("manifest.json"))));
  }
  static void TearDownTestSuite() {
    delete manifest_;
    delete dir_;
    manifest_ = nullptr;
    dir_ = nullptr;
  }
  void SetUp() override {
    if (!kiln::testing::HavePython()) GTEST_SKIP() << "KILN_PYTHON / KILN_SOURCE not set";
    ASSERT_NE(manifest_, nullptr);
  }

  // Every tensor the manifest lists for `key` is in `find`'s answers with Python's dtype, shape
  // and bytes.
  static void ExpectMatchesManifest(
      const std::string& key, const std::function<const TensorView*(const std::string&)>& find) {
    for (const auto& [name, want] : (*manifest_)[key].items()) {
      SCOPED_TRACE(name);
      const TensorView* t = find(name);
      ASSERT_NE(t, nullptr);
      EXPECT_EQ(t->name, name);
      EXPECT_EQ(DTypeName(t->dtype), want["dtype"].get<std::string>());
      EXPECT_EQ(t->shape, want["shape"].get<std::vector<int64_t>>());
      EXPECT_EQ(t->nbytes, static_cast<size_t>(t->numel()) * DTypeSize(t->dtype));
      EXPECT_EQ(Hex(*t), want["hex"].get<std::string>());
    }
  }

  static TempDir* dir_;
  static nlohmann::json* manifest_;
};

TempDir* SafetensorsPythonTest::dir_ = nullptr;
nlohmann::json* SafetensorsPythonTest::manifest_ = nullptr;

TEST_F(SafetensorsPythonTest, EveryDtypeMatchesWhatPythonWrote) {
  for (bool hints : {false, true}) {
    SafetensorsOptions options;
    options.prefetch = hints;
    auto file = SafetensorsFile::Open(dir_->Join("all_dtypes.safetensors"), options);
    ASSERT_TRUE(file.ok()) << file.status();
    const SafetensorsFile& f = **file;
    ExpectMatchesManifest("all_dtypes", [&](const std::string& n) { return f.Find(n); });

    std::vector<std::string> want;
    uint64_t bytes = 0;
    for (const auto& [name, t] : (*manifest_)["all_dtypes"].items()) {
      want.push_back(name);
      bytes += t["hex"].get<std::string>().size() / 2;
    }
    EXPECT_EQ(f.names(), want);  // both sorted
    EXPECT_EQ(f.tensors().size(), want.size());
    EXPECT_EQ(f.tensor_bytes(), bytes);
    EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"format", "pt"},
                                                                {"note", "kiln ünïcode"}}));
    EXPECT_EQ(f.Find("nope"), nullptr);
    // All 15 dtypes are present.
    std::set<DType> dtypes;
    for (const auto& t : f.tensors()) dtypes.insert(t.dtype);
    EXPECT_EQ(dtypes.size(), 15u);
    const TensorView* scalar = f.Find("scalar.f32");
    ASSERT_NE(scalar, nullptr);
    EXPECT_TRUE(scalar->shape.empty());
    EXPECT_EQ(scalar->numel(), 1);
    float v;
    std::memcpy(&v, scalar->data, 4);
    EXPECT_EQ(v, 1.5f);
    const TensorView* empty = f.Find("empty.bf16");
    ASSERT_NE(empty, nullptr);
    EXPECT_THAT(empty->shape, ElementsAre(0, 4));
    EXPECT_EQ(empty->nbytes, 0u);
    EXPECT_EQ(empty->data, nullptr);
  }
}

TEST_F(SafetensorsPythonTest, ShardedFolderFindsTensorsAcrossShards) {
  const std::string dir = dir_->Join("sharded");
  auto set = WeightSet::OpenDir(dir, "diffusion_pytorch_model");
  ASSERT_TRUE(set.ok()) << set.status();
  const WeightSet& w = **set;
  EXPECT_EQ(w.files().size(), 2u);
  EXPECT_THAT(w.names(),
              ElementsAre("proj_out.bias", "proj_out.weight", "x_embedder.bias",
                          "x_embedder.weight"));
  uint64_t total = 0;
  for (const char* shard : {"diffusion_pytorch_model-00001-of-00002.safetensors",
                            "diffusion_pytorch_model-00002-of-00002.safetensors"}) {
    const std::string key = absl::StrCat("sharded/", shard);
    ExpectMatchesManifest(key, [&](const std::string& n) { return w.Find(n); });
    for (const auto& [name, t] : (*manifest_)[key].items()) {
      ASSERT_NE(w.FileOf(name), nullptr);
      EXPECT_EQ(w.FileOf(name)->path(), dir + "/" + shard);
      total += t["hex"].get<std::string>().size() / 2;
    }
  }
  EXPECT_EQ(w.total_bytes(), total);
  EXPECT_EQ(w.size(), 4u);
}

TEST_F(SafetensorsPythonTest, RequireChecksPresenceDtypeAndShape) {
  auto set = WeightSet::OpenDir(dir_->Join("sharded"), "diffusion_pytorch_model");
  ASSERT_TRUE(set.ok()) << set.status();
  const WeightSet& w = **set;

  auto ok = w.Require("x_embedder.weight", DType::kBF16, {8, 4});
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)->name, "x_embedder.weight");
  EXPECT_TRUE(w.Require("x_embedder.weight").ok());
  EXPECT_TRUE(w.Require("x_embedder.weight", DType::kBF16).ok());
  EXPECT_TRUE(w.Require("x_embedder.weight", std::nullopt, {8, 4}).ok());

  auto missing = w.Require("transformer_blocks.0.attn.to_q.weight");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(),
              HasSubstr("tensor transformer_blocks.0.attn.to_q.weight not found"));

  auto dtype = w.Require("x_embedder.weight", DType::kF32);
  EXPECT_EQ(dtype.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dtype.status().message(),
              HasSubstr("tensor x_embedder.weight: dtype BF16 expected F32"));

  auto shape = w.Require("x_embedder.weight", DType::kBF16, {4, 8});
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(shape.status().message(),
              HasSubstr("tensor x_embedder.weight: shape [8, 4] expected [4, 8]"));
  EXPECT_THAT(shape.status().message(), HasSubstr("00001-of-00002"));

  auto scalar = w.Require("proj_out.bias", std::nullopt, {});
  EXPECT_EQ(scalar.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(scalar.status().message(), HasSubstr("shape [4] expected []"));
}

TEST_F(SafetensorsPythonTest, SingleFileIsPreferredOverOtherFiles) {
  auto set = WeightSet::OpenDir(dir_->Join("single"), "model");
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_EQ((*set)->files().size(), 1u);
  EXPECT_EQ((*set)->files()[0]->path(), dir_->Join("single/model.safetensors"));
  ExpectMatchesManifest("single/model.safetensors",
                        [&](const std::string& n) { return (*set)->Find(n); });
}

TEST_F(SafetensorsPythonTest, FolderWithoutIndexOpensEveryFile) {
  auto set = WeightSet::OpenDir(dir_->Join("unindexed"), "model");
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_THAT((*set)->names(), ElementsAre("a", "b"));
  ExpectMatchesManifest("unindexed/a.safetensors",
                        [&](const std::string& n) { return (*set)->Find(n); });
  ExpectMatchesManifest("unindexed/b.safetensors",
                        [&](const std::string& n) { return (*set)->Find(n); });
}

TEST_F(SafetensorsPythonTest, TensorInTwoFilesIsAnError) {
  auto set = WeightSet::OpenDir(dir_->Join("duplicate"), "model");
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(set.status().message(), HasSubstr("tensor 'w' is in both"));
  EXPECT_THAT(set.status().message(), HasSubstr("a.safetensors"));
  EXPECT_THAT(set.status().message(), HasSubstr("b.safetensors"));
}

TEST_F(SafetensorsPythonTest, IndexNamingAMissingShardIsNotFound) {
  auto set = WeightSet::OpenDir(dir_->Join("missing_shard"), "model");
  EXPECT_EQ(set.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(set.status().message(), HasSubstr("shard model-00002-of-00002.safetensors"));
  EXPECT_THAT(set.status().message(), HasSubstr("model.safetensors.index.json"));
}

TEST_F(SafetensorsPythonTest, IndexPlacingATensorInTheWrongShardIsAnError) {
  auto set = WeightSet::OpenDir(dir_->Join("wrong_shard"), "model");
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(set.status().message(),
              HasSubstr("tensor 'a' is mapped to model-00002-of-00002.safetensors"));
}

// ---------------------------------------------------------------------------------------------
// Folders and indexes made here.

TEST(WeightSetTest, MissingOrEmptyFolderIsNotFound) {
  TempDir dir;
  auto missing = WeightSet::OpenDir(dir.Join("nope"), "model");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  auto empty = WeightSet::OpenDir(dir.path(), "model");
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(empty.status().message(), HasSubstr("no model.safetensors"));
}

TEST(WeightSetTest, BadIndexIsInvalidArgument) {
  TempDir dir;
  const std::string index = dir.Join("model.safetensors.index.json");
  WriteFileOrDie(index, "{not json");
  EXPECT_EQ(WeightSet::OpenDir(dir.path(), "model").status().code(),
            absl::StatusCode::kInvalidArgument);
  WriteFileOrDie(index, R"({"metadata": {}})");
  auto no_map = WeightSet::OpenDir(dir.path(), "model");
  EXPECT_EQ(no_map.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(no_map.status().message(), HasSubstr("weight_map"));
  WriteFileOrDie(index, R"({"weight_map": {"a": "../escape.safetensors"}})");
  auto escape = WeightSet::OpenDir(dir.path(), "model");
  EXPECT_EQ(escape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(escape.status().message(), HasSubstr("not a file name"));
}

TEST(WeightSetTest, OpenFilesJoinsFiles) {
  TempDir dir;
  WriteFileOrDie(dir.Join("x.st"),
                 MakeFile(R"({"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", "ab"));
  WriteFileOrDie(dir.Join("y.st"),
                 MakeFile(R"({"y":{"dtype":"I16","shape":[1],"data_offsets":[0,2]}})", "cd"));
  auto set = WeightSet::OpenFiles({dir.Join("x.st"), dir.Join("y.st")});
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_THAT((*set)->names(), ElementsAre("x", "y"));
  EXPECT_EQ((*set)->total_bytes(), 4u);
  auto dup = WeightSet::OpenFiles({dir.Join("x.st"), dir.Join("x.st")});
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Corrupt files.

class SafetensorsCorruptTest : public ::testing::Test {
 protected:
  // Opens a file with these bytes; the status of the attempt.
  absl::Status OpenBytes(const std::string& bytes, const SafetensorsOptions& options = {}) {
    path_ = dir_.Join("f.safetensors");
    WriteFileOrDie(path_, bytes);
    return SafetensorsFile::Open(path_, options).status();
  }
  void ExpectError(const std::string& bytes, absl::StatusCode code,
                   const std::vector<std::string>& substrings) {
    absl::Status s = OpenBytes(bytes);
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_THAT(s.message(), HasSubstr(path_)) << "messages name the file";
    for (const auto& sub : substrings) EXPECT_THAT(s.message(), HasSubstr(sub));
  }

  TempDir dir_;
  std::string path_;
};

TEST_F(SafetensorsCorruptTest, HandMadeValidFileOpens) {
  // Header padded with spaces, a gap between tensors, two empty tensors at one offset.
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"U8","shape":[3],"data_offsets":[10,13]},)"
      R"("e1":{"dtype":"F16","shape":[0],"data_offsets":[8,8]},)"
      R"("e2":{"dtype":"F16","shape":[5,0],"data_offsets":[8,8]},)"
      R"("__metadata__":null}    )";
  ASSERT_TRUE(OpenBytes(MakeFile(header, std::string(13, 'x'))).ok());
  auto f = SafetensorsFile::Open(path_);
  ASSERT_TRUE(f.ok());
  EXPECT_THAT((*f)->names(), ElementsAre("a", "b", "e1", "e2"));
  EXPECT_EQ((*f)->tensor_bytes(), 11u);
  EXPECT_TRUE((*f)->metadata().empty());
  // Just the header: no data at all.
  EXPECT_TRUE(OpenBytes(MakeFile("{}")).ok());
}

TEST_F(SafetensorsCorruptTest, MissingFileAndFolder) {
  auto missing = SafetensorsFile::Open(dir_.Join("nope.safetensors"));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("nope.safetensors"));
  EXPECT_EQ(SafetensorsFile::Open(dir_.path()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SafetensorsCorruptTest, TruncatedFile) {
  ExpectError("", absl::StatusCode::kDataLoss, {"too short"});
  ExpectError(std::string("\x10\0\0", 3), absl::StatusCode::kDataLoss, {"too short"});
  // A valid file cut in its data section.
  const std::string valid =
      MakeFile(R"({"a":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}})", std::string(16, 1));
  ExpectError(valid.substr(0, valid.size() - 1), absl::StatusCode::kDataLoss,
              {"tensor 'a'", "beyond the data section"});
  // ... and in its header.
  ExpectError(valid.substr(0, 20), absl::StatusCode::kDataLoss, {"beyond the end of the file"});
}

TEST_F(SafetensorsCorruptTest, HeaderLengthBeyondEndOfFile) {
  std::string bytes = MakeFile("{}");
  bytes[7] = '\x7f';  // 2^62-ish
  ExpectError(bytes, absl::StatusCode::kDataLoss, {"header length", "beyond the end of the file"});
  bytes = MakeFile("{}");
  bytes[0] = 3;
  ExpectError(bytes, absl::StatusCode::kDataLoss, {"header length 3"});
}

TEST_F(SafetensorsCorruptTest, HeaderLongerThanTheLimit) {
  SafetensorsOptions options;
  options.max_header_bytes = 4;
  absl::Status s = OpenBytes(MakeFile("{}      "), options);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("exceeds the limit"));
}

TEST_F(SafetensorsCorruptTest, GarbageJson) {
  ExpectError(MakeFile("{\"a\": {"), absl::StatusCode::kInvalidArgument, {"not valid JSON"});
  ExpectError(MakeFile(std::string("\xff\xfe\x00garbage", 10)), absl::StatusCode::kInvalidArgument,
              {"not valid JSON"});
  ExpectError(MakeFile("[1, 2]"), absl::StatusCode::kInvalidArgument, {"not a JSON object"});
  ExpectError(MakeFile(R"({"a": 3})"), absl::StatusCode::kInvalidArgument,
              {"tensor 'a'", "not an object"});
  ExpectError(MakeFile(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", "xxxx"),
              absl::StatusCode::kInvalidArgument, {"tensor 'a'", "dtype"});
  ExpectError(MakeFile(R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", "xxxx"),
              absl::StatusCode::kInvalidArgument, {"tensor 'a'", "shape"});
  ExpectError(MakeFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", "xxxx"),
              absl::StatusCode::kInvalidArgument, {"tensor 'a'", "data_offsets"});
  ExpectError(MakeFile(R"({"__metadata__":{"k":1}})"), absl::StatusCode::kInvalidArgument,
              {"__metadata__", "'k'"});
  ExpectError(MakeFile(R"({"__metadata__":[]})"), absl::StatusCode::kInvalidArgument,
              {"__metadata__"});
}

TEST_F(SafetensorsCorruptTest, OffsetsOutOfRange) {
  ExpectError(MakeFile(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", "12345678"),
              absl::StatusCode::kDataLoss, {"tensor 'w'", "[4, 12]", "beyond the data section"});
  ExpectError(MakeFile(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", "12345678"),
              absl::StatusCode::kInvalidArgument, {"tensor 'w'", "begin > end"});
  ExpectError(MakeFile(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", "1234"),
              absl::StatusCode::kInvalidArgument, {"tensor 'w'", "data_offsets"});
  ExpectError(
      MakeFile(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551615]}})", "1"),
      absl::StatusCode::kDataLoss, {"tensor 'w'"});
}

TEST_F(SafetensorsCorruptTest, WrongByteCount) {
  ExpectError(MakeFile(R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,6]}})", "123456"),
              absl::StatusCode::kInvalidArgument, {"tensor 'w'", "hold 6 bytes", "needs 8"});
}

TEST_F(SafetensorsCorruptTest, UnknownDtype) {
  ExpectError(MakeFile(R"({"w":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}})", "1"),
              absl::StatusCode::kInvalidArgument, {"tensor 'w'", "unknown dtype 'F7'"});
  ExpectError(MakeFile(R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", "1234"),
              absl::StatusCode::kInvalidArgument, {"unknown dtype 'f32'"});
  ExpectError(MakeFile(R"({"w":{"dtype":"F8_E8M0","shape":[1],"data_offsets":[0,1]}})", "1"),
              absl::StatusCode::kUnimplemented, {"tensor 'w'", "F8_E8M0"});
}

TEST_F(SafetensorsCorruptTest, BadShape) {
  ExpectError(MakeFile(R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})"),
              absl::StatusCode::kInvalidArgument, {"tensor 'w'", "negative"});
  ExpectError(MakeFile(R"({"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,0]}})"),
              absl::StatusCode::kInvalidArgument, {"tensor 'w'", "non-integer"});
  ExpectError(MakeFile(R"({"w":{"dtype":"U8","shape":"3","data_offsets":[0,0]}})"),
              absl::StatusCode::kInvalidArgument, {"tensor 'w'", "shape"});
  ExpectError(
      MakeFile(R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}})"),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "too many elements"});
  ExpectError(
      MakeFile(R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})"),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "too many elements"});
}

TEST_F(SafetensorsCorruptTest, OverlappingTensors) {
  ExpectError(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                       R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                       "12345678"),
              absl::StatusCode::kInvalidArgument, {"'a'", "'b'", "overlap"});
  ExpectError(MakeFile(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                       R"("b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})",
                       "1234"),
              absl::StatusCode::kInvalidArgument, {"overlap"});
}

// ---------------------------------------------------------------------------------------------
// Fuzz: random corruptions of valid files never crash, and whatever opens holds only views that
// can be read to the end.

void FuzzOneFile(const std::string& valid, const std::string& path, int iterations,
                 uint64_t seed) {
  std::mt19937_64 rng(seed);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) {
    header_len = (header_len << 8) | static_cast<unsigned char>(valid[i]);
  }
  const size_t header_end = std::min<size_t>(valid.size(), 8 + header_len);
  int opened = 0;
  std::map<absl::StatusCode, int> codes;
  for (int it = 0; it < iterations; ++it) {
    std::string bytes = valid;
    switch (rng() % 5) {
      case 0:  // truncate
        bytes.resize(rng() % bytes.size());
        break;
      case 1:  // flip a few bytes anywhere
        for (int k = 0, n = 1 + rng() % 4; k < n; ++k) {
          bytes[rng() % bytes.size()] ^= static_cast<char>(1 << (rng() % 8));
        }
        break;
      case 2:  // printable garbage in the header
        for (int k = 0, n = 1 + rng() % 3; k < n; ++k) {
          bytes[8 + rng() % (header_end - 8)] = static_cast<char>(' ' + rng() % 95);
        }
        break;
      case 3: {  // change the numbers in the header: offsets and shapes
        std::vector<size_t> digits;
        for (size_t i = 8; i < header_end; ++i) {
          if (bytes[i] >= '0' && bytes[i] <= '9') digits.push_back(i);
        }
        for (int k = 0, n = 1 + rng() % 3; k < n && !digits.empty(); ++k) {
          const size_t at = digits[rng() % digits.size()];
          if (rng() % 3 == 0) {
            bytes[at] = '-';
          } else {
            bytes[at] = static_cast<char>('0' + rng() % 10);
          }
        }
        break;
      }
      case 4:  // the header length
        if (rng() % 2) {
          bytes[rng() % 8] = static_cast<char>(rng());
        } else {
          const uint64_t n = header_len + (rng() % 17) - 8;
          for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
        }
        break;
    }
    WriteFileOrDie(path, bytes);
    auto file = SafetensorsFile::Open(path);
    codes[file.status().code()]++;
    if (!file.ok()) {
      EXPECT_THAT(file.status().message(), HasSubstr(path));
      continue;
    }
    ++opened;
    uint64_t total = 0;
    for (const auto& t : (*file)->tensors()) {
      ASSERT_EQ(t.nbytes, static_cast<size_t>(t.numel()) * DTypeSize(t.dtype));
      ASSERT_LE(t.nbytes, bytes.size());
      const auto* p = static_cast<const unsigned char*>(t.data);
      volatile unsigned char sink = 0;
      for (size_t i = 0; i < t.nbytes; ++i) sink ^= p[i];
      (void)sink;
      total += t.nbytes;
    }
    EXPECT_LE(total, bytes.size());
  }
  std::string summary;
  for (const auto& [code, n] : codes) {
    absl::StrAppend(&summary, absl::StatusCodeToString(code), "=", n, " ");
  }
  std::cout << "fuzz " << path << ": " << summary << "\n";
  EXPECT_GT(opened, 0) << "some mutations (e.g. data bytes) must still open";
}

TEST(SafetensorsFuzzTest, RandomCorruptionsNeverCrash) {
  TempDir dir;
  const std::string header =
      R"({"__metadata__":{"format":"pt"},)"
      R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"("b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},)"
      R"("c":{"dtype":"I8","shape":[],"data_offsets":[32,33]},)"
      R"("d":{"dtype":"F8_E4M3","shape":[0,2],"data_offsets":[33,33]},)"
      R"("e":{"dtype":"I64","shape":[1,1],"data_offsets":[33,41]}}  )";
  std::string data(41, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 37);
  const std::string valid = MakeFile(header, data);
  WriteFileOrDie(dir.Join("valid.safetensors"), valid);
  ASSERT_TRUE(SafetensorsFile::Open(dir.Join("valid.safetensors")).ok());
  FuzzOneFile(valid, dir.Join("fuzz.safetensors"), 3000, 1);
}

TEST_F(SafetensorsPythonTest, RandomCorruptionsOfAPythonFileNeverCrash) {
  const std::string valid = ReadFileOrDie(dir_->Join("all_dtypes.safetensors"));
  ASSERT_GT(valid.size(), 8u);
  FuzzOneFile(valid, dir_->Join("fuzz.safetensors"), 2000, 2);
}

}  // namespace
}  // namespace kiln::pipeline
