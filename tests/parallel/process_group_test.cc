// parallel::ProcessGroup: option checks, a group of one registered by name, and the join
// protocol's errors over a real TCPStore on loopback. Multi-rank groups here are threads of
// this process, each with its own group (gloo allows it); tests/parallel/weight_broadcast_test
// runs ranks as processes.
#include "parallel/process_group.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <future>
#include <thread>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include "absl/strings/match.h"
#include "common/stopwatch.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::parallel {
namespace {

using ::testing::HasSubstr;

GroupOptions Options(int rank, int world, int port = 0, double timeout = 30) {
  GroupOptions o;
  o.rank = rank;
  o.world_size = world;
  o.port = port;
  o.timeout_seconds = timeout;
  o.group_name = "";  // threads of one process share c10d's registry: register nothing
  return o;
}

// A loopback port that is bound but not listening (connections are refused) while this lives.
class DeadPort {
 public:
  DeadPort() {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    if (bind(fd_, reinterpret_cast<sockaddr*>(&a), len) == 0 &&
        getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
      port_ = ntohs(a.sin_port);
    }
  }
  ~DeadPort() { close(fd_); }
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
};

// Starts `options` for every rank but 0 on threads once rank 0 listens; returns each rank's
// Create() status, in rank order. Rank 0 runs on the calling thread.
std::vector<absl::Status> Start(GroupOptions rank0, std::vector<GroupOptions> others) {
  std::vector<std::future<absl::Status>> futures;
  rank0.on_listen = [&](int port) {
    for (GroupOptions o : others) {
      o.port = port;
      futures.push_back(std::async(std::launch::async, [o] {
        auto g = ProcessGroup::Create(o);
        return g.status();
      }));
    }
  };
  std::vector<absl::Status> statuses;
  auto g0 = ProcessGroup::Create(rank0);
  statuses.push_back(g0.status());
  for (auto& f : futures) statuses.push_back(f.get());
  return statuses;
}

TEST(GroupOptionsTest, NamesTheBadField) {
  EXPECT_TRUE(Options(0, 1).Validate().ok());
  auto s = Options(4, 4, 1234).Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("rank: 4 is out of range for world size 4"));
  EXPECT_THAT(std::string(Options(-1, 2, 1234).Validate().message()), HasSubstr("rank: -1"));
  EXPECT_THAT(std::string(Options(0, 0).Validate().message()), HasSubstr("world_size: 0"));
  EXPECT_THAT(std::string(Options(1, 2, 0).Validate().message()),
              HasSubstr("port: rank 1 needs rank 0's port"));
  EXPECT_THAT(std::string(Options(0, 2, 70000).Validate().message()), HasSubstr("port: 70000"));
  EXPECT_THAT(std::string(Options(0, 1, 0, 0).Validate().message()),
              HasSubstr("timeout_seconds: 0"));
  GroupOptions o = Options(0, 1);
  o.device = "tpu";
  EXPECT_THAT(std::string(o.Validate().message()), HasSubstr("device: 'tpu'"));
  o.device = "meta";
  EXPECT_THAT(std::string(o.Validate().message()), HasSubstr("device: meta"));
  o.device = "cuda";
  EXPECT_THAT(std::string(o.Validate().message()), HasSubstr("device: cuda needs an index"));
  // Create checks the options too, before touching the network.
  EXPECT_EQ(ProcessGroup::Create(Options(2, 2, 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ProcessGroupTest, CudaWithoutNcclIsUnimplemented) {
  if (HasNccl()) GTEST_SKIP() << "this build has NCCL";
  GroupOptions o = Options(0, 1);
  o.device = "cuda:0";
  auto g = ProcessGroup::Create(o);
  EXPECT_EQ(g.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(g.status().message()), HasSubstr("no NCCL"));
}

TEST(ProcessGroupTest, GroupOfOneIsRegisteredUnderItsNameUntilDestroyed) {
  if (!HasGloo()) GTEST_SKIP() << "no gloo in this build";
  GroupOptions o = Options(0, 1);
  o.group_name = "kiln-test-one";
  auto g = ProcessGroup::Create(o);
  ASSERT_TRUE(g.ok()) << g.status();
  // What an AOTI package's functional collective does with the name it was exported with.
  auto resolved = c10d::resolve_process_group("kiln-test-one");
  EXPECT_EQ(resolved.get(), (*g)->c10d_group().get());
  EXPECT_EQ(resolved->getSize(), 1);
  at::Tensor t = torch::arange(6, torch::kFloat32);
  EXPECT_TRUE((*g)->Broadcast(t).ok());
  EXPECT_TRUE(torch::equal(t, torch::arange(6, torch::kFloat32)));
  // Scatter's checks come before any collective (a peer is never left waiting on them).
  at::Tensor piece = torch::zeros({6});
  auto two = (*g)->Scatter({t, t}, piece);
  EXPECT_EQ(two.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(two.message(), HasSubstr("scatter: 2 chunks for 1 ranks"));
  EXPECT_EQ((*g)->Scatter({t}, piece, 1).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE((*g)->Scatter({t}, piece).ok());
  EXPECT_TRUE(torch::equal(piece, t));
  g->reset();
  EXPECT_ANY_THROW(c10d::resolve_process_group("kiln-test-one"));
}

TEST(ProcessGroupTest, UnreachableStoreFailsWithinTheTimeout) {
  DeadPort dead;
  ASSERT_GT(dead.port(), 0);
  const SteadyTime start = SteadyNow();
  auto g = ProcessGroup::Create(Options(1, 2, dead.port(), 1.0));
  const double took = SecondsSince(start);
  EXPECT_EQ(g.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(g.status().message()),
              HasSubstr("rank 1: rank 0's store not reachable at 127.0.0.1:" +
                        std::to_string(dead.port())));
  EXPECT_LT(took, 10.0);  // bounded: LibTorch retries once more after the first timeout
}

TEST(ProcessGroupTest, MissingRanksAreNamedWhenTheJoinTimesOut) {
  const SteadyTime start = SteadyNow();
  auto statuses = Start(Options(0, 4, 0, 1.0), {Options(1, 4, 0, 1.0)});
  EXPECT_LT(SecondsSince(start), 10.0);
  EXPECT_EQ(statuses[0].code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(statuses[0].message()),
              HasSubstr("rank(s) 2, 3 of 4 did not join within 1 s"));
  // Rank 1 is told why, not left to time out on its own.
  EXPECT_EQ(statuses[1].code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(statuses[1].message()),
              HasSubstr("rank 0 refused the group: rank(s) 2, 3 of 4 did not join"));
}

TEST(ProcessGroupTest, WorldSizeMismatchFailsEveryRank) {
  auto statuses = Start(Options(0, 2), {Options(1, 4)});
  EXPECT_EQ(statuses[0].code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(statuses[0].message()),
              HasSubstr("world size mismatch: rank 0 has 2, rank 1 was started with world size 4"));
  EXPECT_EQ(statuses[1].code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(statuses[1].message()),
              HasSubstr("rank 1 was started with world size 4"));
}

TEST(ProcessGroupTest, ARankTakenTwiceIsRefused) {
  auto statuses = Start(Options(0, 2, 0, 2.0), {Options(1, 2, 0, 2.0), Options(1, 2, 0, 2.0)});
  int twice = 0;
  for (size_t i = 1; i < statuses.size(); ++i) {
    if (absl::StrContains(statuses[i].message(), "rank 1 joined twice")) {
      ++twice;
      EXPECT_EQ(statuses[i].code(), absl::StatusCode::kFailedPrecondition);
    }
  }
  EXPECT_EQ(twice, 1);
}

TEST(ProcessGroupTest, ThreeRanksGatherBroadcastAndScatter) {
  if (!HasGloo()) GTEST_SKIP() << "no gloo in this build";
  std::vector<std::future<std::string>> futures;
  auto run = [](std::unique_ptr<ProcessGroup> g) -> std::string {
    at::Tensor mine = torch::full({2}, static_cast<int64_t>(10 + g->rank()), torch::kLong);
    auto all = g->AllGather(mine);
    if (!all.ok()) return std::string(all.status().message());
    std::string got;
    for (const auto& t : *all) got += std::to_string(t[0].item<int64_t>()) + " ";
    at::Tensor b =
        g->rank() == 0 ? torch::arange(5, torch::kByte) : torch::zeros({5}, torch::kByte);
    if (auto s = g->Broadcast(b); !s.ok()) return std::string(s.message());
    got += std::to_string(b.sum().item<int64_t>());
    // Rank r receives chunk r (100 + r, three times) from rank 0; the others pass no chunks.
    std::vector<at::Tensor> chunks;
    for (int r = 0; g->rank() == 0 && r < 3; ++r) {
      chunks.push_back(torch::full({3}, static_cast<int64_t>(100 + r), torch::kLong));
    }
    at::Tensor piece = torch::zeros({3}, torch::kLong);
    if (auto s = g->Scatter(chunks, piece); !s.ok()) return std::string(s.message());
    got += " " + std::to_string(piece.sum().item<int64_t>() - 3 * g->rank());
    return got;
  };
  GroupOptions o0 = Options(0, 3);
  o0.on_listen = [&](int port) {
    for (int r = 1; r < 3; ++r) {
      futures.push_back(std::async(std::launch::async, [=] {
        auto g = ProcessGroup::Create(Options(r, 3, port));
        return g.ok() ? run(std::move(*g)) : std::string(g.status().message());
      }));
    }
  };
  auto g0 = ProcessGroup::Create(o0);
  ASSERT_TRUE(g0.ok()) << g0.status();
  EXPECT_EQ(run(std::move(*g0)), "10 11 12 10 300");
  for (auto& f : futures) EXPECT_EQ(f.get(), "10 11 12 10 300");
}

TEST(ProcessGroupTest, APeerThatNeverTakesPartFailsTheCollectiveWithinTheTimeout) {
  if (!HasGloo()) GTEST_SKIP() << "no gloo in this build";
  std::promise<void> done;
  std::future<absl::Status> peer;
  GroupOptions o0 = Options(0, 2, 0, 1.0);
  o0.on_listen = [&](int port) {
    peer = std::async(std::launch::async, [&, port] {
      auto g = ProcessGroup::Create(Options(1, 2, port, 1.0));
      done.get_future().wait();  // joined, but never calls the broadcast
      return g.status();
    });
  };
  auto g0 = ProcessGroup::Create(o0);
  ASSERT_TRUE(g0.ok()) << g0.status();
  at::Tensor t = torch::arange(1000, torch::kFloat32);
  const SteadyTime start = SteadyNow();
  absl::Status s = (*g0)->Broadcast(t);
  EXPECT_LT(SecondsSince(start), 10.0);
  done.set_value();
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("rank 0: collective failed (a peer gone, or not done within 1 s)"));
  EXPECT_TRUE(peer.get().ok());
}

}  // namespace
}  // namespace kiln::parallel
