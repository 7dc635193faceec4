// common/files.h: atomic file writing, directory fsync, ExecutableDir.
#include "common/files.h"

#include <dirent.h>
#include <algorithm>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

using ::testing::HasSubstr;

class FilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "/kiln_files_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { ASSERT_TRUE(RemoveTree(dir_).ok()); }

  static std::string Read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  std::vector<std::string> Entries() const {
    std::vector<std::string> out;
    DIR* d = ::opendir(dir_.c_str());
    while (dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") out.push_back(name);
    }
    ::closedir(d);
    return out;
  }

  std::string dir_;
};

TEST_F(FilesTest, WritesAndReplacesWholeFiles) {
  const std::string path = dir_ + "/state.json";
  ASSERT_TRUE(WriteFileAtomically(path, "{\"v\":1}\n").ok());
  EXPECT_EQ(Read(path), "{\"v\":1}\n");
  const std::string big(3 << 20, 'x');  // more than one write() may take
  ASSERT_TRUE(WriteFileAtomically(path, big).ok());
  EXPECT_EQ(Read(path), big);
  ASSERT_TRUE(WriteFileAtomically(path, "").ok());
  EXPECT_EQ(Read(path), "");
  // No temporary file is left behind.
  EXPECT_EQ(Entries(), std::vector<std::string>{"state.json"});
}

TEST_F(FilesTest, ModeOfANewFile) {
  const std::string path = dir_ + "/secret";
  const mode_t old = ::umask(0);
  const absl::Status s = WriteFileAtomically(path, "k", 0600);
  ::umask(old);
  ASSERT_TRUE(s.ok()) << s;
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(FilesTest, AFailedWriteLeavesTheOldFileAndNoTemporary) {
  const std::string path = dir_ + "/keep";
  ASSERT_TRUE(WriteFileAtomically(path, "old").ok());
  // Renaming a file over a non-empty directory fails after the temporary was written.
  const std::string blocked = dir_ + "/blocked";
  ASSERT_EQ(::mkdir(blocked.c_str(), 0755), 0);
  ASSERT_TRUE(WriteFileAtomically(blocked + "/inner", "x").ok());
  const absl::Status s = WriteFileAtomically(blocked, "new");
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(blocked));
  EXPECT_EQ(Read(path), "old");
  std::vector<std::string> entries = Entries();
  std::sort(entries.begin(), entries.end());
  EXPECT_EQ(entries, (std::vector<std::string>{"blocked", "keep"}));
}

TEST_F(FilesTest, ErrorsHaveErrnosCodeAndNameThePath) {
  const absl::Status s = WriteFileAtomically(dir_ + "/no/such/dir/f", "x");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("/no/such/dir/f"));
  EXPECT_EQ(FsyncDir(dir_ + "/nope").code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(FsyncDir(dir_).ok());
  if (::geteuid() != 0) {  // root ignores permissions
    const std::string ro = dir_ + "/ro";
    ASSERT_EQ(::mkdir(ro.c_str(), 0555), 0);
    const absl::Status denied = WriteFileAtomically(ro + "/f", "x");
    EXPECT_EQ(denied.code(), absl::StatusCode::kPermissionDenied) << denied;
    EXPECT_THAT(std::string(denied.message()), HasSubstr(ro + "/f"));
    ::chmod(ro.c_str(), 0755);
  }
}

TEST_F(FilesTest, ConcurrentWritersNeverLeaveAPartialFile) {
  const std::string path = dir_ + "/shared";
  const std::string a(1 << 16, 'a'), b(1 << 16, 'b');
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i) ASSERT_TRUE(WriteFileAtomically(path, t % 2 ? a : b).ok());
    });
  }
  for (auto& t : threads) t.join();
  const std::string got = Read(path);
  EXPECT_TRUE(got == a || got == b);
  EXPECT_EQ(Entries(), std::vector<std::string>{"shared"});
}

TEST(ExecutableDirTest, IsTheDirectoryOfThisTest) {
  const std::string dir = ExecutableDir();
  ASSERT_FALSE(dir.empty());
  EXPECT_EQ(dir.front(), '/');
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  ASSERT_GT(n, 0);
  const std::string exe(buf, static_cast<size_t>(n));
  EXPECT_EQ(exe.substr(0, dir.size() + 1), dir + "/");
  EXPECT_EQ(exe.find('/', dir.size() + 1), std::string::npos);
}

}  // namespace
}  // namespace kiln
