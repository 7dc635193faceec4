// Tests of package signatures (cache/package_signing.h) and of how TieredPackageProvider enforces
// them: unsigned, tampered, untrusted and revoked packages are refused, quarantined (locally and
// in the shared tier), counted by reason and rebuilt; what a node compiles is signed with its own
// key; a package the pipeline could not use (Quarantine) is taken out of every tier. Hermetic:
// temp dirs, fake packages and a fake compiler.
#include <sys/stat.h>

#include <filesystem>
#include <map>

#include "cache/package_provider.h"
#include "cache/package_signing.h"
#include "cache/shared_fs_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "tests/cache/cache_test_support.h"

namespace kiln::cache {
namespace {

using ::kiln::testing::ReadFileOrDie;
using ::kiln::testing::TempDir;
using ::kiln::testing::WriteFileOrDie;
using ::testing::HasSubstr;
using namespace ::kiln::cache::testing;  // NOLINT: test helpers

TrustSet Trusting(const SigningKey& k) {
  TrustSet t;
  t.Add(k.public_key_hex);
  return t;
}

std::string PackageDir(const std::string& root, const ArtifactKey& key) {
  return root + "/" + key.Digest();
}

std::string PackageSha(const std::string& dir) {
  return PackageManifest::FromFile(dir + "/manifest.json")->package_sha256;
}

SignatureCheck Check(const std::string& dir, const ArtifactKey& key, const TrustSet& trust,
                     const Revocations& revoked = {}) {
  auto c = VerifyPackageSignature(dir, key.Digest(), PackageSha(dir), trust, revoked);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : SignatureCheck{};
}

TEST(PackageSigningTest, SignedPackageVerifiesAndNamesItsSigner) {
  TempDir tmp;
  const ArtifactKey key = MakeKey();
  PublishFakePackage(tmp.path(), key);
  const SigningKey k = SigningKey::Generate();
  ASSERT_TRUE(SignPackageDir(PackageDir(tmp.path(), key), key.Digest(), k).ok());
  const SignatureCheck c = Check(PackageDir(tmp.path(), key), key, Trusting(k));
  EXPECT_TRUE(c.ok()) << c.reason;
  EXPECT_EQ(c.signer, k.public_key_hex);
}

TEST(PackageSigningTest, UnsignedTamperedAndExtraFilesAreRefused) {
  TempDir tmp;
  const ArtifactKey key = MakeKey();
  PublishFakePackage(tmp.path(), key);
  const std::string dir = PackageDir(tmp.path(), key);
  const SigningKey k = SigningKey::Generate();
  EXPECT_EQ(Check(dir, key, Trusting(k)).refusal, Refusal::kUnsigned);

  ASSERT_TRUE(SignPackageDir(dir, key.Digest(), k).ok());
  // A file the manifest does not cover (today's verification never looks at it) is still signed.
  WriteFileOrDie(dir + "/constants.safetensors", "original");
  ASSERT_TRUE(SignPackageDir(dir, key.Digest(), k).ok());
  WriteFileOrDie(dir + "/constants.safetensors", "replaced");
  SignatureCheck c = Check(dir, key, Trusting(k));
  EXPECT_EQ(c.refusal, Refusal::kBadSignature);
  EXPECT_THAT(c.reason, HasSubstr("constants.safetensors was changed"));

  WriteFileOrDie(dir + "/constants.safetensors", "original");
  WriteFileOrDie(dir + "/extra.so", "code");
  c = Check(dir, key, Trusting(k));
  EXPECT_EQ(c.refusal, Refusal::kBadSignature);
  EXPECT_THAT(c.reason, HasSubstr("extra.so was added"));
  std::filesystem::remove(dir + "/extra.so");
  EXPECT_TRUE(Check(dir, key, Trusting(k)).ok());

  // A signature moved to another package (another digest) does not verify.
  const ArtifactKey other = MakeKey(128);
  PublishFakePackage(tmp.path(), other);
  std::filesystem::copy_file(dir + "/signature.json", PackageDir(tmp.path(), other) +
                                                          "/signature.json");
  EXPECT_EQ(Check(PackageDir(tmp.path(), other), other, Trusting(k)).refusal,
            Refusal::kBadSignature);
}

TEST(PackageSigningTest, UntrustedAndRevokedSignersAndRevokedPackagesAreRefused) {
  TempDir tmp;
  const ArtifactKey key = MakeKey();
  PublishFakePackage(tmp.path(), key);
  const std::string dir = PackageDir(tmp.path(), key);
  const SigningKey k = SigningKey::Generate();
  const SigningKey stranger = SigningKey::Generate();
  ASSERT_TRUE(SignPackageDir(dir, key.Digest(), stranger).ok());
  EXPECT_EQ(Check(dir, key, Trusting(k)).refusal, Refusal::kUntrusted);

  ASSERT_TRUE(SignPackageDir(dir, key.Digest(), k).ok());
  auto revoked = Revocations::Parse("# comment\nkey " + k.public_key_hex + "\n");
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_EQ(Check(dir, key, Trusting(k), *revoked).refusal, Refusal::kRevokedKey);
  revoked = Revocations::Parse("package " + PackageSha(dir));
  ASSERT_TRUE(revoked.ok());
  EXPECT_EQ(Check(dir, key, Trusting(k), *revoked).refusal, Refusal::kRevokedPackage);
}

TEST(PackageSigningTest, KeyFilesTrustSetsAndRevocationListsAreChecked) {
  TempDir tmp;
  const SigningKey k = SigningKey::Generate();
  ASSERT_TRUE(k.Write(tmp.Join("node.key"), tmp.Join("trusted/node.pub")).ok());
  struct stat st;
  ASSERT_EQ(::stat(tmp.Join("node.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto read = SigningKey::Read(tmp.Join("node.key"));
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->public_key_hex, k.public_key_hex);
  EXPECT_EQ(read->secret_key, k.secret_key);

  ::chmod(tmp.Join("node.key").c_str(), 0644);
  EXPECT_EQ(SigningKey::Read(tmp.Join("node.key")).status().code(),
            absl::StatusCode::kFailedPrecondition);
  WriteFileOrDie(tmp.Join("bad.key"), "{}");
  ::chmod(tmp.Join("bad.key").c_str(), 0600);
  EXPECT_EQ(SigningKey::Read(tmp.Join("bad.key")).status().code(),
            absl::StatusCode::kInvalidArgument);

  const SigningKey k2 = SigningKey::Generate();
  ASSERT_TRUE(k2.Write(tmp.Join("two.key"), tmp.Join("two.pub")).ok());
  auto trust = TrustSet::Load(tmp.Join("trusted") + "," + tmp.Join("two.pub"));
  ASSERT_TRUE(trust.ok()) << trust.status();
  EXPECT_EQ(trust->size(), 2u);
  EXPECT_TRUE(trust->Trusts(k.public_key_hex));
  EXPECT_TRUE(trust->Trusts(k2.public_key_hex));
  std::filesystem::create_directories(tmp.Join("empty"));
  EXPECT_EQ(TrustSet::Load(tmp.Join("empty")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TrustSet::Load(tmp.Join("missing")).status().code(), absl::StatusCode::kNotFound);

  auto bad = Revocations::Parse("key " + k.public_key_hex + "\nrevoke everything\n");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("line 2"));

  auto shared = SharedFsStore::Open({tmp.Join("shared"), "", nullptr});
  ASSERT_TRUE(shared.ok());
  EXPECT_TRUE((*shared)->ReadRevocations()->keys.empty());
  ASSERT_TRUE((*shared)->AddRevocation("key " + k.public_key_hex).ok());
  EXPECT_EQ((*shared)->AddRevocation("key nothex").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*shared)->ReadRevocations()->keys.count(k.public_key_hex), 1u);
}

// ---------------------------------------------------------------------------------------------
// The provider

struct SignedNode {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  FakeCompiler* compiler = nullptr;
  std::unique_ptr<TieredPackageProvider> provider;
  double Refused(const std::string& reason) {
    return CounterValue(*registry, "kiln_artifact_refused_total", {{"reason", reason}});
  }
};

std::unique_ptr<SignedNode> MakeSignedNode(const std::string& local_root,
                                           const std::string& shared_root, const TrustSet& trust,
                                           const SigningKey* signer) {
  auto node = std::make_unique<SignedNode>();
  LocalDiskStoreOptions lo;
  lo.root = local_root;
  auto local = LocalDiskStore::Open(lo, node->registry.get());
  EXPECT_TRUE(local.ok());
  auto shared = SharedFsStore::Open({shared_root, "", nullptr});
  EXPECT_TRUE(shared.ok());
  auto compiler = std::make_unique<FakeCompiler>();
  node->compiler = compiler.get();
  TieredOptions options;
  options.poll_initial_ms = 10;
  options.poll_max_ms = 50;
  options.trust = std::make_shared<const TrustSet>(trust);
  if (signer != nullptr) options.signer = std::make_shared<const SigningKey>(*signer);
  auto p = TieredPackageProvider::Create(*std::move(local), *std::move(shared), std::move(compiler),
                                         options, node->registry.get());
  EXPECT_TRUE(p.ok()) << p.status();
  node->provider = *std::move(p);
  return node;
}

const char kModelDir[] = "/nonexistent/model";

TEST(SignedProviderTest, CompiledPackagesAreSignedAndAnotherNodeLoadsThem) {
  TempDir tmp;
  const SigningKey k = SigningKey::Generate();
  auto a = MakeSignedNode(tmp.Join("a"), tmp.Join("shared"), Trusting(k), &k);
  const ArtifactKey key = MakeKey();
  auto got = a->provider->Get({key, kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
  EXPECT_TRUE(std::filesystem::exists(PackageDir(tmp.Join("shared"), key) + "/signature.json"));

  auto b = MakeSignedNode(tmp.Join("b"), tmp.Join("shared"), Trusting(k), nullptr);
  // Its own variable, declared after `b`: a package's pin must be released before its store.
  auto got_b = b->provider->Get({key, kModelDir});
  ASSERT_TRUE(got_b.ok()) << got_b.status();
  EXPECT_EQ(got_b->provenance, "shared");
  EXPECT_EQ(b->compiler->calls(), 0);
}

TEST(SignedProviderTest, UnsignedSharedPackageIsRefusedQuarantinedEverywhereAndRebuilt) {
  TempDir tmp;
  const SigningKey k = SigningKey::Generate();
  const ArtifactKey key = MakeKey();
  PublishFakePackage(tmp.Join("shared"), key);  // as a hostile writer of the shared dir would
  auto node = MakeSignedNode(tmp.Join("local"), tmp.Join("shared"), Trusting(k), &k);
  auto got = node->provider->Get({key, kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
  EXPECT_THAT(got->warning, HasSubstr("not signed"));
  EXPECT_EQ(node->Refused("unsigned"), 1);
  EXPECT_EQ(CountEntries(tmp.Join("shared/quarantine")), 1);
  EXPECT_EQ(CountEntries(tmp.Join("local/quarantine")), 1);
  // The republished copy is this node's, signed.
  EXPECT_TRUE(Check(PackageDir(tmp.Join("shared"), key), key, Trusting(k)).ok());
}

TEST(SignedProviderTest, UntrustedSignerIsRefusedAndRebuilt) {
  TempDir tmp;
  const SigningKey k = SigningKey::Generate();
  const SigningKey stranger = SigningKey::Generate();
  const ArtifactKey key = MakeKey();
  PublishFakePackage(tmp.Join("local"), key);
  ASSERT_TRUE(SignPackageDir(PackageDir(tmp.Join("local"), key), key.Digest(), stranger).ok());
  auto node = MakeSignedNode(tmp.Join("local"), tmp.Join("shared"), Trusting(k), &k);
  auto got = node->provider->Get({key, kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
  EXPECT_THAT(got->warning, HasSubstr("not in this node's trust set"));
  EXPECT_EQ(node->Refused("untrusted"), 1);
  EXPECT_EQ(node->compiler->calls(), 1);
}

TEST(SignedProviderTest, RevokingAKeyRefusesItsPackagesAndTheyAreRebuilt) {
  TempDir tmp;
  const SigningKey old_key = SigningKey::Generate();
  const SigningKey new_key = SigningKey::Generate();
  TrustSet both = Trusting(old_key);
  both.Add(new_key.public_key_hex);
  const ArtifactKey key = MakeKey();
  auto a = MakeSignedNode(tmp.Join("a"), tmp.Join("shared"), both, &old_key);
  ASSERT_TRUE(a->provider->Get({key, kModelDir}).ok());  // compiled, signed by old_key

  auto shared = SharedFsStore::Open({tmp.Join("shared"), "", nullptr});
  ASSERT_TRUE((*shared)->AddRevocation("key " + old_key.public_key_hex).ok());

  // Node a still has its copy on local disk: refused before loading, like the shared one.
  auto again = a->provider->Get({key, kModelDir});
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition) << again.status();
  EXPECT_THAT(again.status().message(), HasSubstr("revoked"));
  EXPECT_GE(a->Refused("revoked_key"), 1);

  // A node with a good key rebuilds it; the shared tier then holds its copy.
  auto b = MakeSignedNode(tmp.Join("b"), tmp.Join("shared"), both, &new_key);
  auto got = b->provider->Get({key, kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
  const SignatureCheck c = Check(PackageDir(tmp.Join("shared"), key), key, both);
  EXPECT_TRUE(c.ok()) << c.reason;
  EXPECT_EQ(c.signer, new_key.public_key_hex);
}

TEST(SignedProviderTest, NodeWhoseOwnKeyIsUntrustedFailsClearly) {
  TempDir tmp;
  const SigningKey k = SigningKey::Generate();
  const SigningKey mine = SigningKey::Generate();
  auto node = MakeSignedNode(tmp.Join("local"), tmp.Join("shared"), Trusting(k), &mine);
  auto got = node->provider->Get({MakeKey(), kModelDir});
  EXPECT_EQ(got.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(got.status().message(), HasSubstr("trust set"));
  EXPECT_EQ(CountEntries(tmp.Join("shared")), 1);  // leases/ only: nothing published
}

TEST(SignedProviderTest, QuarantineTakesAnUnusablePackageOutOfEveryTierAndItIsRebuilt) {
  TempDir tmp;
  const SigningKey k = SigningKey::Generate();
  auto node = MakeSignedNode(tmp.Join("local"), tmp.Join("shared"), Trusting(k), &k);
  const ArtifactKey key = MakeKey();
  ASSERT_TRUE(node->provider->Get({key, kModelDir}).ok());
  ASSERT_TRUE(node->provider->Quarantine(key, "unloadable", "dlopen failed").ok());
  EXPECT_FALSE(std::filesystem::exists(PackageDir(tmp.Join("local"), key)));
  EXPECT_FALSE(std::filesystem::exists(PackageDir(tmp.Join("shared"), key)));
  EXPECT_EQ(node->Refused("unloadable"), 1);
  ASSERT_TRUE(node->provider->Quarantine(key, "canary", "output moved").ok());  // gone: no-op
  EXPECT_EQ(CounterValue(*node->registry, "kiln_artifact_canary_failures_total"), 1);
  auto got = node->provider->Get({key, kModelDir});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->provenance, "compiled");
  EXPECT_EQ(node->compiler->calls(), 2);
}

}  // namespace
}  // namespace kiln::cache
