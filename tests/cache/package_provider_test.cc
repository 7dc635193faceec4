// Tests of TieredPackageProvider: local disk → shared store → compile under the cluster-wide lease
// (or wait for the holder), with corrupt copies refused, quarantined and rebuilt; single-flight
// compiles across threads, across nodes in one process and across processes; crashed and slow
// lease holders; the local size bound; and the kiln_artifact_* metrics, read back from the
// registry. Hermetic: temp dirs, a fake compiler, fake clocks where time matters. Tests that span
// processes re-run this binary as a helper (CrossProcessHelper.Run, selected by environment).
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <thread>
#include <vector>

#include "cache/package_provider.h"
#include "cache/shared_fs_store.h"
#include "common/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "tests/cache/cache_test_support.h"

extern char** environ;

namespace kiln::cache {
namespace {

namespace fs = std::filesystem;
using ::kiln::testing::EnvOrEmpty;
using ::kiln::testing::ReadFileOrDie;
using ::kiln::testing::TempDir;
using ::kiln::testing::WriteFileOrDie;
using ::testing::HasSubstr;
using namespace ::kiln::cache::testing;  // NOLINT: test helpers

// One node: its registry, provider and (non-owning) view of its fake compiler.
struct Node {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  FakeCompiler* compiler = nullptr;  // owned by provider; null if compiling is disabled
  std::unique_ptr<TieredPackageProvider> provider;

  double Requests(const std::string& tier, const std::string& result) {
    return CounterValue(*registry, "kiln_artifact_requests_total",
                        {{"tier", tier}, {"result", result}});
  }
  double Counter(const std::string& name, const std::map<std::string, std::string>& l = {}) {
    return CounterValue(*registry, name, l);
  }
};

struct NodeSpec {
  std::string local_root;
  std::string shared_root;  // "" = no shared tier
  bool compile = true;
  FakeCompiler::Options compiler;
  TieredOptions options;
  int64_t max_bytes = 0;
  const Clock* clock = nullptr;  // for the stores and the provider
};

NodeSpec Spec(std::string local_root, std::string shared_root) {
  NodeSpec spec;
  spec.local_root = std::move(local_root);
  spec.shared_root = std::move(shared_root);
  return spec;
}

std::unique_ptr<Node> MakeNode(NodeSpec spec) {
  auto node = std::make_unique<Node>();
  LocalDiskStoreOptions lo;
  lo.root = spec.local_root;
  lo.max_bytes = spec.max_bytes;
  lo.clock = spec.clock;
  auto local = LocalDiskStore::Open(lo, node->registry.get());
  EXPECT_TRUE(local.ok()) << local.status();
  std::unique_ptr<ArtifactStore> shared;
  if (!spec.shared_root.empty()) {
    SharedFsStoreOptions so;
    so.root = spec.shared_root;
    so.clock = spec.clock;
    auto s = SharedFsStore::Open(so);
    EXPECT_TRUE(s.ok()) << s.status();
    shared = *std::move(s);
  }
  std::unique_ptr<PackageCompiler> compiler;
  if (spec.compile) {
    auto c = std::make_unique<FakeCompiler>(spec.compiler);
    node->compiler = c.get();
    compiler = std::move(c);
  }
  spec.options.clock = spec.clock;
  if (spec.options.poll_initial_ms == TieredOptions().poll_initial_ms) {
    spec.options.poll_initial_ms = 10;  // tests wait in tens of ms, not seconds
    spec.options.poll_max_ms = 50;
  }
  auto p = TieredPackageProvider::Create(*std::move(local), std::move(shared), std::move(compiler),
                                         spec.options, node->registry.get());
  EXPECT_TRUE(p.ok()) << p.status();
  node->provider = *std::move(p);
  return node;
}

const char kModelDir[] = "/nonexistent/model";  // the fake compiler never reads it

// ---------------------------------------------------------------------------------------------
// Tiers

TEST(TieredProviderTest, LocalHit) {
  TempDir tmp;
  auto node = MakeNode(Spec(tmp.Join("local"), tmp.Join("shared")));
  const ArtifactKey key = MakeKey();
  PublishFakePackage(tmp.Join("local"), key);
  auto got = node->provider->Get({key, kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "local");
  EXPECT_EQ(got->package.dir, tmp.Join("local/") + key.Digest());
  EXPECT_TRUE(got->warning.empty());
  EXPECT_EQ(node->compiler->calls(), 0);
  EXPECT_EQ(node->Requests("local", "hit"), 1);
  EXPECT_EQ(node->Requests("shared", "miss"), 0);
}

TEST(TieredProviderTest, SharedHitIsFetchedIntoLocalAndVerified) {
  TempDir tmp;
  auto node = MakeNode(Spec(tmp.Join("local"), tmp.Join("shared")));
  const ArtifactKey key = MakeKey();
  PublishFakePackage(tmp.Join("shared"), key, 20'000);

  auto got = node->provider->Get({key, kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "shared");
  EXPECT_EQ(got->package.dir, tmp.Join("local/") + key.Digest());
  EXPECT_GT(got->fetch_seconds, 0);
  EXPECT_EQ(ReadFileOrDie(got->package.package_path),
            ReadFileOrDie(tmp.Join("shared/") + key.Digest() + "/model.pt2"));
  EXPECT_TRUE(node->provider->local().Find(key).ok());
  EXPECT_EQ(node->compiler->calls(), 0);
  EXPECT_EQ(node->Requests("local", "miss"), 1);
  EXPECT_EQ(node->Requests("shared", "hit"), 1);
  EXPECT_GE(node->Counter("kiln_artifact_fetch_bytes_total"), 20'000);
  EXPECT_EQ(HistogramCount(*node->registry, "kiln_artifact_fetch_seconds"), 1);

  auto again = node->provider->Get({key, kModelDir});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->provenance, "local");
  EXPECT_EQ(node->Requests("local", "hit"), 1);
}

TEST(TieredProviderTest, MissCompilesOncePublishesAndReleasesTheLease) {
  TempDir tmp;
  auto a = MakeNode(Spec(tmp.Join("a"), tmp.Join("shared")));
  const ArtifactKey key = MakeKey();
  auto got = a->provider->Get({key, kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
  EXPECT_EQ(a->compiler->calls(), 1);
  EXPECT_TRUE(fs::exists(tmp.Join("shared/") + key.Digest() + "/manifest.json"));
  EXPECT_FALSE(fs::exists(tmp.Join("shared/leases/") + key.Digest() + ".lease"));
  EXPECT_EQ(a->Requests("local", "miss"), 1);
  EXPECT_EQ(a->Requests("shared", "miss"), 1);
  EXPECT_EQ(a->Requests("compile", "hit"), 1);
  EXPECT_EQ(a->Counter("kiln_artifact_compiles_total", {{"result", "ok"}}), 1);
  EXPECT_EQ(a->Counter("kiln_artifact_compiles_total", {{"result", "error"}}), 0);
  EXPECT_EQ(HistogramCount(*a->registry, "kiln_artifact_compile_seconds"), 1);
  EXPECT_EQ(a->Counter("kiln_artifact_publishes_total", {{"result", "ok"}}), 1);
  EXPECT_EQ(a->Counter("kiln_artifact_lease_waits_total"), 0);

  // A fresh node finds it in the shared store and compiles nothing.
  auto b = MakeNode(Spec(tmp.Join("b"), tmp.Join("shared")));
  auto fresh = b->provider->Get({key, kModelDir});
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->provenance, "shared");
  EXPECT_EQ(b->compiler->calls(), 0);
}

TEST(TieredProviderTest, WithoutASharedStoreCompilesLocally) {
  TempDir tmp;
  auto node = MakeNode(Spec(tmp.Join("local"), ""));
  auto got = node->provider->Get({MakeKey(), kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
  EXPECT_EQ(node->compiler->calls(), 1);
  EXPECT_EQ(node->provider->shared(), nullptr);
}

TEST(TieredProviderTest, CorruptSharedCopyIsRefusedQuarantinedRebuiltAndRepublished) {
  TempDir tmp;
  auto node = MakeNode(Spec(tmp.Join("local"), tmp.Join("shared")));
  const ArtifactKey key = MakeKey();
  const std::string shared_dir = tmp.Join("shared/") + key.Digest();
  PublishFakePackage(tmp.Join("shared"), key);
  const std::string good = ReadFileOrDie(shared_dir + "/model.pt2");
  CorruptFile(shared_dir + "/model.pt2");

  auto got = node->provider->Get({key, kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
  EXPECT_THAT(got->warning, HasSubstr("corrupt"));
  EXPECT_EQ(node->compiler->calls(), 1);
  EXPECT_EQ(CountEntries(tmp.Join("shared/quarantine")), 1);
  // Republished, intact.
  EXPECT_EQ(ReadFileOrDie(shared_dir + "/model.pt2"), good);
  EXPECT_EQ(node->Requests("shared", "corrupt"), 1);
  EXPECT_EQ(node->Counter("kiln_artifact_compiles_total", {{"result", "ok"}}), 1);
  EXPECT_EQ(node->Counter("kiln_artifact_publishes_total", {{"result", "ok"}}), 1);

  auto other = MakeNode(Spec(tmp.Join("other"), tmp.Join("shared")));
  auto fetched = other->provider->Get({key, kModelDir});
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  EXPECT_EQ(fetched->provenance, "shared");
}

TEST(TieredProviderTest, CorruptLocalCopyIsQuarantinedAndRefetchedFromShared) {
  TempDir tmp;
  auto node = MakeNode(Spec(tmp.Join("local"), tmp.Join("shared")));
  const ArtifactKey key = MakeKey();
  PublishFakePackage(tmp.Join("shared"), key);
  PublishFakePackage(tmp.Join("local"), key);
  CorruptFile(tmp.Join("local/") + key.Digest() + "/model.pt2");

  auto got = node->provider->Get({key, kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "shared");
  EXPECT_THAT(got->warning, HasSubstr("quarantined"));
  EXPECT_EQ(node->compiler->calls(), 0);
  EXPECT_EQ(CountEntries(tmp.Join("local/quarantine")), 1);
  EXPECT_TRUE(node->provider->local().Find(key).ok());
  EXPECT_EQ(node->Requests("local", "corrupt"), 1);
  EXPECT_EQ(node->Requests("shared", "hit"), 1);
}

TEST(TieredProviderTest, MissEverywhereWithoutACompilerIsNotFound) {
  TempDir tmp;
  NodeSpec spec = Spec(tmp.Join("local"), tmp.Join("shared"));
  spec.compile = false;
  auto node = MakeNode(spec);
  EXPECT_FALSE(node->provider->can_compile());
  auto got = node->provider->Get({MakeKey(), kModelDir});
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(got.status().message(), HasSubstr("compiling is disabled"));
}

TEST(TieredProviderTest, CompilerErrorsPropagateAndReleaseTheLease) {
  TempDir tmp;
  NodeSpec spec = Spec(tmp.Join("local"), tmp.Join("shared"));
  spec.compiler.fail = absl::FailedPreconditionError("toolchain mismatch");
  auto node = MakeNode(spec);
  const ArtifactKey key = MakeKey();
  auto got = node->provider->Get({key, kModelDir});
  EXPECT_EQ(got.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(fs::exists(tmp.Join("shared/leases/") + key.Digest() + ".lease"));
  EXPECT_EQ(node->Counter("kiln_artifact_compiles_total", {{"result", "error"}}), 1);
  EXPECT_EQ(node->Requests("compile", "error"), 1);
}

TEST(TieredProviderTest, CorruptCompilerOutputIsDataLoss) {
  TempDir tmp;
  NodeSpec spec = Spec(tmp.Join("local"), tmp.Join("shared"));
  spec.compiler.write_corrupt = true;
  auto node = MakeNode(spec);
  const ArtifactKey key = MakeKey();
  auto got = node->provider->Get({key, kModelDir});
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(fs::exists(tmp.Join("shared/") + key.Digest()));  // nothing published
  EXPECT_EQ(node->Requests("compile", "corrupt"), 1);
}

TEST(TieredProviderTest, InvalidKeyAndOptionsAreInvalidArgument) {
  TempDir tmp;
  auto node = MakeNode(Spec(tmp.Join("local"), ""));
  ArtifactKey bad = MakeKey();
  bad.component = "unet";
  EXPECT_EQ(node->provider->Get({bad, kModelDir}).status().code(),
            absl::StatusCode::kInvalidArgument);

  auto local = [&] { return std::make_unique<LocalDiskStore>(tmp.Join("x")); };
  TieredOptions o;
  o.lease_renew_ms = o.lease_ttl_ms;
  auto p = TieredPackageProvider::Create(local(), nullptr, nullptr, o, nullptr);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(p.status().message(), HasSubstr("lease_renew_ms"));
  PackageRequest fast{MakeKey(), kModelDir, "fast"};
  auto got = node->provider->Get(fast);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(got.status().message(), HasSubstr("compile_options"));
  p = TieredPackageProvider::Create(nullptr, nullptr, nullptr, TieredOptions(), nullptr);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(TieredPackageProvider::Create(local(), nullptr, nullptr, TieredOptions(), nullptr).ok());
}

TEST(TieredProviderTest, EveryMetricExistsFromTheStart) {
  TempDir tmp;
  auto node = MakeNode(Spec(tmp.Join("local"), tmp.Join("shared")));
  for (const char* tier : {"local", "shared", "compile"}) {
    for (const char* result : {"hit", "miss", "corrupt", "error"}) {
      EXPECT_EQ(node->Requests(tier, result), 0) << tier << " " << result;
    }
  }
  for (const char* name : {"kiln_artifact_fetch_bytes_total", "kiln_artifact_lease_waits_total",
                           "kiln_artifact_lease_takeovers_total", "kiln_artifact_evictions_total"}) {
    EXPECT_EQ(node->Counter(name), 0) << name;
  }
  EXPECT_EQ(HistogramCount(*node->registry, "kiln_artifact_compile_seconds"), 0);
  EXPECT_EQ(HistogramCount(*node->registry, "kiln_artifact_fetch_seconds"), 0);
}

// ---------------------------------------------------------------------------------------------
// Single flight

TEST(TieredProviderTest, ThreadsOnOneNodeCompileOnce) {
  TempDir tmp;
  NodeSpec spec = Spec(tmp.Join("local"), tmp.Join("shared"));
  spec.compiler.delay = std::chrono::milliseconds(200);
  auto node = MakeNode(spec);
  const ArtifactKey key = MakeKey();
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      auto got = node->provider->Get({key, kModelDir});
      EXPECT_TRUE(got.ok()) << got.status();
      if (got.ok() && fs::exists(got->package.package_path)) ++ok;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 4);
  EXPECT_EQ(node->compiler->calls(), 1);
  EXPECT_EQ(node->Requests("compile", "hit"), 1);
  EXPECT_EQ(node->Requests("local", "hit"), 3);
}

TEST(TieredProviderTest, TwoNodesRacingCompileOnce) {
  TempDir tmp;
  std::vector<std::unique_ptr<Node>> nodes;
  for (const char* name : {"a", "b"}) {
    NodeSpec spec = Spec(tmp.Join(name), tmp.Join("shared"));
    spec.compiler.delay = std::chrono::milliseconds(300);
    spec.options.node_id = name;
    nodes.push_back(MakeNode(spec));
  }
  const ArtifactKey key = MakeKey();
  std::vector<std::string> provenance(2);
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i) {
    threads.emplace_back([&, i] {
      auto got = nodes[i]->provider->Get({key, kModelDir});
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_TRUE(fs::exists(got->package.package_path));
      provenance[i] = got->provenance;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(nodes[0]->compiler->calls() + nodes[1]->compiler->calls(), 1);
  std::sort(provenance.begin(), provenance.end());
  EXPECT_EQ(provenance, (std::vector<std::string>{"compiled", "shared"}));
  EXPECT_EQ(nodes[0]->Counter("kiln_artifact_lease_waits_total") +
                nodes[1]->Counter("kiln_artifact_lease_waits_total"),
            1);
}

TEST(TieredProviderTest, StaleLeaseOfACrashedHolderIsTakenOverAndCompiledOnce) {
  TempDir tmp;
  FakeClock clock;
  NodeSpec spec = Spec(tmp.Join("local"), tmp.Join("shared"));
  spec.clock = &clock;
  auto node = MakeNode(spec);
  const ArtifactKey key = MakeKey();
  fs::create_directories(tmp.Join("shared/leases"));
  LeaseInfo stale{key.Digest(), "crashed-node", 99999, "gone-host", clock.UnixMs() - 1000, "t0"};
  WriteFileOrDie(tmp.Join("shared/leases/") + key.Digest() + ".lease", stale.ToJson().dump());

  auto got = node->provider->Get({key, kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
  EXPECT_THAT(got->warning, HasSubstr("took over"));
  EXPECT_EQ(node->compiler->calls(), 1);
  EXPECT_EQ(node->Counter("kiln_artifact_lease_takeovers_total"), 1);
  EXPECT_EQ(node->Counter("kiln_artifact_lease_waits_total"), 0);
  EXPECT_FALSE(fs::exists(tmp.Join("shared/leases/") + key.Digest() + ".lease"));
}

TEST(TieredProviderTest, LongCompileRenewsItsLeaseSoOthersWait) {
  TempDir tmp;
  NodeSpec a_spec = Spec(tmp.Join("a"), tmp.Join("shared"));
  a_spec.compiler.delay = std::chrono::milliseconds(1200);  // four lease lifetimes
  a_spec.options.lease_ttl_ms = 300;
  a_spec.options.lease_renew_ms = 100;
  a_spec.options.node_id = "slow-node";
  auto a = MakeNode(a_spec);
  NodeSpec b_spec = Spec(tmp.Join("b"), tmp.Join("shared"));
  b_spec.options.lease_ttl_ms = 300;
  b_spec.options.node_id = "waiting-node";
  auto b = MakeNode(b_spec);
  const ArtifactKey key = MakeKey();

  std::thread slow([&] {
    auto got = a->provider->Get({key, kModelDir});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->provenance, "compiled");
    EXPECT_TRUE(got->warning.empty()) << got->warning;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  auto got = b->provider->Get({key, kModelDir});
  slow.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "shared");
  EXPECT_GT(got->wait_seconds, 0.5);
  EXPECT_EQ(a->compiler->calls(), 1);
  EXPECT_EQ(b->compiler->calls(), 0);
  EXPECT_EQ(b->Counter("kiln_artifact_lease_waits_total"), 1);
  EXPECT_EQ(b->Counter("kiln_artifact_lease_takeovers_total"), 0);
}

TEST(TieredProviderTest, WaitingIsBoundedByMaxWait) {
  TempDir tmp;
  NodeSpec spec = Spec(tmp.Join("local"), tmp.Join("shared"));
  spec.options.max_wait_ms = 300;
  auto node = MakeNode(spec);
  const ArtifactKey key = MakeKey();
  // Another node holds a live lease and never publishes.
  auto store = SharedFsStore::Open({tmp.Join("shared"), "", nullptr});
  ASSERT_TRUE(store.ok());
  auto lease = (*store)->TryAcquireLease(key.Digest(), {"stuck-node", 60'000});
  ASSERT_TRUE(lease.ok());

  auto got = node->provider->Get({key, kModelDir});
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(got.status().message(), HasSubstr("stuck-node"));
  EXPECT_EQ(node->compiler->calls(), 0);
  EXPECT_EQ(node->Counter("kiln_artifact_lease_waits_total"), 1);
}

TEST(TieredProviderTest, HolderThatFailsReleasesAndAWaiterCompiles) {
  TempDir tmp;
  NodeSpec a_spec = Spec(tmp.Join("a"), tmp.Join("shared"));
  a_spec.compiler.delay = std::chrono::milliseconds(200);
  a_spec.compiler.fail = absl::InternalError("out of memory");
  auto a = MakeNode(a_spec);
  auto b = MakeNode(Spec(tmp.Join("b"), tmp.Join("shared")));
  const ArtifactKey key = MakeKey();
  std::thread failing([&] {
    EXPECT_EQ(a->provider->Get({key, kModelDir}).status().code(), absl::StatusCode::kInternal);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  auto got = b->provider->Get({key, kModelDir});
  failing.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
  EXPECT_EQ(b->compiler->calls(), 1);
}

// ---------------------------------------------------------------------------------------------
// Local size bound

TEST(TieredProviderTest, LocalBoundEvictsOldestButNotAPackageInUse) {
  TempDir tmp;
  FakeClock clock;
  const ArtifactKey k1 = MakeKey(16), k2 = MakeKey(32), k3 = MakeKey(48), k4 = MakeKey(64);
  for (const auto& k : {k1, k2, k3, k4}) PublishFakePackage(tmp.Join("shared"), k, 10'000);
  const int64_t entry = DirBytes(tmp.Join("shared/") + k1.Digest());
  NodeSpec spec = Spec(tmp.Join("local"), tmp.Join("shared"));
  spec.clock = &clock;
  spec.max_bytes = 2 * entry + entry / 2;
  auto node = MakeNode(spec);

  auto in_use = node->provider->Get({k1, kModelDir});  // held, as the pipeline holds it while loading
  ASSERT_TRUE(in_use.ok());
  for (const auto& k : {k2, k3, k4}) {
    clock.AdvanceMs(1000);
    auto got = node->provider->Get({k, kModelDir});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->provenance, "shared");
  }
  auto& local = node->provider->local();
  EXPECT_TRUE(fs::exists(local.DirFor(k1.Digest())));  // oldest, but pinned
  EXPECT_FALSE(fs::exists(local.DirFor(k2.Digest())));
  EXPECT_FALSE(fs::exists(local.DirFor(k3.Digest())));
  EXPECT_TRUE(fs::exists(local.DirFor(k4.Digest())));
  EXPECT_LE(local.BytesUsed(), local.max_bytes());
  EXPECT_EQ(node->Counter("kiln_artifact_evictions_total"), 2);

  in_use = absl::NotFoundError("released");  // drops the pin
  EXPECT_FALSE(local.IsPinned(k1.Digest()));
  clock.AdvanceMs(1000);
  ASSERT_TRUE(node->provider->Get({k2, kModelDir}).ok());
  EXPECT_FALSE(fs::exists(local.DirFor(k1.Digest())));
  EXPECT_EQ(node->compiler->calls(), 0);
}

// ---------------------------------------------------------------------------------------------
// Across processes: this binary re-run as a helper.

std::string SelfPath() {
  std::error_code ec;
  return fs::read_symlink("/proc/self/exe", ec).string();
}

pid_t SpawnHelper(const std::map<std::string, std::string>& env) {
  std::vector<std::string> vars;
  for (char** e = environ; *e != nullptr; ++e) vars.emplace_back(*e);
  for (const auto& [k, v] : env) vars.push_back(k + "=" + v);
  std::vector<char*> envp;
  for (auto& v : vars) envp.push_back(v.data());
  envp.push_back(nullptr);
  std::string self = SelfPath();
  std::string filter = "--gtest_filter=CrossProcessHelper.Run";
  char* argv[] = {self.data(), filter.data(), nullptr};
  pid_t pid = -1;
  EXPECT_EQ(::posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv, envp.data()), 0);
  return pid;
}

int WaitExit(pid_t pid) {
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

bool WaitForFile(const std::string& path, std::chrono::milliseconds limit) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (fs::exists(path)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

// The helper process. KILN_CACHE_HELPER selects what it does:
//   get:        one node (KILN_LOCAL, KILN_SHARED) Get()s MakeKey() once KILN_GO exists, with a
//               slow fake compiler counting into KILN_COUNTER; writes the provenance to KILN_RESULT.
//   hold_lease: takes the compile lease for MakeKey() in KILN_SHARED with ttl KILN_TTL_MS, touches
//               KILN_READY and sleeps until killed (a compiler that crashes mid-compile).
TEST(CrossProcessHelper, Run) {
  const std::string mode = EnvOrEmpty("KILN_CACHE_HELPER");
  if (mode.empty()) GTEST_SKIP() << "only runs as a helper process";
  const ArtifactKey key = MakeKey();
  if (mode == "get") {
    NodeSpec spec = Spec(EnvOrEmpty("KILN_LOCAL"), EnvOrEmpty("KILN_SHARED"));
    spec.compiler.delay = std::chrono::milliseconds(400);
    spec.compiler.counter_file = EnvOrEmpty("KILN_COUNTER");
    auto node = MakeNode(spec);
    ASSERT_TRUE(WaitForFile(EnvOrEmpty("KILN_GO"), std::chrono::seconds(20)));
    auto got = node->provider->Get({key, kModelDir});
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_TRUE(fs::exists(got->package.package_path));
    WriteFileOrDie(EnvOrEmpty("KILN_RESULT"), got->provenance);
  } else if (mode == "hold_lease") {
    auto store = SharedFsStore::Open({EnvOrEmpty("KILN_SHARED"), "", nullptr});
    ASSERT_TRUE(store.ok()) << store.status();
    auto lease = (*store)->TryAcquireLease(
        key.Digest(), {"doomed-node", std::stoll(EnvOrEmpty("KILN_TTL_MS"))});
    ASSERT_TRUE(lease.ok()) << lease.status();
    WriteFileOrDie(EnvOrEmpty("KILN_READY"), "held");
    std::this_thread::sleep_for(std::chrono::seconds(60));
    FAIL() << "should have been killed";
  } else {
    FAIL() << "unknown helper mode " << mode;
  }
}

TEST(CrossProcessTest, TwoProcessesRacingOnOneKeyCompileOnce) {
  TempDir tmp;
  const std::string counter = tmp.Join("compiles");
  std::vector<pid_t> pids;
  for (const char* name : {"p1", "p2"}) {
    pids.push_back(SpawnHelper({{"KILN_CACHE_HELPER", "get"},
                                {"KILN_LOCAL", tmp.Join(name)},
                                {"KILN_SHARED", tmp.Join("shared")},
                                {"KILN_COUNTER", counter},
                                {"KILN_GO", tmp.Join("go")},
                                {"KILN_RESULT", tmp.Join(std::string(name) + ".result")}}));
  }
  // Both processes are up and built their nodes before either looks for the key.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  WriteFileOrDie(tmp.Join("go"), "go");
  for (pid_t pid : pids) EXPECT_EQ(WaitExit(pid), 0);

  EXPECT_EQ(FileSize(counter), 1) << "compiler calls across both processes";
  std::vector<std::string> provenance = {ReadFileOrDie(tmp.Join("p1.result")),
                                         ReadFileOrDie(tmp.Join("p2.result"))};
  std::sort(provenance.begin(), provenance.end());
  EXPECT_EQ(provenance, (std::vector<std::string>{"compiled", "shared"}));
  const ArtifactKey key = MakeKey();
  for (const char* dir : {"p1", "p2", "shared"}) {
    EXPECT_TRUE(fs::exists(tmp.Join(dir) + "/" + key.Digest() + "/manifest.json")) << dir;
  }
  EXPECT_FALSE(fs::exists(tmp.Join("shared/leases/") + key.Digest() + ".lease"));
}

TEST(CrossProcessTest, LeaseOfAKilledCompilerLapsesAndIsTakenOver) {
  TempDir tmp;
  const ArtifactKey key = MakeKey();
  pid_t holder = SpawnHelper({{"KILN_CACHE_HELPER", "hold_lease"},
                              {"KILN_SHARED", tmp.Join("shared")},
                              {"KILN_TTL_MS", "700"},
                              {"KILN_READY", tmp.Join("ready")}});
  ASSERT_TRUE(WaitForFile(tmp.Join("ready"), std::chrono::seconds(20)));
  ::kill(holder, SIGKILL);
  EXPECT_EQ(WaitExit(holder), 128 + SIGKILL);
  auto store = SharedFsStore::Open({tmp.Join("shared"), "", nullptr});
  ASSERT_TRUE(store.ok());
  EXPECT_EQ((*store)->ReadLease(key.Digest())->holder, "doomed-node");

  auto node = MakeNode(Spec(tmp.Join("local"), tmp.Join("shared")));
  auto got = node->provider->Get({key, kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
  EXPECT_EQ(node->compiler->calls(), 1);
  EXPECT_EQ(node->Counter("kiln_artifact_lease_waits_total"), 1);
  EXPECT_EQ(node->Counter("kiln_artifact_lease_takeovers_total"), 1);
  EXPECT_TRUE(fs::exists(tmp.Join("shared/") + key.Digest() + "/manifest.json"));
}

}  // namespace
}  // namespace kiln::cache
