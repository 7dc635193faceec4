// RedisArtifactStore against a real redis-server (ephemeral port, AOF on): publish / has / fetch
// in chunks, a corrupt blob refused, counted, removed and rebuilt by the provider, garbage in the
// index, compile leases (exclusive, renewed, released, a crashed holder's taken over after its
// TTL), single-flight compiles of two nodes through Redis, and a Redis that is down.
#include "cache/redis_artifact_store.h"

#include <filesystem>
#include <thread>
#include <vector>

#include "cache/local_disk_store.h"
#include "cache/package_provider.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "tests/cache/cache_test_support.h"
#include "tests/redis/redis_test_support.h"

namespace kiln::cache {
namespace {

namespace fs = std::filesystem;
using ::kiln::testing::ReadFileOrDie;
using ::kiln::testing::TempDir;
using ::testing::HasSubstr;
using namespace ::kiln::cache::testing;  // NOLINT: test helpers
using redis::testing::RedisServer;

class RedisArtifactStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    KILN_REQUIRE_REDIS();
    ASSERT_TRUE(server_.Start());
  }
  std::unique_ptr<RedisArtifactStore> Open(prometheus::Registry* registry = nullptr) {
    RedisArtifactStoreOptions o;
    o.url = server_.url();
    o.chunk_bytes = 1024;  // several chunks per test package
    o.command_timeout_ms = 1000;
    auto s = RedisArtifactStore::Open(o, registry);
    EXPECT_TRUE(s.ok()) << s.status();
    return std::move(*s);
  }
  std::unique_ptr<LocalDiskStore> Local(const std::string& root) {
    LocalDiskStoreOptions o;
    o.root = root;
    auto s = LocalDiskStore::Open(o, nullptr);
    EXPECT_TRUE(s.ok()) << s.status();
    return std::move(*s);
  }
  struct Node {
    std::unique_ptr<prometheus::Registry> registry = std::make_unique<prometheus::Registry>();
    FakeCompiler* compiler = nullptr;
    std::unique_ptr<TieredPackageProvider> provider;
  };
  std::unique_ptr<Node> MakeNode(const std::string& root, const std::string& id,
                                 FakeCompiler::Options compiler_options = {}) {
    auto node = std::make_unique<Node>();
    auto compiler = std::make_unique<FakeCompiler>(compiler_options);
    node->compiler = compiler.get();
    TieredOptions options;
    options.node_id = id;
    options.poll_initial_ms = 10;
    options.poll_max_ms = 50;
    auto p = TieredPackageProvider::Create(Local(root), Open(node->registry.get()),
                                           std::move(compiler), options, node->registry.get());
    EXPECT_TRUE(p.ok()) << p.status();
    node->provider = std::move(*p);
    return node;
  }

  RedisServer server_;
  TempDir tmp_;
};

TEST_F(RedisArtifactStoreTest, PublishHasFetchInChunks) {
  auto store = Open();
  auto node_a = Local(tmp_.Join("a"));
  auto node_b = Local(tmp_.Join("b"));
  const ArtifactKey key = MakeKey();
  const std::string digest = key.Digest();
  EXPECT_EQ(*store->Has(digest), false);
  EXPECT_EQ(store->Fetch(key, *node_b).status().code(), absl::StatusCode::kNotFound);

  PublishFakePackage(node_a->root(), key, 5000);  // 5 chunks of 1 KiB
  auto located = node_a->Find(key);
  ASSERT_TRUE(located.ok()) << located.status();
  ASSERT_TRUE(store->Publish(*located).ok());
  EXPECT_EQ(*store->Has(digest), true);
  ASSERT_TRUE(store->Publish(*located).ok());  // again: a no-op success

  auto fetched = store->Fetch(key, *node_b);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  EXPECT_GE(fetched->bytes, 5000);
  EXPECT_EQ(fetched->package.dir, node_b->DirFor(digest));
  EXPECT_EQ(ReadFileOrDie(fetched->package.package_path), ReadFileOrDie(located->package_path));
  EXPECT_TRUE(node_b->Find(key).ok());
  // No staging directory is left behind.
  for (const auto& e : fs::directory_iterator(node_b->root())) {
    EXPECT_NE(e.path().filename().string().rfind(kStagingPrefix, 0), 0u) << e.path();
  }
  EXPECT_THAT(store->Describe(), HasSubstr(server_.url()));
}

TEST_F(RedisArtifactStoreTest, ACorruptBlobIsRefusedCountedAndRebuilt) {
  prometheus::Registry registry;
  auto store = Open(&registry);
  auto node_a = Local(tmp_.Join("a"));
  const ArtifactKey key = MakeKey();
  PublishFakePackage(node_a->root(), key, 3000);
  ASSERT_TRUE(store->Publish(*node_a->Find(key)).ok());
  // Flip a byte in the second chunk of model.pt2.
  auto keys = store->client().Command({"KEYS", "kiln:cache:blob:*:model.pt2:1"});
  ASSERT_TRUE(keys.ok());
  ASSERT_EQ(keys->elements.size(), 1u);
  auto chunk = store->client().Command({"GET", keys->elements[0].str});
  std::string bytes = chunk->str;
  bytes[5] ^= 0x5a;
  ASSERT_TRUE(store->client().Command({"SET", keys->elements[0].str, bytes}).ok());

  auto local = Local(tmp_.Join("b"));
  auto fetched = store->Fetch(key, *local);
  EXPECT_EQ(fetched.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(fetched.status().message(), HasSubstr("SHA-256"));
  EXPECT_EQ(CounterValue(registry, "kiln_artifact_redis_corrupt_total"), 1);
  EXPECT_EQ(*store->Has(key.Digest()), false);  // removed: it will be rebuilt
  EXPECT_FALSE(fs::exists(local->DirFor(key.Digest())));
  auto left = store->client().Command({"KEYS", "kiln:cache:blob:*"});
  EXPECT_TRUE(left->elements.empty());
  auto record = store->client().Command({"LRANGE", "kiln:cache:corrupt", "0", "-1"});
  ASSERT_EQ(record->elements.size(), 1u);
  EXPECT_THAT(record->elements[0].str, HasSubstr(key.Digest()));

  // Through the provider: corrupt again, then a node refuses it, rebuilds and republishes.
  ASSERT_TRUE(store->Publish(*node_a->Find(key)).ok());
  keys = store->client().Command({"KEYS", "kiln:cache:blob:*:model.pt2:0"});
  ASSERT_TRUE(store->client().Command({"SETRANGE", keys->elements[0].str, "3", "XX"}).ok());
  auto node = MakeNode(tmp_.Join("c"), "c");
  auto got = node->provider->Get({key, "/nonexistent/model"});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
  EXPECT_EQ(node->compiler->calls(), 1);
  auto fresh = Local(tmp_.Join("d"));
  EXPECT_TRUE(store->Fetch(key, *fresh).ok());  // the republished copy is good
}

TEST_F(RedisArtifactStoreTest, GarbageInTheIndexIsDataLossNotACrash) {
  prometheus::Registry registry;
  auto store = Open(&registry);
  auto local = Local(tmp_.Join("a"));
  const ArtifactKey key = MakeKey();
  const std::string pkg = store->PackageKey(key.Digest());
  for (const std::string& garbage :
       {std::string("not json"), std::string("[]"), std::string("[{\"name\": 1}]"),
        std::string("[{\"name\":\"../x\",\"bytes\":1,\"sha256\":\"a\",\"chunks\":1}]")}) {
    ASSERT_TRUE(store->client().Command({"HSET", pkg, "files", garbage}).ok());
    auto fetched = store->Fetch(key, *local);
    EXPECT_EQ(fetched.status().code(), absl::StatusCode::kDataLoss) << garbage;
  }
  // An index entry whose chunks are missing.
  ASSERT_TRUE(store->client()
                  .Command({"HSET", pkg, "files",
                            "[{\"name\":\"model.pt2\",\"bytes\":10,\"sha256\":\"x\",\"chunks\":1}]"})
                  .ok());
  EXPECT_EQ(store->Fetch(key, *local).status().code(), absl::StatusCode::kDataLoss);
  // A key of the wrong type.
  ASSERT_TRUE(store->client().Command({"SET", pkg, "x"}).ok());
  EXPECT_EQ(store->Has(key.Digest()).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(CounterValue(registry, "kiln_artifact_redis_corrupt_total"), 5);
}

TEST_F(RedisArtifactStoreTest, CompileLeases) {
  auto store = Open();
  const std::string digest = MakeKey().Digest();
  auto a = store->TryAcquireLease(digest, {"node-a", 500});
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_FALSE((*a)->took_over());
  auto b = store->TryAcquireLease(digest, {"node-b", 500});
  EXPECT_EQ(b.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(b.status().message(), HasSubstr("node-a"));
  for (int i = 0; i < 4; ++i) {  // renewed past its ttl, it stays held
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    ASSERT_TRUE((*a)->Renew().ok());
  }
  EXPECT_EQ(store->TryAcquireLease(digest, {"node-b", 500}).status().code(),
            absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE((*a)->Release().ok());
  auto c = store->TryAcquireLease(digest, {"node-c", 300});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE((*c)->took_over());  // released, not lapsed
  // node-c "crashes": its lease lapses after its TTL and is taken over.
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  auto d = store->TryAcquireLease(digest, {"node-d", 300});
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE((*d)->took_over());
  EXPECT_EQ((*c)->Renew().code(), absl::StatusCode::kAborted);  // the old holder learns
  EXPECT_EQ(store->TryAcquireLease("nope", {"x", 100}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(RedisArtifactStoreTest, TwoNodesRacingCompileOnce) {
  std::vector<std::unique_ptr<Node>> nodes;
  FakeCompiler::Options slow;
  slow.delay = std::chrono::milliseconds(300);
  nodes.push_back(MakeNode(tmp_.Join("a"), "a", slow));
  nodes.push_back(MakeNode(tmp_.Join("b"), "b", slow));
  const ArtifactKey key = MakeKey();
  std::vector<std::string> provenance(2);
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i) {
    threads.emplace_back([&, i] {
      auto got = nodes[i]->provider->Get({key, "/nonexistent/model"});
      ASSERT_TRUE(got.ok()) << got.status();
      provenance[i] = got->provenance;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(nodes[0]->compiler->calls() + nodes[1]->compiler->calls(), 1);
  std::sort(provenance.begin(), provenance.end());
  EXPECT_EQ(provenance, (std::vector<std::string>{"compiled", "shared"}));
}

TEST_F(RedisArtifactStoreTest, ARedisThatIsDownIsUnavailableAndNodesStillCompile) {
  auto store = Open();
  server_.Kill();
  const ArtifactKey key = MakeKey();
  auto local = Local(tmp_.Join("a"));
  EXPECT_EQ(store->Has(key.Digest()).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(store->Fetch(key, *local).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(store->TryAcquireLease(key.Digest(), {"a", 500}).status().code(),
            absl::StatusCode::kUnavailable);
  auto node = MakeNode(tmp_.Join("b"), "b");
  auto got = node->provider->Get({key, "/nonexistent/model"});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
}

TEST(RedisArtifactStoreOptionsTest, ValidateNamesTheField) {
  RedisArtifactStoreOptions o;
  o.url = "/mnt/shared";
  EXPECT_THAT(std::string(o.Validate().message()), HasSubstr("url"));
  o.url = "redis://h:1/0";
  o.chunk_bytes = 1;
  EXPECT_THAT(std::string(o.Validate().message()), HasSubstr("chunk_bytes"));
}

}  // namespace
}  // namespace kiln::cache
