// parallel::SequenceParallelDenoise (parallel/sequence_parallel.h): the Ulysses denoise loop over
// every block of the flux-tiny transformer on 2 ranks, against the same loop on 1 rank.
//
// The ranks are real processes (kiln-sp-denoise, bench/sp/sp_denoise_run.cc, one per rank, gloo
// over loopback): c10d's group registry is per process, and each rank registers its group under
// the name the packages' all-to-alls resolve, "0". The package sets are scripts/test.sh's
// fixtures, both for flux-tiny 256x256 with 512 text tokens, fp32, CPU:
//   packages-regional  the ordinary regional set (the single-rank reference, run with --world 1)
//   packages-sp        the same bucket for one rank of 2 (kiln-compile --height 128
//                      --text-len 256 --compile-options '{"layout": "regional",
//                      "sequence_parallel": 2}'): every block with its all-to-alls
// Tolerance: 3e-6 of max|latents| (docs/multi_gpu.md). The two runs compute the same function
// with fp32 reductions in another order (GEMMs over half the rows, attention's softmax sums over
// the keys gathered rank by rank): errors of a few float32 ulps of the largest value (1.2e-7
// each), measured 1.7e-7 to 3.4e-7 in Python; 3e-6 leaves a factor of ~10 and is still far
// below what a wrong shard, a wrong RoPE row or a missing all-to-all gives (the test checks
// that swapping the two ranks' shards is caught).
#include "parallel/sequence_parallel.h"

#include <filesystem>
#include <future>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include "absl/strings/str_cat.h"
#include "common/subprocess.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "cache/package_dir.h"
#include "pipeline/json_file.h"
#include "pipeline/key_policy.h"
#include "pipeline/scheduler.h"
#include "pipeline/weights.h"
#include "tests/pipeline/test_support.h"

namespace kiln::parallel {
namespace {
namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr double kTolerance = 3e-6;
constexpr int kSteps = 2;

TEST(TokenShardTest, ShardsAreContiguousAndCoverTheTokens) {
  const at::Tensor x = torch::arange(2 * 6 * 3, torch::kFloat).view({2, 6, 3});
  std::vector<at::Tensor> parts;
  for (int r = 0; r < 3; ++r) {
    auto shard = TokenShard(x, r, 3);
    ASSERT_TRUE(shard.ok()) << shard.status();
    EXPECT_EQ(shard->sizes(), (std::vector<int64_t>{2, 2, 3}));
    EXPECT_TRUE(torch::equal(*shard, x.slice(1, 2 * r, 2 * r + 2)));
    parts.push_back(*shard);
  }
  EXPECT_TRUE(torch::equal(torch::cat(parts, 1), x));
  auto one = TokenShard(x, 0, 1);
  ASSERT_TRUE(one.ok());
  EXPECT_TRUE(torch::equal(*one, x));
}

TEST(TokenShardTest, RefusesWhatDoesNotDivideAndBadRankCounts) {
  const at::Tensor x = torch::zeros({1, 7, 4});
  auto odd = TokenShard(x, 0, 2, 1, "image tokens");
  EXPECT_EQ(odd.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(odd.status().message(), HasSubstr("7 image tokens do not divide over 2 ranks"));
  auto none = TokenShard(x, 0, 0);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(none.status().message(), HasSubstr("a rank count of 0"));
  auto beyond = TokenShard(x, 2, 2);
  EXPECT_EQ(beyond.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(beyond.status().message(), HasSubstr("rank 2 is not one of 2 ranks"));
  auto dim = TokenShard(x, 0, 1, 3);
  EXPECT_EQ(dim.status().code(), absl::StatusCode::kInvalidArgument);
}

// The regional transformer set under `root` compiled for `ranks` sequence-parallel ranks.
std::string FindSet(const std::string& root, int ranks) {
  if (!fs::is_directory(root)) return "";
  for (const auto& entry : fs::directory_iterator(root)) {
    auto m = pipeline::ReadJsonObject(entry.path().string() + "/manifest.json");
    if (!m.ok() || m->value("layout", "") != "regional") continue;
    const nlohmann::json options = m->value("compile_options", nlohmann::json::object());
    if (options.value("sequence_parallel", 1) == ranks) return entry.path().string();
  }
  return "";
}

class SequenceParallelDenoiseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string bin = kiln::testing::EnvOrEmpty("KILN_BIN");
    const std::string data = kiln::testing::EnvOrEmpty("KILN_TESTDATA");
    if (bin.empty() || data.empty()) GTEST_SKIP() << "KILN_BIN, KILN_TESTDATA not set (ctest)";
    if (!HasGloo()) GTEST_SKIP() << "no gloo in this build";
    tool_ = bin + "/kiln-sp-denoise";
    ASSERT_TRUE(fs::exists(tool_)) << tool_ << " not built";
    model_ = data + "/flux-tiny";
    single_ = FindSet(data + "/packages-regional", 1);
    sp2_ = FindSet(data + "/packages-sp", 2);
    if (single_.empty() || sp2_.empty()) {
      GTEST_SKIP() << "needs the regional sets in " << data
                   << "/packages-regional and packages-sp (scripts/test.sh makes them)";
    }
  }

  // Runs `world` ranks of kiln-sp-denoise on `set` at once (rank = index); `extra` flags for all.
  std::vector<ProcessResult> Launch(const std::string& set, int world,
                                    const std::vector<std::string>& extra = {}) {
    const std::string port_file = tmp_.Join(absl::StrCat("port-", ++launches_));
    std::vector<std::future<absl::StatusOr<ProcessResult>>> running;
    for (int r = 0; r < world; ++r) {
      std::vector<std::string> argv = {tool_,
                                       set,
                                       "--model",
                                       model_,
                                       "--world",
                                       absl::StrCat(world),
                                       "--rank",
                                       absl::StrCat(r),
                                       "--port_file",
                                       port_file,
                                       "--steps",
                                       absl::StrCat(kSteps),
                                       "--seed",
                                       "11",
                                       "--timeout",
                                       "30",
                                       "--out",
                                       Out(launches_, r)};
      argv.insert(argv.end(), extra.begin(), extra.end());
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

  std::string Out(int launch, int rank) const {
    return tmp_.Join(absl::StrCat("latents-", launch, "-", rank, ".safetensors"));
  }

  // The latents rank `rank` of launch `launch` wrote (copied out of the file).
  at::Tensor Latents(int launch, int rank) const {
    auto set = pipeline::WeightSet::OpenFiles({Out(launch, rank)});
    EXPECT_TRUE(set.ok()) << set.status();
    if (!set.ok()) return {};
    auto view = (*set)->Require("latents");
    EXPECT_TRUE(view.ok()) << view.status();
    auto t = pipeline::TensorFromView(**view);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? t->clone() : at::Tensor();
  }

  kiln::testing::TempDir tmp_;
  std::string tool_, model_, single_, sp2_;
  int launches_ = 0;
};

TEST_F(SequenceParallelDenoiseTest, TwoRanksGiveTheSingleRankLatents) {
  auto one = Launch(single_, 1);
  ASSERT_EQ(one[0].exit_code, 0) << one[0].stderr_text;
  const at::Tensor want = Latents(launches_, 0);
  auto two = Launch(sp2_, 2);
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(two[r].exit_code, 0) << "rank " << r << ": " << two[r].stderr_text;
    auto line = nlohmann::json::parse(two[r].stdout_text);
    EXPECT_EQ(line["sequence_parallel"], 2);
    EXPECT_EQ(line["image_tokens"], 256);
    EXPECT_EQ(line["text_tokens"], 512);
  }
  const at::Tensor got = Latents(launches_, 0);
  ASSERT_TRUE(want.defined() && got.defined());
  ASSERT_EQ(got.sizes(), want.sizes());
  EXPECT_EQ(want.sizes(), (std::vector<int64_t>{1, 256, 64}));
  // Every rank holds the same gathered latents.
  EXPECT_TRUE(torch::equal(Latents(launches_, 1), got));
  const double scale = want.abs().max().item<double>();
  const double err = (got - want).abs().max().item<double>() / scale;
  std::cout << "[sp] 2 ranks vs 1, " << kSteps << " steps: max|diff| / max|want| = " << err
            << std::endl;
  EXPECT_LE(err, kTolerance);
  // The comparison can tell the ranks' shares apart: the shards in the wrong order fail it.
  const at::Tensor swapped = torch::cat({got.slice(1, 128), got.slice(1, 0, 128)}, 1);
  EXPECT_GT((swapped - want).abs().max().item<double>() / scale, 1000 * kTolerance);
}

// The C++ key of the sequence-parallel transformer (KeyPolicy: one rank's bucket, the option in
// the digest) names the set kiln-compile made for it: a node asking its store for an SP set
// finds the one compiled for it.
TEST_F(SequenceParallelDenoiseTest, KeyPolicysKeyNamesTheCompiledSet) {
  auto config = pipeline::ReadJsonObject(model_ + "/transformer/config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  pipeline::KeyPolicyOptions o;
  o.configs["transformer"] = *config;
  o.compile_options = cache::DefaultCompileOptions();
  o.compile_options["layout"] = "regional";
  o.compile_options["sequence_parallel"] = 2;  // as scripts/test.sh's sp_fixture
  o.resolutions = {{256, 256}};
  o.text_len = 512;
  const pipeline::KeyPolicy policy(o);
  ASSERT_TRUE(policy.CheckResolution(256, 256).ok());
  EXPECT_EQ(policy.KeyFor("transformer", 256, 256).Digest(), fs::path(sp2_).filename().string());
}

// The ranks as threads of one process (a node's worker thread per GPU): each thread registers
// its own group under "0" in c10d's per-thread registry (thread isolation mode), runs the same
// loop, and must give kiln-sp-denoise's single-rank latents.
TEST_F(SequenceParallelDenoiseTest, TwoThreadRanksInOneProcessGiveTheSingleRankLatents) {
  auto one = Launch(single_, 1);
  ASSERT_EQ(one[0].exit_code, 0) << one[0].stderr_text;
  const at::Tensor want = Latents(launches_, 0);
  auto manifest = cache::PackageManifest::FromFile(sp2_ + "/manifest.json");
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  auto set = cache::VerifyPackageDir(sp2_, manifest->key);
  ASSERT_TRUE(set.ok()) << set.status();
  auto weights = pipeline::ComponentWeights::Open(model_ + "/transformer",
                                                  "diffusion_pytorch_model", c10::kCPU);
  ASSERT_TRUE(weights.ok()) << weights.status();
  auto config =
      pipeline::SchedulerConfig::FromJsonFile(model_ + "/scheduler/scheduler_config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  auto flux = pipeline::MakeFluxSchedule(*config, kSteps, 256);
  ASSERT_TRUE(flux.ok()) << flux.status();
  pipeline::DenoiseSchedule schedule;
  schedule.sigmas = flux->sigmas;
  std::vector<float> t(kSteps * 4, 0.0f);
  for (int i = 0; i < kSteps; ++i) t[i * 4] = pipeline::FluxModelTimestep(*flux, i);
  schedule.timesteps = torch::tensor(t).view({kSteps, 4});
  // kiln-sp-denoise's inputs for --seed 11.
  SequenceParallelInputs inputs;
  auto gen = at::detail::createCPUGenerator(11);
  inputs.latents = at::randn({1, 256, 64}, gen, at::kFloat);
  inputs.conditioning.text = at::randn({1, 512, 32}, gen, at::kFloat);
  inputs.conditioning.pooled = at::randn({1, 32}, gen, at::kFloat);
  inputs.conditioning.guidance = torch::full({1}, 3.5f);

  // One transformer per rank, loaded here (ComponentWeights is not thread-safe; the tensors
  // it hands out are shared, read-only).
  std::vector<std::unique_ptr<pipeline::RegionalTransformer>> transformers;
  for (int r = 0; r < 2; ++r) {
    auto t = pipeline::RegionalTransformer::Load(*set, c10::kCPU);
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_TRUE((*t)->LoadWeights(**weights).ok());
    transformers.push_back(*std::move(t));
  }
  // Without thread isolation the second rank could not register its group under "0" (tried:
  // this test then fails).
  c10d::set_thread_isolation_mode(true);
  auto run = [&](GroupOptions o) -> absl::StatusOr<at::Tensor> {
    torch::NoGradGuard no_grad;
    o.world_size = 2;
    o.timeout_seconds = 30;
    auto group = ProcessGroup::Create(o);
    if (!group.ok()) return group.status();
    return SequenceParallelDenoise(**group, *transformers[o.rank],
                                   o.rank == 0 ? inputs : SequenceParallelInputs{}, schedule,
                                   at::kFloat);
  };
  std::promise<int> listening;
  GroupOptions o0;
  o0.on_listen = [&](int port) { listening.set_value(port); };
  auto rank0 = std::async(std::launch::async, run, o0);
  auto rank1 = std::async(std::launch::async, [&]() -> absl::StatusOr<at::Tensor> {
    auto port = listening.get_future();
    if (port.wait_for(std::chrono::seconds(30)) != std::future_status::ready) {
      return absl::DeadlineExceededError("rank 0 never listened");
    }
    GroupOptions o1;
    o1.rank = 1;
    o1.port = port.get();
    return run(o1);
  });
  auto got0 = rank0.get();
  auto got1 = rank1.get();
  c10d::set_thread_isolation_mode(false);
  ASSERT_TRUE(got0.ok()) << got0.status();
  ASSERT_TRUE(got1.ok()) << got1.status();
  EXPECT_TRUE(torch::equal(*got0, *got1));
  const double err =
      (*got0 - want).abs().max().item<double>() / want.abs().max().item<double>();
  std::cout << "[sp] 2 thread ranks vs 1: max|diff| / max|want| = " << err << std::endl;
  EXPECT_LE(err, kTolerance);
}

TEST_F(SequenceParallelDenoiseTest, ASetForTwoRanksRefusesAGroupOfOne) {
  auto one = Launch(sp2_, 1);
  EXPECT_EQ(one[0].exit_code, 1);
  EXPECT_THAT(one[0].stderr_text,
              HasSubstr("rank 0's package set is compiled for 2 rank(s), the group has 1"));
}

TEST_F(SequenceParallelDenoiseTest, AGroupUnderAnotherNameThanTheSetsIsRefused) {
  auto two = Launch(sp2_, 2, {"--group_name", "kiln-other"});
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(two[r].exit_code, 1) << "rank " << r;
    EXPECT_THAT(two[r].stderr_text,
                HasSubstr(absl::StrCat("rank ", r, "'s package set resolves process group \"0\", "
                                       "the group is registered as \"kiln-other\"")));
  }
}

TEST_F(SequenceParallelDenoiseTest, IndivisibleTokensOnRankZeroFailEveryRank) {
  // Rank 0 says why (InvalidArgument: exit status 2, bad input); rank 1 that rank 0 refused.
  auto two = Launch(sp2_, 2, {"--image_tokens", "255"});
  EXPECT_EQ(two[0].exit_code, 2);
  EXPECT_THAT(two[0].stderr_text, HasSubstr("255 image tokens do not divide over 2 ranks"));
  EXPECT_EQ(two[1].exit_code, 1);
  EXPECT_THAT(two[1].stderr_text, HasSubstr("rank(s) 0 refused the job"));
  // Divisible, but not what the set takes per rank.
  auto wide = Launch(sp2_, 2, {"--image_tokens", "512"});
  EXPECT_EQ(wide[0].exit_code, 2);
  EXPECT_THAT(wide[0].stderr_text, HasSubstr("the package set takes [1, 128, 64] per rank"));
  EXPECT_EQ(wide[1].exit_code, 1);
}

}  // namespace
}  // namespace kiln::parallel
