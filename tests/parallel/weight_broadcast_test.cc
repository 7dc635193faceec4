// parallel::BroadcastWeights over gloo, ranks as real processes: the test launches
// kiln-broadcast-bench (bench/broadcast_bench.cc) once per rank on loopback. Rank 0 is given the
// checkpoint; every other rank is given a folder that does not exist, so a rank that opened a
// file would fail: what they save must still be byte-identical to the checkpoint rank 0 read.
// The checkpoint is sharded (an index and two files) and holds every dtype kind a node loads
// (f32, bf16, f16, fp8, bool, int64), a scalar and an empty tensor.
#include "parallel/weight_broadcast.h"

#include <fstream>
#include <future>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/subprocess.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "pipeline/weights.h"
#include "tests/pipeline/test_support.h"

namespace kiln::parallel {
namespace {

using ::testing::HasSubstr;

// Writes a two-shard transformer checkpoint under `model`/transformer; `wide` changes one shape
// (a different checkpoint with the same names).
void WriteCheckpoint(const std::string& model, bool wide) {
  const std::string dir = model + "/transformer";
  ASSERT_TRUE(std::filesystem::create_directories(dir));
  torch::manual_seed(7);
  std::vector<std::pair<std::string, at::Tensor>> a = {
      {"blocks.0.attn.qkv.weight", torch::randn({96, wide ? 40 : 33})},
      {"blocks.0.attn.qkv.bias", torch::randn({96}).to(torch::kBFloat16)},
      {"blocks.0.mlp.weight", torch::randn({64, 48}).to(torch::kHalf)},
      {"blocks.0.mlp.fp8", torch::randn({32, 16}).to(torch::kFloat8_e4m3fn)},
  };
  std::vector<std::pair<std::string, at::Tensor>> b = {
      {"big", torch::randint(0, 255, {3 << 20}, torch::kByte)},
      {"mask", torch::rand({13}) > 0.5},
      {"step", torch::tensor(42, torch::kLong)},
      {"empty", torch::empty({0, 4})},
  };
  const std::string stem = "diffusion_pytorch_model";
  nlohmann::json map = nlohmann::json::object();
  for (auto [tensors, file] : {std::pair{&a, stem + "-00001-of-00002.safetensors"},
                               std::pair{&b, stem + "-00002-of-00002.safetensors"}}) {
    ASSERT_TRUE(pipeline::WriteSafetensors(dir + "/" + file, *tensors).ok());
    for (const auto& [name, t] : *tensors) map[name] = file;
  }
  std::ofstream(dir + "/" + stem + ".safetensors.index.json")
      << nlohmann::json{{"weight_map", map}}.dump();
}

std::string DigestOf(const std::string& model) {
  auto set = pipeline::WeightSet::OpenDir(model + "/transformer", "diffusion_pytorch_model");
  EXPECT_TRUE(set.ok()) << set.status();
  return set.ok() ? ManifestDigest(**set) : "";
}

struct Rank {
  std::string model;          // --model
  std::string expect_digest;  // --expect_digest
  int world = 0;              // --world (0: the test's)
};

class WeightBroadcastTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string bin = kiln::testing::EnvOrEmpty("KILN_BIN");
    if (bin.empty()) GTEST_SKIP() << "KILN_BIN not set (run under ctest)";
    tool_ = bin + "/kiln-broadcast-bench";
    ASSERT_TRUE(std::filesystem::exists(tool_)) << tool_ << " not built";
    if (!HasGloo()) GTEST_SKIP() << "no gloo in this build";
    model_ = tmp_.Join("model");
    WriteCheckpoint(model_, /*wide=*/false);
  }

  // Runs one process per entry of `ranks` (rank = index) and returns their results.
  std::vector<ProcessResult> Launch(const std::vector<Rank>& ranks, double timeout = 30) {
    const std::string port_file = tmp_.Join(absl::StrCat("port-", ++launches_));
    std::vector<std::future<absl::StatusOr<ProcessResult>>> running;
    for (size_t r = 0; r < ranks.size(); ++r) {
      std::vector<std::string> argv = {
          tool_,
          "--model",
          ranks[r].model,
          "--rank",
          absl::StrCat(r),
          "--world",
          absl::StrCat(ranks[r].world ? ranks[r].world : static_cast<int>(ranks.size())),
          "--port_file",
          port_file,
          "--timeout",
          absl::StrCat(timeout),
          "--save",
          Saved(r),
          "--expect_digest",
          ranks[r].expect_digest};
      running.push_back(std::async(std::launch::async, [argv] { return RunProcess(argv); }));
    }
    std::vector<ProcessResult> results;
    for (auto& f : running) {
      auto result = f.get();
      EXPECT_TRUE(result.ok()) << result.status();
      results.push_back(result.ok() ? *result : ProcessResult{});
    }
    return results;
  }

  std::string Saved(size_t rank) const {
    return tmp_.Join(absl::StrCat("rank", rank, ".safetensors"));
  }

  // Every rank's output against the checkpoint: same names, dtypes, shapes and bytes.
  void ExpectIdentical(int world, const std::vector<ProcessResult>& results) {
    auto source = pipeline::WeightSet::OpenDir(model_ + "/transformer", "diffusion_pytorch_model");
    ASSERT_TRUE(source.ok()) << source.status();
    const std::string digest = ManifestDigest(**source);
    for (int r = 0; r < world; ++r) {
      ASSERT_EQ(results[r].exit_code, 0) << "rank " << r << ": " << results[r].stderr_text;
      auto out = nlohmann::json::parse(results[r].stdout_text);
      EXPECT_EQ(out["digest"], digest);
      EXPECT_EQ(out["tensors"], (*source)->size());
      EXPECT_EQ(out["bytes"], (*source)->total_bytes());
      auto got = pipeline::WeightSet::OpenFiles({Saved(r)});
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_EQ((*got)->names(), (*source)->names()) << "rank " << r;
      for (const std::string& name : (*source)->names()) {
        const pipeline::TensorView* want = (*source)->Find(name);
        const pipeline::TensorView* have = (*got)->Find(name);
        EXPECT_EQ(have->dtype, want->dtype) << "rank " << r << " " << name;
        EXPECT_EQ(have->shape, want->shape) << "rank " << r << " " << name;
        ASSERT_EQ(have->nbytes, want->nbytes) << "rank " << r << " " << name;
        EXPECT_TRUE(want->nbytes == 0 || std::memcmp(have->data, want->data, want->nbytes) == 0)
            << "rank " << r << " " << name << ": bytes differ";
      }
    }
  }

  kiln::testing::TempDir tmp_;
  std::string tool_;
  std::string model_;
  int launches_ = 0;
};

TEST_F(WeightBroadcastTest, TwoRanksGetRankZerosBytesWithoutOpeningFiles) {
  auto results = Launch({{model_}, {"/nonexistent/model"}});
  ExpectIdentical(2, results);
}

TEST_F(WeightBroadcastTest, FourRanksGetRankZerosBytesWithoutOpeningFiles) {
  const std::string digest = DigestOf(model_);
  auto results = Launch({{model_, digest},
                         {"/nonexistent/1", digest},
                         {"/nonexistent/2", digest},
                         {"/nonexistent/3"}});
  ExpectIdentical(4, results);
}

TEST_F(WeightBroadcastTest, ARankExpectingAnotherCheckpointFailsEveryRank) {
  const std::string other_model = tmp_.Join("other");
  WriteCheckpoint(other_model, /*wide=*/true);
  const std::string other = DigestOf(other_model);
  const std::string ours = DigestOf(model_);
  ASSERT_NE(other, ours);
  auto results = Launch({{model_}, {"/nonexistent/1"}, {"/nonexistent/2", other}});
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(results[r].exit_code, 1) << "rank " << r << ": " << results[r].stderr_text;
    EXPECT_FALSE(std::filesystem::exists(Saved(r))) << "rank " << r;
  }
  EXPECT_THAT(results[2].stderr_text, HasSubstr(absl::StrCat("rank 2 expects checkpoint manifest ",
                                                             other, ", rank 0 read ", ours)));
  for (int r : {0, 1}) {
    EXPECT_THAT(
        results[r].stderr_text,
        HasSubstr(absl::StrCat("rank(s) 2 refused rank 0's checkpoint (manifest ", ours, ")")));
  }
}

TEST_F(WeightBroadcastTest, RankZeroThatCannotReadFailsEveryRank) {
  auto results = Launch({{tmp_.Join("missing")}, {"/nonexistent/1"}});
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(results[r].exit_code, 1) << results[r].stderr_text;
    EXPECT_THAT(results[r].stderr_text,
                HasSubstr("rank 0 could not read the checkpoint: component folder"));
  }
}

TEST_F(WeightBroadcastTest, AMissingRankTimesOutWithItsNumber) {
  // A world of 3 with ranks 0 and 1 started: both fail within the 2 s join timeout, naming rank 2.
  auto results = Launch({{model_, "", 3}, {"/nonexistent/1", "", 3}}, /*timeout=*/2);
  EXPECT_EQ(results[0].exit_code, 1);
  EXPECT_THAT(results[0].stderr_text, HasSubstr("rank(s) 2 of 3 did not join within 2 s"));
  EXPECT_EQ(results[1].exit_code, 1);
  EXPECT_THAT(results[1].stderr_text,
              HasSubstr("rank 0 refused the group: rank(s) 2 of 3 did not join"));
}

TEST_F(WeightBroadcastTest, AWorldSizeMismatchFailsBothRanks) {
  auto results = Launch({{model_, "", 2}, {"/nonexistent/1", "", 4}}, /*timeout=*/5);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(results[r].exit_code, 1);
    EXPECT_THAT(
        results[r].stderr_text,
        HasSubstr("world size mismatch: rank 0 has 2, rank 1 was started with world size 4"));
  }
}

}  // namespace
}  // namespace kiln::parallel
