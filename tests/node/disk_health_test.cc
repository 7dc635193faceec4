// DiskHealth (node/disk_health.h) on real filesystems: a healthy directory, a full tmpfs and a
// read-only one (mounted by the test; skipped with the reason when it cannot mount, e.g. not
// root), and DiskFailure turning a failed job's error into one clear line with the code the
// coordinator requeues on.
#include <sys/mount.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "node/disk_health.h"
#include "tests/pipeline/test_support.h"

namespace kiln::node {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// A small tmpfs mounted for the test, unmounted at the end.
class SmallTmpfs {
 public:
  explicit SmallTmpfs(const std::string& dir, const char* options) : dir_(dir) {
    std::filesystem::create_directories(dir);
    mounted_ = ::mount("kiln-test", dir.c_str(), "tmpfs", 0, options) == 0;
    if (!mounted_) error_ = std::strerror(errno);
  }
  ~SmallTmpfs() {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
  }
  bool mounted() const { return mounted_; }
  const std::string& error() const { return error_; }
  absl::Status Remount(unsigned long flags, const char* options) {
    if (::mount("kiln-test", dir_.c_str(), "tmpfs", MS_REMOUNT | flags, options) != 0) {
      return absl::InternalError(std::strerror(errno));
    }
    return absl::OkStatus();
  }

 private:
  std::string dir_;
  bool mounted_ = false;
  std::string error_;
};

// Writes `path` until the filesystem is full.
void Fill(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::string block(4096, 'x');
  while (std::fwrite(block.data(), 1, block.size(), f) == block.size() && std::fflush(f) == 0) {
  }
  std::fclose(f);
}

TEST(DiskHealthTest, HealthyDirectoryProbesOkAndLeavesNothingBehind) {
  kiln::testing::TempDir tmp;
  EXPECT_TRUE(ProbeDisk(tmp.path(), 65536).ok());
  EXPECT_TRUE(std::filesystem::is_empty(tmp.path()));
  DiskHealth disk({tmp.path(), 4096, 0});
  EXPECT_TRUE(disk.CheckNow().ok());
  EXPECT_EQ(disk.reason(), "");
  // An error that is not the disk's stays as it was.
  const absl::Status bad = absl::InternalError("Traceback (most recent call last):\n ...");
  EXPECT_EQ(DiskFailure(bad, &disk, "n1"), bad);
}

TEST(DiskHealthTest, FullDiskIsResourceExhaustedWithOneClearLineUntilItIsFreed) {
  kiln::testing::TempDir tmp;
  SmallTmpfs fs(tmp.Join("packages"), "size=256k");
  if (!fs.mounted()) GTEST_SKIP() << "cannot mount a tmpfs (" << fs.error() << "; needs root)";
  Fill(tmp.Join("packages/filler"));
  DiskHealth disk({tmp.Join("packages"), 65536, 0});
  absl::Status s = disk.CheckNow();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(disk.reason(), HasSubstr("No space left on device"));
  EXPECT_THAT(disk.reason(), HasSubstr("free space"));

  const absl::Status job = DiskFailure(
      absl::InternalError("kiln-compile failed (exit 1): Traceback (most recent call last):\n  "
                          "File \"compile.py\", line 1\nOSError: [Errno 28]"),
      &disk, "node-7");
  EXPECT_EQ(job.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(job.message(), Not(HasSubstr("\n")));
  EXPECT_THAT(job.message(), Not(HasSubstr("Traceback")));
  EXPECT_THAT(job.message(), HasSubstr("node node-7"));
  EXPECT_THAT(job.message(), HasSubstr(tmp.Join("packages")));
  EXPECT_THAT(job.message(), HasSubstr("moves to another node"));
  // A bad request is not the disk's fault even while the disk is full.
  EXPECT_EQ(DiskFailure(absl::InvalidArgumentError("spec.width"), &disk, "node-7").code(),
            absl::StatusCode::kInvalidArgument);

  std::filesystem::remove(tmp.Join("packages/filler"));
  EXPECT_TRUE(disk.CheckNow().ok());
  EXPECT_EQ(disk.reason(), "");
}

TEST(DiskHealthTest, ReadOnlyDiskIsUnavailable) {
  kiln::testing::TempDir tmp;
  SmallTmpfs fs(tmp.Join("packages"), "size=256k");
  if (!fs.mounted()) GTEST_SKIP() << "cannot mount a tmpfs (" << fs.error() << "; needs root)";
  ASSERT_TRUE(fs.Remount(MS_RDONLY, "size=256k").ok());
  DiskHealth disk({tmp.Join("packages"), 4096, 0});
  absl::Status s = disk.CheckNow();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(s.message(), HasSubstr("Read-only file system"));
  EXPECT_THAT(disk.reason(), HasSubstr("writable"));
}

TEST(DiskHealthTest, PeriodicProbeNoticesADiskThatFillsAndHeals) {
  kiln::testing::TempDir tmp;
  SmallTmpfs fs(tmp.Join("packages"), "size=256k");
  if (!fs.mounted()) GTEST_SKIP() << "cannot mount a tmpfs (" << fs.error() << "; needs root)";
  DiskHealth disk({tmp.Join("packages"), 65536, 20});
  disk.Start();
  auto wait_for = [&](bool healthy) {
    for (int i = 0; i < 500 && disk.status().ok() != healthy; ++i) ::usleep(10000);
    return disk.status().ok() == healthy;
  };
  EXPECT_TRUE(wait_for(true));
  Fill(tmp.Join("packages/filler"));
  EXPECT_TRUE(wait_for(false));
  std::filesystem::remove(tmp.Join("packages/filler"));
  EXPECT_TRUE(wait_for(true));
  disk.Stop();
}

}  // namespace
}  // namespace kiln::node
