// Tests of the package stores and compile leases: LocalDiskStore (verify + quarantine on Find,
// atomic verified Insert, LRU size bound with pins), SharedFsStore (Has / Fetch / Publish, corrupt
// copies refused and quarantined in the store) and its compile leases (exclusive, expiring,
// renewed, taken over by exactly one waiter), and LeaseHeartbeat. Hermetic: temp dirs, fake clocks.
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <thread>
#include <vector>

#include "cache/lease_heartbeat.h"
#include "cache/local_disk_store.h"
#include "cache/shared_fs_store.h"
#include "common/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "tests/cache/cache_test_support.h"

namespace kiln::cache {
namespace {

namespace fs = std::filesystem;
using ::kiln::testing::ReadFileOrDie;
using ::kiln::testing::TempDir;
using ::kiln::testing::WriteFileOrDie;
using ::testing::HasSubstr;
using namespace ::kiln::cache::testing;  // NOLINT: test helpers

std::unique_ptr<LocalDiskStore> OpenLocal(const std::string& root, int64_t max_bytes = 0,
                                          const Clock* clock = nullptr,
                                          prometheus::Registry* registry = nullptr) {
  LocalDiskStoreOptions o;
  o.root = root;
  o.max_bytes = max_bytes;
  o.clock = clock;
  auto s = LocalDiskStore::Open(o, registry);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *std::move(s) : nullptr;
}

std::unique_ptr<SharedFsStore> OpenShared(const std::string& root, const Clock* clock = nullptr) {
  SharedFsStoreOptions o;
  o.root = root;
  o.clock = clock;
  auto s = SharedFsStore::Open(o);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *std::move(s) : nullptr;
}

// Names in `dir` that start with the staging prefix (left-overs of a copy).
int StagingDirs(const std::string& dir) {
  int n = 0;
  std::error_code ec;
  for (auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().filename().string().rfind(kStagingPrefix, 0) == 0) ++n;
  }
  return n;
}

// ---------------------------------------------------------------------------------------------
// LocalDiskStore

TEST(LocalDiskStoreTest, OptionsValidateNamesTheField) {
  LocalDiskStoreOptions o;
  EXPECT_EQ(o.Validate().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(o.Validate().message(), HasSubstr("root"));
  o.root = "/tmp/x";
  o.max_bytes = -1;
  EXPECT_EQ(o.Validate().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(o.Validate().message(), HasSubstr("max_bytes"));
  EXPECT_EQ(LocalDiskStore::Open(o, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LocalDiskStoreTest, FindVerifiesAndQuarantinesCorruptEntries) {
  TempDir tmp;
  auto local = OpenLocal(tmp.Join("local"));
  const ArtifactKey key = MakeKey();
  EXPECT_EQ(local->Find(key).status().code(), absl::StatusCode::kNotFound);

  PublishFakePackage(local->root(), key);
  auto found = local->Find(key);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->dir, local->DirFor(key.Digest()));
  EXPECT_EQ(found->manifest.digest, key.Digest());

  CorruptFile(found->package_path);
  auto corrupt = local->Find(key);
  EXPECT_EQ(corrupt.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(corrupt.status().message(), HasSubstr("quarantined"));
  EXPECT_FALSE(fs::exists(local->DirFor(key.Digest())));
  EXPECT_EQ(CountEntries(local->root() + "/quarantine"), 1);
  // Gone from the store: the next lookup is a plain miss, so the caller rebuilds.
  EXPECT_EQ(local->Find(key).status().code(), absl::StatusCode::kNotFound);
}

TEST(LocalDiskStoreTest, EntriesFailingEachCheckAreDataLoss) {
  TempDir tmp;
  auto local = OpenLocal(tmp.path());
  const ArtifactKey key = MakeKey();
  const std::string dir = local->DirFor(key.Digest());

  // A directory without a manifest (debris) blocks the digest: corrupt.
  fs::create_directories(dir);
  EXPECT_EQ(local->Find(key).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(fs::exists(dir));

  // A manifest for another key under this digest.
  WriteFakePackageDir(dir, MakeKey(128));
  auto wrong = local->Find(key);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(wrong.status().message(), HasSubstr("manifest is for key"));

  // A truncated package.
  WriteFakePackageDir(dir, key);
  WriteFileOrDie(dir + "/model.pt2", "short");
  auto truncated = local->Find(key);
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(truncated.status().message(), HasSubstr("bytes"));

  // Not JSON.
  WriteFakePackageDir(dir, key);
  WriteFileOrDie(dir + "/manifest.json", "{not json");
  EXPECT_EQ(local->Find(key).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(CountEntries(local->root() + "/quarantine"), 4);
}

// A regional transformer set (manifest layout "regional", pipeline/regional.h): no package file,
// one package per region, each verified like a whole package's.
TEST(LocalDiskStoreTest, RegionalSetsAreVerifiedRegionByRegion) {
  TempDir tmp;
  auto local = OpenLocal(tmp.Join("local"));
  const ArtifactKey key = MakeKey();
  const std::string dir = local->DirFor(key.Digest());
  fs::create_directories(dir);
  nlohmann::json manifest = FakeManifest(key, "");
  manifest.erase("package");
  manifest["layout"] = "regional";
  for (const std::string region : {"head", "double", "single", "tail"}) {
    const std::string bytes = region + " package bytes";
    WriteFileOrDie(dir + "/" + region + ".pt2", bytes);
    manifest["regions"][region] = {{"package",
                                    {{"file", region + ".pt2"},
                                     {"sha256", Sha256Hex(bytes)},
                                     {"bytes", static_cast<int64_t>(bytes.size())}}},
                                   {"layers", {""}}};
  }
  WriteFileOrDie(dir + "/manifest.json", manifest.dump(1));
  auto found = local->Find(key);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->manifest.layout, "regional");
  EXPECT_EQ(found->package_path, "");
  ASSERT_EQ(found->manifest.region_packages.size(), 4u);

  // One region damaged: the whole set is refused and quarantined.
  WriteFileOrDie(dir + "/double.pt2", "double package byteZ");
  auto corrupt = local->Find(key);
  EXPECT_EQ(corrupt.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(corrupt.status().message(), HasSubstr("region double package sha256"));
  EXPECT_FALSE(fs::exists(dir));

  // Malformed tables are refused by the manifest parser, naming the problem.
  nlohmann::json unknown = manifest;
  unknown["layout"] = "tiled";
  EXPECT_THAT(PackageManifest::FromJson(unknown).status().message(), HasSubstr("layout 'tiled'"));
  nlohmann::json empty = manifest;
  empty["regions"] = nlohmann::json::object();
  EXPECT_EQ(PackageManifest::FromJson(empty).status().code(), absl::StatusCode::kInvalidArgument);
  nlohmann::json escape = manifest;
  escape["regions"]["tail"]["package"]["file"] = "../tail.pt2";
  EXPECT_THAT(PackageManifest::FromJson(escape).status().message(), HasSubstr("plain names"));
}

TEST(LocalDiskStoreTest, InsertCopiesVerifiesAndPublishesAtomically) {
  TempDir tmp;
  auto local = OpenLocal(tmp.Join("local"));
  const ArtifactKey key = MakeKey();
  WriteFakePackageDir(tmp.Join("src"), key, 5000);

  auto inserted = local->Insert(key, tmp.Join("src"));
  ASSERT_TRUE(inserted.ok()) << inserted.status();
  EXPECT_EQ(inserted->bytes, 5000 + FileSize(tmp.Join("src/manifest.json")));
  EXPECT_EQ(inserted->package.package_path, local->DirFor(key.Digest()) + "/model.pt2");
  EXPECT_EQ(ReadFileOrDie(inserted->package.package_path), ReadFileOrDie(tmp.Join("src/model.pt2")));
  EXPECT_TRUE(local->Find(key).ok());
  EXPECT_EQ(StagingDirs(local->root()), 0);

  // Inserting again keeps the entry and copies nothing new into place.
  auto again = local->Insert(key, tmp.Join("src"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->bytes, 0);
  EXPECT_EQ(StagingDirs(local->root()), 0);
}

TEST(LocalDiskStoreTest, InsertRefusesACorruptSourceAndLeavesNothing) {
  TempDir tmp;
  auto local = OpenLocal(tmp.Join("local"));
  const ArtifactKey key = MakeKey();
  WriteFakePackageDir(tmp.Join("src"), key);
  CorruptFile(tmp.Join("src/model.pt2"));

  auto inserted = local->Insert(key, tmp.Join("src"));
  EXPECT_EQ(inserted.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(inserted.status().message(), HasSubstr("sha256"));
  EXPECT_FALSE(fs::exists(local->DirFor(key.Digest())));
  EXPECT_EQ(StagingDirs(local->root()), 0);
  EXPECT_EQ(local->Insert(key, tmp.Join("missing")).status().code(), absl::StatusCode::kNotFound);
}

TEST(LocalDiskStoreTest, InsertReplacesACorruptExistingEntry) {
  TempDir tmp;
  auto local = OpenLocal(tmp.Join("local"));
  const ArtifactKey key = MakeKey();
  PublishFakePackage(local->root(), key);
  CorruptFile(local->DirFor(key.Digest()) + "/model.pt2");
  WriteFakePackageDir(tmp.Join("src"), key);
  auto inserted = local->Insert(key, tmp.Join("src"));
  ASSERT_TRUE(inserted.ok()) << inserted.status();
  EXPECT_TRUE(local->Find(key).ok());
  EXPECT_EQ(CountEntries(local->root() + "/quarantine"), 1);
}

TEST(LocalDiskStoreTest, AnUnboundedRootHoldsOnlyPackages) {
  // Tools and tests list package roots (e.g. the kiln-run fixtures): no bookkeeping appears there.
  TempDir tmp;
  LocalDiskStore local(tmp.Join("local"));
  const ArtifactKey a = MakeKey(16), b = MakeKey(32);
  PublishFakePackage(tmp.Join("local"), a);
  ASSERT_TRUE(local.Find(a).ok());
  WriteFakePackageDir(tmp.Join("src"), b);
  ASSERT_TRUE(local.Insert(b, tmp.Join("src")).ok());
  std::vector<std::string> names;
  for (auto& e : fs::directory_iterator(tmp.Join("local"))) {
    names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  std::vector<std::string> want = {a.Digest(), b.Digest()};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(names, want);
}

TEST(LocalDiskStoreTest, LruEvictionRespectsTheBoundAndKeepsPinnedDigests) {
  TempDir tmp;
  FakeClock clock;
  prometheus::Registry registry;
  const int64_t pkg = 10'000;
  const ArtifactKey a = MakeKey(16), b = MakeKey(32), c = MakeKey(48), d = MakeKey(64),
                    e = MakeKey(80);
  for (const auto& k : {a, b, c, d, e}) {
    WriteFakePackageDir(tmp.Join("src/" + k.Digest()), k, pkg);
  }
  const int64_t entry = pkg + FileSize(tmp.Join("src/" + a.Digest() + "/manifest.json"));
  // Room for three entries.
  auto local = OpenLocal(tmp.Join("local"), 3 * entry + entry / 2, &clock, &registry);
  auto insert = [&](const ArtifactKey& k) {
    clock.AdvanceMs(1000);
    auto r = local->Insert(k, tmp.Join("src/" + k.Digest()));
    ASSERT_TRUE(r.ok()) << r.status();
  };
  insert(a);
  insert(b);
  insert(c);
  EXPECT_EQ(local->List().size(), 3u);
  EXPECT_EQ(CounterValue(registry, "kiln_artifact_evictions_total"), 0);

  // Use a: b is now the least recently used.
  clock.AdvanceMs(1000);
  ASSERT_TRUE(local->Find(a).ok());
  insert(d);
  EXPECT_FALSE(fs::exists(local->DirFor(b.Digest())));
  EXPECT_TRUE(local->Find(a).ok());
  EXPECT_TRUE(local->Find(c).ok() && local->Find(d).ok());
  EXPECT_LE(local->BytesUsed(), local->max_bytes());
  EXPECT_EQ(CounterValue(registry, "kiln_artifact_evictions_total"), 1);
  EXPECT_EQ(GaugeValue(registry, "kiln_artifact_local_bytes"), local->BytesUsed());

  // c is oldest now (a and d were found after it), but pinned: the next oldest goes instead.
  clock.AdvanceMs(1000);
  ASSERT_TRUE(local->Find(a).ok());
  clock.AdvanceMs(1000);
  ASSERT_TRUE(local->Find(d).ok());
  {
    auto pin = local->Pin(c.Digest());
    EXPECT_TRUE(local->IsPinned(c.Digest()));
    insert(e);
    EXPECT_TRUE(fs::exists(local->DirFor(c.Digest())));
    EXPECT_FALSE(fs::exists(local->DirFor(a.Digest())));
    EXPECT_TRUE(fs::exists(local->DirFor(e.Digest())));
  }
  EXPECT_FALSE(local->IsPinned(c.Digest()));
  EXPECT_LE(local->BytesUsed(), local->max_bytes());
  EXPECT_EQ(CounterValue(registry, "kiln_artifact_evictions_total"), 2);

  // Everything pinned: the bound is exceeded rather than a pinned package evicted.
  auto p1 = local->Pin(c.Digest());
  auto p2 = local->Pin(d.Digest());
  auto p3 = local->Pin(e.Digest());
  insert(b);
  EXPECT_EQ(local->List().size(), 4u);
  EXPECT_GT(local->BytesUsed(), local->max_bytes());
  // Oldest first.
  EXPECT_EQ(local->List().front(), c.Digest());
}

TEST(LocalDiskStoreTest, QuarantinedCopiesAreEvictedFirst) {
  TempDir tmp;
  FakeClock clock;
  const ArtifactKey a = MakeKey(16), b = MakeKey(32), c = MakeKey(48);
  WriteFakePackageDir(tmp.Join("a"), a, 1000);
  WriteFakePackageDir(tmp.Join("b"), b, 1000);
  WriteFakePackageDir(tmp.Join("c"), c, 1000);
  const int64_t entry = DirBytes(tmp.Join("a"));
  auto local = OpenLocal(tmp.Join("local"), 2 * entry + entry / 2, &clock);
  ASSERT_TRUE(local->Insert(a, tmp.Join("a")).ok());
  CorruptFile(local->DirFor(a.Digest()) + "/model.pt2");
  EXPECT_EQ(local->Find(a).status().code(), absl::StatusCode::kDataLoss);
  ASSERT_TRUE(local->Insert(b, tmp.Join("b")).ok());
  EXPECT_EQ(CountEntries(local->root() + "/quarantine"), 1);  // still fits
  ASSERT_TRUE(local->Insert(c, tmp.Join("c")).ok());
  EXPECT_EQ(CountEntries(local->root() + "/quarantine"), 0);
  EXPECT_TRUE(local->Find(b).ok());
  EXPECT_TRUE(local->Find(c).ok());
}

// ---------------------------------------------------------------------------------------------
// SharedFsStore

TEST(SharedFsStoreTest, PublishHasFetch) {
  TempDir tmp;
  auto shared = OpenShared(tmp.Join("shared"));
  auto node_a = OpenLocal(tmp.Join("a"));
  auto node_b = OpenLocal(tmp.Join("b"));
  const ArtifactKey key = MakeKey();
  const std::string digest = key.Digest();

  EXPECT_EQ(*shared->Has(digest), false);
  EXPECT_EQ(shared->Fetch(key, *node_b).status().code(), absl::StatusCode::kNotFound);

  PublishFakePackage(node_a->root(), key, 4096);
  auto located = node_a->Find(key);
  ASSERT_TRUE(located.ok()) << located.status();
  ASSERT_TRUE(shared->Publish(*located).ok());
  EXPECT_EQ(*shared->Has(digest), true);
  EXPECT_EQ(StagingDirs(shared->root()), 0);

  // Publishing again is a no-op success: the entry is not replaced.
  struct stat before, after;
  ASSERT_EQ(::stat(shared->DirFor(digest).c_str(), &before), 0);
  ASSERT_TRUE(shared->Publish(*located).ok());
  ASSERT_EQ(::stat(shared->DirFor(digest).c_str(), &after), 0);
  EXPECT_EQ(before.st_ino, after.st_ino);

  auto fetched = shared->Fetch(key, *node_b);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  EXPECT_GE(fetched->bytes, 4096);
  EXPECT_EQ(fetched->package.dir, node_b->DirFor(digest));
  EXPECT_EQ(ReadFileOrDie(fetched->package.package_path), ReadFileOrDie(located->package_path));
  EXPECT_TRUE(node_b->Find(key).ok());
  EXPECT_EQ(StagingDirs(node_b->root()), 0);
}

TEST(SharedFsStoreTest, CorruptCopyIsRefusedAndQuarantinedInTheStore) {
  TempDir tmp;
  auto shared = OpenShared(tmp.Join("shared"));
  auto local = OpenLocal(tmp.Join("local"));
  const ArtifactKey key = MakeKey();
  PublishFakePackage(shared->root(), key);
  CorruptFile(shared->DirFor(key.Digest()) + "/model.pt2");

  auto fetched = shared->Fetch(key, *local);
  EXPECT_EQ(fetched.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(fetched.status().message(), HasSubstr("quarantined"));
  EXPECT_EQ(*shared->Has(key.Digest()), false);
  EXPECT_EQ(CountEntries(shared->root() + "/quarantine"), 1);
  EXPECT_FALSE(fs::exists(local->DirFor(key.Digest())));
  EXPECT_EQ(StagingDirs(local->root()), 0);
  EXPECT_EQ(shared->Fetch(key, *local).status().code(), absl::StatusCode::kNotFound);
}

TEST(SharedFsStoreTest, ManifestForAnotherKeyIsRefused) {
  TempDir tmp;
  auto shared = OpenShared(tmp.Join("shared"));
  auto local = OpenLocal(tmp.Join("local"));
  const ArtifactKey key = MakeKey();
  WriteFakePackageDir(shared->DirFor(key.Digest()), MakeKey(128));
  auto fetched = shared->Fetch(key, *local);
  EXPECT_EQ(fetched.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(fetched.status().message(), HasSubstr("manifest is for key"));
  EXPECT_EQ(CountEntries(shared->root() + "/quarantine"), 1);
}

TEST(SharedFsStoreTest, DebrisWithoutManifestDoesNotBlockPublishing) {
  TempDir tmp;
  auto shared = OpenShared(tmp.Join("shared"));
  auto local = OpenLocal(tmp.Join("local"));
  const ArtifactKey key = MakeKey();
  fs::create_directories(shared->DirFor(key.Digest()));
  WriteFileOrDie(shared->DirFor(key.Digest()) + "/model.pt2", "partial");
  EXPECT_EQ(*shared->Has(key.Digest()), false);
  PublishFakePackage(local->root(), key);
  ASSERT_TRUE(shared->Publish(*local->Find(key)).ok());
  EXPECT_EQ(*shared->Has(key.Digest()), true);
  auto other = OpenLocal(tmp.Join("other"));
  EXPECT_TRUE(shared->Fetch(key, *other).ok());
}

// ---------------------------------------------------------------------------------------------
// Compile leases

TEST(CompileLeaseTest, ExclusiveUntilReleased) {
  TempDir tmp;
  FakeClock clock;
  auto shared = OpenShared(tmp.path(), &clock);
  const std::string digest = MakeKey().Digest();

  auto first = shared->TryAcquireLease(digest, {"node-a", 60'000});
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_FALSE((*first)->took_over());
  auto info = shared->ReadLease(digest);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->holder, "node-a");
  EXPECT_EQ(info->pid, ::getpid());
  EXPECT_FALSE(info->host.empty());
  EXPECT_EQ(info->expires_unix_ms, clock.UnixMs() + 60'000);
  EXPECT_EQ(info->token, (*first)->info().token);
  // The file is the documented JSON.
  auto j = nlohmann::json::parse(ReadFileOrDie(shared->LeasePath(digest)));
  for (const char* field : {"holder", "pid", "host", "expires_unix_ms"}) {
    EXPECT_TRUE(j.contains(field)) << field;
  }

  auto second = shared->TryAcquireLease(digest, {"node-b", 60'000});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(second.status().message(), HasSubstr("node-a"));

  ASSERT_TRUE((*first)->Release().ok());
  EXPECT_FALSE(fs::exists(shared->LeasePath(digest)));
  EXPECT_TRUE((*first)->Release().ok());  // idempotent
  auto third = shared->TryAcquireLease(digest, {"node-b", 60'000});
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_FALSE((*third)->took_over());
  third->reset();  // the destructor releases
  EXPECT_FALSE(fs::exists(shared->LeasePath(digest)));
  // Only the lease directory is left.
  EXPECT_EQ(CountEntries(tmp.Join("leases")), 0);
}

TEST(CompileLeaseTest, BadRequestsAreInvalidArgument) {
  TempDir tmp;
  auto shared = OpenShared(tmp.path());
  EXPECT_EQ(shared->TryAcquireLease("not-a-digest", {"n", 1000}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(shared->TryAcquireLease(MakeKey().Digest(), {"", 1000}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(shared->TryAcquireLease(MakeKey().Digest(), {"n", 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CompileLeaseTest, ExpiredLeaseOfACrashedHolderIsTakenOver) {
  TempDir tmp;
  FakeClock clock;
  auto shared = OpenShared(tmp.path(), &clock);
  const std::string digest = MakeKey().Digest();
  // A lease file left by a holder that died: its expiry is in the past.
  LeaseInfo stale{digest, "crashed-node", 4242, "elsewhere", clock.UnixMs() - 1, "deadbeef"};
  WriteFileOrDie(shared->LeasePath(digest), stale.ToJson().dump());

  auto lease = shared->TryAcquireLease(digest, {"node-b", 60'000});
  ASSERT_TRUE(lease.ok()) << lease.status();
  EXPECT_TRUE((*lease)->took_over());
  EXPECT_EQ(shared->ReadLease(digest)->holder, "node-b");
  EXPECT_EQ(CountEntries(tmp.Join("leases")), 1);  // no debris from the takeover

  // A lease file that is not a lease document is broken too.
  ASSERT_TRUE((*lease)->Release().ok());
  WriteFileOrDie(shared->LeasePath(digest), "garbage");
  auto again = shared->TryAcquireLease(digest, {"node-c", 60'000});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE((*again)->took_over());
}

TEST(CompileLeaseTest, RenewalKeepsTheLeaseAndALostLeaseIsReported) {
  TempDir tmp;
  FakeClock clock;
  auto shared = OpenShared(tmp.path(), &clock);
  const std::string digest = MakeKey().Digest();
  auto lease = shared->TryAcquireLease(digest, {"node-a", 1000});
  ASSERT_TRUE(lease.ok());

  clock.AdvanceMs(800);
  ASSERT_TRUE((*lease)->Renew().ok());
  EXPECT_EQ(shared->ReadLease(digest)->expires_unix_ms, clock.UnixMs() + 1000);
  clock.AdvanceMs(800);  // past the first expiry, within the renewed one
  EXPECT_EQ(shared->TryAcquireLease(digest, {"node-b", 1000}).status().code(),
            absl::StatusCode::kAlreadyExists);

  clock.AdvanceMs(500);  // the holder stopped renewing: it lapses
  auto taker = shared->TryAcquireLease(digest, {"node-b", 1000});
  ASSERT_TRUE(taker.ok()) << taker.status();
  EXPECT_TRUE((*taker)->took_over());
  // An expired lease is never renewed (that could undo the takeover): the holder learns it lost.
  auto renewed = (*lease)->Renew();
  EXPECT_EQ(renewed.code(), absl::StatusCode::kAborted);
  EXPECT_THAT(renewed.message(), HasSubstr("expired"));
  EXPECT_EQ((*lease)->Renew().code(), absl::StatusCode::kAborted);
  // Releasing a lost lease does not touch the successor's.
  EXPECT_TRUE((*lease)->Release().ok());
  EXPECT_EQ(shared->ReadLease(digest)->holder, "node-b");
}

TEST(CompileLeaseTest, HolderLearnsOfATakeoverAtItsNextRenewal) {
  // Two hosts whose clocks disagree: B thinks A's lease has lapsed while A thinks it has not.
  TempDir tmp;
  FakeClock clock_a, clock_b;
  clock_b.AdvanceMs(5000);
  auto host_a = OpenShared(tmp.path(), &clock_a);
  auto host_b = OpenShared(tmp.path(), &clock_b);
  const std::string digest = MakeKey().Digest();
  auto lease = host_a->TryAcquireLease(digest, {"node-a", 1000});
  ASSERT_TRUE(lease.ok());
  auto taker = host_b->TryAcquireLease(digest, {"node-b", 1000});
  ASSERT_TRUE(taker.ok()) << taker.status();
  EXPECT_TRUE((*taker)->took_over());

  auto renewed = (*lease)->Renew();
  EXPECT_EQ(renewed.code(), absl::StatusCode::kAborted);
  EXPECT_THAT(renewed.message(), HasSubstr("node-b"));
  EXPECT_TRUE((*lease)->Release().ok());
  EXPECT_EQ(host_a->ReadLease(digest)->holder, "node-b");
  EXPECT_TRUE((*taker)->Renew().ok());
}

TEST(CompileLeaseTest, ExactlyOneOfManyWaitersTakesOverAnExpiredLease) {
  TempDir tmp;
  FakeClock clock;
  auto shared = OpenShared(tmp.path(), &clock);
  for (int round = 0; round < 20; ++round) {
    const std::string digest = MakeKey(16 * (round + 1)).Digest();
    LeaseInfo stale{digest, "crashed", 1, "h", clock.UnixMs() - 1, absl::StrCat("t", round)};
    WriteFileOrDie(shared->LeasePath(digest), stale.ToJson().dump());
    std::atomic<int> acquired{0}, took_over{0};
    std::vector<std::unique_ptr<CompileLease>> held(6);
    std::vector<std::thread> threads;
    for (int i = 0; i < 6; ++i) {
      threads.emplace_back([&, i] {
        auto l = shared->TryAcquireLease(digest, {absl::StrCat("waiter-", i), 60'000});
        if (l.ok()) {
          ++acquired;
          if ((*l)->took_over()) ++took_over;
          held[i] = *std::move(l);
        } else {
          EXPECT_EQ(l.status().code(), absl::StatusCode::kAlreadyExists) << l.status();
        }
      });
    }
    for (auto& t : threads) t.join();
    EXPECT_EQ(acquired.load(), 1) << "round " << round;
    EXPECT_EQ(took_over.load(), 1) << "round " << round;
  }
}

TEST(LeaseHeartbeatTest, KeepsALongHeldLeaseAlive) {
  TempDir tmp;
  auto holder_store = OpenShared(tmp.path());
  auto other_store = OpenShared(tmp.path());  // another node, same directory
  const std::string digest = MakeKey().Digest();
  auto lease = holder_store->TryAcquireLease(digest, {"node-a", 300});
  ASSERT_TRUE(lease.ok());
  {
    LeaseHeartbeat heartbeat(**lease, std::chrono::milliseconds(60));
    // Three ttls long; without renewals the lease would lapse after the first.
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(900);
    while (std::chrono::steady_clock::now() < end) {
      auto l = other_store->TryAcquireLease(digest, {"node-b", 300});
      EXPECT_EQ(l.status().code(), absl::StatusCode::kAlreadyExists);
      std::this_thread::sleep_for(std::chrono::milliseconds(40));
    }
    EXPECT_TRUE(heartbeat.Stop().ok());
    EXPECT_GE(heartbeat.renewals(), 5);
  }
  // No more renewals: it lapses and the other node takes it over.
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  auto taken = other_store->TryAcquireLease(digest, {"node-b", 300});
  ASSERT_TRUE(taken.ok()) << taken.status();
  EXPECT_TRUE((*taken)->took_over());
}

TEST(LeaseHeartbeatTest, StopsWhenTheLeaseIsLost) {
  TempDir tmp;
  FakeClock clock;
  auto shared = OpenShared(tmp.path(), &clock);
  const std::string digest = MakeKey().Digest();
  auto lease = shared->TryAcquireLease(digest, {"node-a", 1000});
  ASSERT_TRUE(lease.ok());
  clock.AdvanceMs(2000);
  auto taker = shared->TryAcquireLease(digest, {"node-b", 1000});
  ASSERT_TRUE(taker.ok());
  LeaseHeartbeat heartbeat(**lease, std::chrono::milliseconds(10));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(heartbeat.Stop().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(heartbeat.renewals(), 0);
}

}  // namespace
}  // namespace kiln::cache
