// CURVE key files and key lists (common/curve_keys.h) on a temp directory.
#include "common/curve_keys.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "common/files.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

using ::testing::HasSubstr;

class CurveKeysTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kiln-curve-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { (void)RemoveTree(dir_); }
  void Write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ + "/" + name) << text;
  }
  std::string dir_;
};

TEST_F(CurveKeysTest, NewPairRoundTripsThroughFilesWithPrivateSecret) {
  auto pair = NewCurveKeyPair();
  ASSERT_TRUE(pair.ok()) << pair.status();
  EXPECT_TRUE(IsCurveKey(pair->public_key));
  EXPECT_TRUE(IsCurveKey(pair->secret_key));
  EXPECT_EQ(*CurvePublicKey(pair->secret_key), pair->public_key);
  ASSERT_TRUE(WriteCurveKeyFiles(dir_ + "/keys", "node-1", *pair).ok());
  struct stat st;
  ASSERT_EQ(stat((dir_ + "/keys/node-1.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600);
  ASSERT_EQ(stat((dir_ + "/keys").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700);
  auto read = ReadCurveKeyPair(dir_ + "/keys/node-1.key");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->secret_key, pair->secret_key);
  EXPECT_EQ(read->public_key, pair->public_key);
  EXPECT_EQ(*ReadCurvePublicKey(dir_ + "/keys/node-1.pub"), pair->public_key);
  EXPECT_EQ(*ReadCurvePublicKey(dir_ + "/keys/node-1.key"), pair->public_key);
  // The .pub holds no secret.
  std::ifstream in(dir_ + "/keys/node-1.pub");
  std::string text((std::istreambuf_iterator<char>(in)), {});
  EXPECT_THAT(text, ::testing::Not(HasSubstr(pair->secret_key)));
  EXPECT_EQ(ReadCurveKeyPair(dir_ + "/keys/node-1.pub").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(CurveKeysTest, ExistingFilesAreNotOverwrittenUnlessAsked) {
  auto a = NewCurveKeyPair();
  auto b = NewCurveKeyPair();
  ASSERT_TRUE(WriteCurveKeyFiles(dir_, "c", *a).ok());
  EXPECT_EQ(WriteCurveKeyFiles(dir_, "c", *b).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(ReadCurveKeyPair(dir_ + "/c.key")->public_key, a->public_key);
  ASSERT_TRUE(WriteCurveKeyFiles(dir_, "c", *b, /*overwrite=*/true).ok());
  EXPECT_EQ(ReadCurveKeyPair(dir_ + "/c.key")->public_key, b->public_key);
  EXPECT_EQ(WriteCurveKeyFiles(dir_, "../evil", *a).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CurveKeysTest, AMismatchedOrMalformedKeyFileIsRefusedNamingTheFile) {
  auto a = NewCurveKeyPair();
  auto b = NewCurveKeyPair();
  Write("mixed.key", "public-key = \"" + a->public_key + "\"\nsecret-key = \"" + b->secret_key +
                         "\"\n");
  auto mixed = ReadCurveKeyPair(dir_ + "/mixed.key");
  EXPECT_EQ(mixed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(mixed.status().message(), HasSubstr("does not belong"));
  Write("short.key", "secret-key = \"abc\"\n");
  auto bad = ReadCurveKeyPair(dir_ + "/short.key");
  EXPECT_THAT(bad.status().message(), HasSubstr("short.key:1"));
  EXPECT_EQ(ReadCurveKeyPair(dir_ + "/missing.key").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CurveKeysTest, KeyListsFromAFileOrADirectoryOfPubFiles) {
  auto a = NewCurveKeyPair();
  auto b = NewCurveKeyPair();
  Write("list", "# allowed nodes\n" + a->public_key + " node-a\n\n" + b->public_key + "\n");
  auto list = ReadCurveKeyList(dir_ + "/list");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(list->size(), 2u);
  EXPECT_EQ(list->at(a->public_key), "node-a");

  ASSERT_TRUE(WriteCurveKeyFiles(dir_ + "/d", "alice", *a).ok());
  ASSERT_TRUE(WriteCurveKeyFiles(dir_ + "/d", "bob", *b).ok());
  auto from_dir = ReadCurveKeyList(dir_ + "/d");
  ASSERT_TRUE(from_dir.ok()) << from_dir.status();
  EXPECT_EQ(from_dir->size(), 2u);  // *.key files are not read as list entries
  EXPECT_EQ(from_dir->at(b->public_key), "bob");

  Write("bad", a->public_key + "\nnot-a-key\n");
  auto bad = ReadCurveKeyList(dir_ + "/bad");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("bad:2"));
  EXPECT_TRUE(ReadCurveKeyList("")->empty());
}

TEST_F(CurveKeysTest, FingerprintChangesWhenAListChanges) {
  auto a = NewCurveKeyPair();
  ASSERT_TRUE(WriteCurveKeyFiles(dir_ + "/d", "alice", *a).ok());
  const std::string before = KeyListFingerprint(dir_ + "/d");
  EXPECT_EQ(before, KeyListFingerprint(dir_ + "/d"));
  ASSERT_TRUE(WriteCurveKeyFiles(dir_ + "/d", "bob", *NewCurveKeyPair()).ok());
  EXPECT_NE(before, KeyListFingerprint(dir_ + "/d"));
}

TEST_F(CurveKeysTest, LoadCurveClientNeedsBothFiles) {
  EXPECT_FALSE(LoadCurveClient("", "")->enabled());
  auto a = NewCurveKeyPair();
  ASSERT_TRUE(WriteCurveKeyFiles(dir_, "c", *a).ok());
  EXPECT_EQ(LoadCurveClient(dir_ + "/c.key", "").status().code(),
            absl::StatusCode::kInvalidArgument);
  auto client = LoadCurveClient(dir_ + "/c.key", dir_ + "/c.pub");
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_TRUE(client->enabled());
}

}  // namespace
}  // namespace kiln
