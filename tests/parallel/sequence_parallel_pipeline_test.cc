// parallel::SequenceParallelPipeline (parallel/sequence_parallel_pipeline.h): a whole flux-tiny
// image made on 2 gloo ranks, threads of this process (c10d's thread isolation mode: each thread
// registers its group under "0", the name the packages' all-to-alls resolve), against the
// single-rank FluxPipeline with the regional layout, same prompt, seed and size; the follower
// without the transformer checkpoint (rank 0 broadcasts it at Create).
//
// Fixtures (scripts/test.sh): packages-regional (every component of the 256x256 bucket, the
// transformer as a regional set: the reference) and packages-sp (only the transformer, one
// rank's set of 2). The ranks' provider reads packages-sp first, then packages-regional, so the
// transformer comes by KeyPolicy's sequence-parallel key and the other components as today.
//
// Tolerance: the two runs compute the same latents within fp32 rounding (1.6e-7 of max|latents|,
// tests/parallel/sequence_parallel_test.cc); after the VAE and the rounding to 8 bits a byte
// may land on the other side of a .5: at most 1 level of 255 on at most 1e-3 of the bytes
// (FluxPipeline's batch test allows the same for the same reason). A wrong share (the halves of
// the image swapped, as a follower denoising rank 0's tokens would give) differs by far more:
// the test checks that too.
#include "parallel/sequence_parallel_pipeline.h"

#include <algorithm>
#include <filesystem>
#include <functional>
#include <future>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/pipeline/fixture_provider.h"
#include "tests/pipeline/test_support.h"

namespace kiln::parallel {
namespace {
namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr int kMaxByteDiff = 1;
constexpr double kMaxDifferingFraction = 1e-3;

pipeline::PipelineOptions Options(int ranks) {
  pipeline::PipelineOptions o;
  o.model_dir = kiln::testing::EnvOrEmpty("KILN_TESTDATA") + "/flux-tiny";
  o.resolutions = {{256, 256}, {256, 240}};  // 240: 15 patch rows, which 2 ranks cannot share
  o.compile_options["layout"] = "regional";
  if (ranks > 1) o.compile_options["sequence_parallel"] = ranks;
  return o;
}

pipeline::GenerateRequest Request() {
  pipeline::GenerateRequest r;
  r.prompt = "a lighthouse on a cliff at dusk";
  r.width = 256;
  r.height = 256;
  r.steps = 2;
  r.seed = 7;
  return r;
}

class SequenceParallelPipelineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string data = kiln::testing::EnvOrEmpty("KILN_TESTDATA");
    if (data.empty()) GTEST_SKIP() << "KILN_TESTDATA not set (ctest)";
    if (!HasGloo()) GTEST_SKIP() << "no gloo in this build";
    if (!fs::is_directory(data + "/packages-regional") ||
        !fs::is_directory(data + "/packages-sp")) {
      GTEST_SKIP() << "needs packages-regional and packages-sp in " << data
                   << " (scripts/test.sh makes them)";
    }
  }
  std::shared_ptr<cache::PackageProvider> SpProvider() {
    return std::make_shared<kiln::testing::ChainProvider>(
        kiln::testing::FixtureProvider("packages-sp"),
        kiln::testing::FixtureProvider("packages-regional"));
  }
};

// A copy of the flux-tiny repository (links to its files) whose transformer folder has its
// config and no checkpoint: a rank given it can read the configs and tokenizers, never the
// transformer weights.
std::string WithoutTransformerWeights(const std::string& name) {
  const fs::path model = fs::path(kiln::testing::EnvOrEmpty("KILN_TESTDATA")) / "flux-tiny";
  const fs::path out = fs::path(::testing::TempDir()) / name;
  fs::remove_all(out);
  fs::create_directories(out / "transformer");
  for (const auto& e : fs::directory_iterator(model)) {
    if (e.path().filename() != "transformer") {
      fs::create_symlink(e.path(), out / e.path().filename());
    }
  }
  for (const auto& e : fs::directory_iterator(model / "transformer")) {
    if (e.path().filename().string().find(".safetensors") == std::string::npos) {
      fs::create_symlink(e.path(), out / "transformer" / e.path().filename());
    }
  }
  return out.string();
}

// What each thread rank saw.
struct RankLog {
  absl::Status created;
  uint64_t broadcast_bytes = 0;  // SequenceParallelPipeline::broadcast_bytes()
  double broadcast_seconds = 0;
  std::vector<absl::Status> jobs;  // rank 0: each Generate's status; rank 1: each Follow's
  std::vector<uint8_t> rgb;        // rank 0: the first job's image
  std::vector<std::string> phases;
};

// Runs 2 ranks as threads of this process, each with its group and pipeline (`providers[r]`;
// options `options(r)`, Options(2) if null), rank 0 running `lead`, rank 1 `follow`; returns
// their logs.
std::pair<RankLog, RankLog> RunRanks(
    const std::vector<std::shared_ptr<cache::PackageProvider>>& providers,
    const std::function<void(SequenceParallelPipeline&, RankLog&)>& lead,
    const std::function<void(SequenceParallelPipeline&, RankLog&)>& follow,
    const std::function<pipeline::PipelineOptions(int rank)>& options = nullptr) {
  c10d::set_thread_isolation_mode(true);
  std::promise<int> listening;
  auto run = [&](int rank) {
    RankLog log;
    torch::NoGradGuard no_grad;
    GroupOptions o;
    o.world_size = 2;
    o.rank = rank;
    o.timeout_seconds = 30;
    if (rank == 0) {
      o.on_listen = [&](int port) { listening.set_value(port); };
    } else {
      auto port = listening.get_future();
      if (port.wait_for(std::chrono::seconds(30)) != std::future_status::ready) {
        log.created = absl::DeadlineExceededError("rank 0 never listened");
        return log;
      }
      o.port = port.get();
    }
    auto group = ProcessGroup::Create(o);
    if (!group.ok()) {
      log.created = group.status();
      return log;
    }
    auto sp = SequenceParallelPipeline::Create(**group, options ? options(rank) : Options(2),
                                               providers[rank]);
    log.created = sp.status();
    if (!sp.ok()) return log;
    log.broadcast_bytes = (*sp)->broadcast_bytes();
    log.broadcast_seconds = (*sp)->broadcast_seconds();
    (rank == 0 ? lead : follow)(**sp, log);
    return log;
  };
  auto rank0 = std::async(std::launch::async, run, 0);
  auto rank1 = std::async(std::launch::async, run, 1);
  std::pair<RankLog, RankLog> logs(rank0.get(), rank1.get());
  c10d::set_thread_isolation_mode(false);
  return logs;
}

// The follower is given a repository without the transformer checkpoint: it runs on the
// weights rank 0 read once and broadcast at Create (without them the same folder fails a
// single-rank pipeline, checked first).
TEST_F(SequenceParallelPipelineTest, TwoThreadRanksMakeTheSingleRankImage) {
  // The reference: one rank, the ordinary regional set.
  auto single = pipeline::FluxPipeline::Create(Options(1),
                                               kiln::testing::FixtureProvider("packages-regional"));
  ASSERT_TRUE(single.ok()) << single.status();
  auto want = (*single)->Generate(Request());
  ASSERT_TRUE(want.ok()) << want.status();
  single->reset();
  pipeline::PipelineOptions follower_options = Options(2);
  follower_options.model_dir = WithoutTransformerWeights("sp_pipeline_no_weights");
  {
    pipeline::PipelineOptions alone = Options(1);
    alone.model_dir = follower_options.model_dir;
    auto bare = pipeline::FluxPipeline::Create(alone,
                                               kiln::testing::FixtureProvider("packages-regional"));
    ASSERT_TRUE(bare.ok()) << bare.status();
    auto failed = (*bare)->Generate(Request());
    EXPECT_EQ(failed.status().code(), absl::StatusCode::kNotFound) << failed.status();
    EXPECT_THAT(failed.status().message(), HasSubstr(follower_options.model_dir + "/transformer"));
  }

  auto provider = SpProvider();
  auto lead = [](SequenceParallelPipeline& sp, RankLog& log) {
    // 1. A job over both ranks.
    auto first = sp.Generate(Request(), [&](const std::string& phase, int step, int) {
      log.phases.push_back(absl::StrCat(phase, " ", step));
    });
    log.jobs.push_back(first.status());
    if (first.ok()) log.rgb = first->rgb;
    // 2. A size whose 15 patch rows do not divide over 2 ranks: refused on rank 0 alone.
    pipeline::GenerateRequest odd = Request();
    odd.height = 240;
    log.jobs.push_back(sp.Generate(odd).status());
    // 3. Rank 0 gives the job up after the followers heard of it (cancelled before the loop).
    pipeline::CancelToken token;
    pipeline::GenerateRequest cancelled = Request();
    cancelled.cancel = &token;
    log.jobs.push_back(sp.Generate(cancelled, [&](const std::string& phase, int, int) {
                           if (phase == "text_encoding") token.Cancel();
                         }).status());
    log.jobs.push_back(sp.Stop());
  };
  auto follow = [](SequenceParallelPipeline& sp, RankLog& log) {
    for (int i = 0; i < 3; ++i) log.jobs.push_back(sp.Follow());
  };
  const auto [leader, follower] =
      RunRanks({provider, provider}, lead, follow,
               [&](int rank) { return rank == 0 ? Options(2) : follower_options; });

  ASSERT_TRUE(leader.created.ok()) << leader.created;
  ASSERT_TRUE(follower.created.ok()) << follower.created;
  // The whole checkpoint went over the group, the same bytes on both ranks.
  const uint64_t checkpoint_bytes = fs::file_size(
      kiln::testing::EnvOrEmpty("KILN_TESTDATA") +
      "/flux-tiny/transformer/diffusion_pytorch_model.safetensors");
  EXPECT_GT(leader.broadcast_bytes, checkpoint_bytes * 9 / 10);
  EXPECT_LE(leader.broadcast_bytes, checkpoint_bytes);
  EXPECT_EQ(follower.broadcast_bytes, leader.broadcast_bytes);
  std::cout << "[sp pipeline] transformer weights broadcast: " << leader.broadcast_bytes
            << " bytes, rank 0 " << leader.broadcast_seconds * 1e3 << " ms (read and send), rank 1 "
            << follower.broadcast_seconds * 1e3 << " ms (wait and receive)" << std::endl;
  ASSERT_EQ(leader.jobs.size(), 4u);
  ASSERT_EQ(follower.jobs.size(), 3u);
  ASSERT_TRUE(leader.jobs[0].ok()) << leader.jobs[0];
  EXPECT_TRUE(follower.jobs[0].ok()) << follower.jobs[0];
  EXPECT_THAT(leader.phases, ::testing::Contains("denoising 2"));
  EXPECT_EQ(leader.phases.back(), "decoding 2");

  ASSERT_EQ(leader.rgb.size(), want->rgb.size());
  int max_diff = 0;
  size_t differing = 0;
  for (size_t i = 0; i < leader.rgb.size(); ++i) {
    const int d = std::abs(int{leader.rgb[i]} - int{want->rgb[i]});
    max_diff = std::max(max_diff, d);
    differing += d != 0;
  }
  std::cout << "[sp pipeline] 2 ranks vs 1: max byte diff " << max_diff << ", " << differing
            << " of " << leader.rgb.size() << " bytes differ" << std::endl;
  EXPECT_LE(max_diff, kMaxByteDiff);
  EXPECT_LE(static_cast<double>(differing) / leader.rgb.size(), kMaxDifferingFraction);
  // The comparison tells the ranks' shares apart: rank 1's half (the bottom 128 rows) in
  // rank 0's place differs on most bytes.
  const size_t half = leader.rgb.size() / 2;
  std::vector<uint8_t> swapped(leader.rgb.begin() + half, leader.rgb.end());
  swapped.insert(swapped.end(), leader.rgb.begin(), leader.rgb.begin() + half);
  size_t swapped_differing = 0;
  for (size_t i = 0; i < swapped.size(); ++i) swapped_differing += swapped[i] != want->rgb[i];
  EXPECT_GT(static_cast<double>(swapped_differing) / swapped.size(), 0.5);

  // The size that does not divide: rank 0's sentence; the follower served the next job.
  EXPECT_EQ(leader.jobs[1].code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(leader.jobs[1].message(),
              HasSubstr("its 15 patch rows do not divide over 2 sequence-parallel ranks"));
  // The leader's failure after the header: the follower returns it, in step, and is stopped.
  EXPECT_EQ(leader.jobs[2].code(), absl::StatusCode::kCancelled) << leader.jobs[2];
  EXPECT_EQ(follower.jobs[1].code(), absl::StatusCode::kAborted) << follower.jobs[1];
  EXPECT_THAT(follower.jobs[1].message(),
              HasSubstr("rank 0 failed the job: cancelled after step 0 of 2"));
  EXPECT_TRUE(leader.jobs[3].ok()) << leader.jobs[3];
  EXPECT_EQ(follower.jobs[2].code(), absl::StatusCode::kOutOfRange) << follower.jobs[2];
}

// A follower that cannot get its transformer set (its store lacks packages-sp) says why; rank 0
// names it; both are then in step for the next message.
TEST_F(SequenceParallelPipelineTest, AFollowerWithoutItsSetFailsTheJobOnEveryRank) {
  auto lead = [](SequenceParallelPipeline& sp, RankLog& log) {
    log.jobs.push_back(sp.Generate(Request()).status());
    log.jobs.push_back(sp.Stop());
  };
  auto follow = [](SequenceParallelPipeline& sp, RankLog& log) {
    for (int i = 0; i < 2; ++i) log.jobs.push_back(sp.Follow());
  };
  const auto [leader, follower] =
      RunRanks({SpProvider(), kiln::testing::FixtureProvider("packages-regional")}, lead, follow);
  ASSERT_TRUE(leader.created.ok()) << leader.created;
  ASSERT_TRUE(follower.created.ok()) << follower.created;
  ASSERT_EQ(leader.jobs.size(), 2u);
  ASSERT_EQ(follower.jobs.size(), 2u);
  EXPECT_EQ(leader.jobs[0].code(), absl::StatusCode::kFailedPrecondition) << leader.jobs[0];
  EXPECT_THAT(leader.jobs[0].message(), HasSubstr("rank(s) 1 could not take the job"));
  EXPECT_EQ(follower.jobs[0].code(), absl::StatusCode::kNotFound) << follower.jobs[0];
  EXPECT_TRUE(leader.jobs[1].ok()) << leader.jobs[1];
  EXPECT_EQ(follower.jobs[1].code(), absl::StatusCode::kOutOfRange) << follower.jobs[1];
}

// A job's LoRA set travels in its header and every rank merges it into its own regional
// weights: the 2-rank image with a LoRA is the single-rank regional image with it (the
// tolerance above) and not the base image; back to no LoRA gives the first 2-rank base image
// byte for byte. A LoRA only rank 0 has (rank 1's directories lack it) fails the job on both
// ranks, rank 0 naming rank 1 and its reason, and the next job runs.
TEST_F(SequenceParallelPipelineTest, EveryRankMergesTheJobsLorasAndOneMissingOnAFollowerFails) {
  if (!kiln::testing::HavePython()) GTEST_SKIP() << "needs KILN_PYTHON (kiln.make_lora)";
  kiln::testing::TempDir dir;
  const std::string loras = dir.Join("loras"), only_rank0 = dir.Join("rank0");
  auto made = kiln::testing::RunPython(
      "pipeline/python/kiln/make_lora.py",
      {"make", "--model", Options(1).model_dir, "--out", loras, "--name", "style", "--layout",
       "kohya", "--rank", "8", "--seed", "1"});
  ASSERT_TRUE(made.ok()) << made.status();
  fs::create_directories(only_rank0);
  for (const std::string ext : {".safetensors", ".safetensors.sha256"}) {
    fs::copy_file(loras + "/style" + ext, only_rank0 + "/elsewhere" + ext);
  }
  pipeline::GenerateRequest with = Request();
  with.loras = {{"style", -0.5}};
  pipeline::GenerateRequest missing = Request();
  missing.loras = {{"elsewhere", 1}};

  pipeline::PipelineOptions single_options = Options(1);
  single_options.lora_dirs = {loras};
  auto single = pipeline::FluxPipeline::Create(
      single_options, kiln::testing::FixtureProvider("packages-regional"));
  ASSERT_TRUE(single.ok()) << single.status();
  auto want = (*single)->Generate(with);
  ASSERT_TRUE(want.ok()) << want.status();
  single->reset();

  std::vector<std::vector<uint8_t>> images;  // rank 0's: base, with the LoRA, base again
  auto lead = [&](SequenceParallelPipeline& sp, RankLog& log) {
    for (const pipeline::GenerateRequest& request : {Request(), with, missing, Request()}) {
      auto r = sp.Generate(request);
      log.jobs.push_back(r.status());
      if (r.ok()) images.push_back(r->rgb);
    }
    log.jobs.push_back(sp.Stop());
  };
  auto follow = [](SequenceParallelPipeline& sp, RankLog& log) {
    for (int i = 0; i < 5; ++i) log.jobs.push_back(sp.Follow());
  };
  auto options = [&](int rank) {
    pipeline::PipelineOptions o = Options(2);
    o.lora_dirs = rank == 0 ? std::vector<std::string>{loras, only_rank0}
                            : std::vector<std::string>{loras};
    return o;
  };
  auto provider = SpProvider();
  const auto [leader, follower] = RunRanks({provider, provider}, lead, follow, options);
  ASSERT_TRUE(leader.created.ok()) << leader.created;
  ASSERT_TRUE(follower.created.ok()) << follower.created;
  ASSERT_EQ(leader.jobs.size(), 5u);
  ASSERT_EQ(follower.jobs.size(), 5u);
  for (int i : {0, 1, 3}) {
    EXPECT_TRUE(leader.jobs[i].ok()) << i << ": " << leader.jobs[i];
    EXPECT_TRUE(follower.jobs[i].ok()) << i << ": " << follower.jobs[i];
  }
  ASSERT_EQ(images.size(), 3u);

  ASSERT_EQ(images[1].size(), want->rgb.size());
  int max_diff = 0;
  size_t differing = 0, from_base = 0;
  for (size_t i = 0; i < want->rgb.size(); ++i) {
    const int d = std::abs(int{images[1][i]} - int{want->rgb[i]});
    max_diff = std::max(max_diff, d);
    differing += d != 0;
    from_base += images[1][i] != images[0][i];
  }
  std::cout << "[sp pipeline] with a LoRA, 2 ranks vs 1: max byte diff " << max_diff << ", "
            << differing << " of " << want->rgb.size() << " bytes differ" << std::endl;
  EXPECT_LE(max_diff, kMaxByteDiff);
  EXPECT_LE(static_cast<double>(differing) / want->rgb.size(), kMaxDifferingFraction);
  EXPECT_GT(static_cast<double>(from_base) / want->rgb.size(), 0.5) << "the LoRA changed nothing";
  EXPECT_EQ(images[2], images[0]) << "back to no LoRA is not the base image";

  // The LoRA rank 1 lacks: rank 1's NotFound names where it looked; rank 0 names rank 1 and why.
  EXPECT_EQ(follower.jobs[2].code(), absl::StatusCode::kNotFound) << follower.jobs[2];
  EXPECT_THAT(follower.jobs[2].message(), HasSubstr(loras + "/elsewhere.safetensors"));
  EXPECT_EQ(leader.jobs[2].code(), absl::StatusCode::kFailedPrecondition) << leader.jobs[2];
  EXPECT_THAT(leader.jobs[2].message(), HasSubstr("rank(s) 1 could not take the job (rank 1: "));
  EXPECT_THAT(leader.jobs[2].message(), HasSubstr("elsewhere.safetensors"));
  EXPECT_TRUE(leader.jobs[4].ok()) << leader.jobs[4];
  EXPECT_EQ(follower.jobs[4].code(), absl::StatusCode::kOutOfRange) << follower.jobs[4];
}

// Rank 0 cannot read the transformer checkpoint: the broadcast carries its error, and every
// rank's Create fails with it (no rank waits for weights that never come).
TEST_F(SequenceParallelPipelineTest, ABroadcastRankZeroCannotReadFailsEveryRank) {
  pipeline::PipelineOptions bare = Options(2);
  bare.model_dir = WithoutTransformerWeights("sp_pipeline_no_weights_rank0");
  auto never = [](SequenceParallelPipeline&, RankLog&) { ADD_FAILURE() << "created"; };
  const auto [leader, follower] =
      RunRanks({SpProvider(), SpProvider()}, never, never,
               [&](int rank) { return rank == 0 ? bare : Options(2); });
  for (const RankLog* log : {&leader, &follower}) {
    EXPECT_EQ(log->created.code(), absl::StatusCode::kFailedPrecondition) << log->created;
    EXPECT_THAT(log->created.message(),
                HasSubstr("sequence parallel: the transformer weights broadcast: "));
    EXPECT_THAT(log->created.message(), HasSubstr(bare.model_dir + "/transformer"));
  }
}

// A set whose all-to-alls resolve another group name than the group's own (compile option
// process_group; the node names each group, node_factory.h): refused at Create on every rank,
// before the weights move. (The loop refuses such a set too: sequence_parallel_test.cc.)
TEST_F(SequenceParallelPipelineTest, ASetForAnotherGroupNameIsRefusedAtCreate) {
  pipeline::PipelineOptions named = Options(2);
  named.compile_options["process_group"] = "flux-tiny/fp32";
  auto never = [](SequenceParallelPipeline&, RankLog&) { ADD_FAILURE() << "created"; };
  const auto [leader, follower] =
      RunRanks({SpProvider(), SpProvider()}, never, never, [&](int) { return named; });
  for (const RankLog* log : {&leader, &follower}) {
    EXPECT_EQ(log->created.code(), absl::StatusCode::kFailedPrecondition) << log->created;
    EXPECT_THAT(log->created.message(),
                HasSubstr("the package set's all-to-alls resolve process group "
                          "\"flux-tiny/fp32\" (compile_options process_group), the group is "
                          "registered as \"0\""));
  }
}

// Options for a set of 2 ranks in a group of one: refused at Create, before anything loads.
TEST_F(SequenceParallelPipelineTest, ASetForTwoRanksIsRefusedInAGroupOfOne) {
  GroupOptions o;
  o.group_name = "";  // not registered: nothing runs a package
  auto group = ProcessGroup::Create(o);
  ASSERT_TRUE(group.ok()) << group.status();
  auto sp = SequenceParallelPipeline::Create(**group, Options(2), SpProvider());
  EXPECT_EQ(sp.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(sp.status().message(),
              HasSubstr("the package set (compile_options sequence_parallel) is for 2 rank(s), "
                        "the group has 1"));
  // A plain FluxPipeline refuses the set too: only a denoise_loop can run it.
  auto alone = pipeline::FluxPipeline::Create(Options(2), SpProvider());
  EXPECT_EQ(alone.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(alone.status().message(), HasSubstr("SequenceParallelPipeline"));
}

}  // namespace
}  // namespace kiln::parallel
