// common/flags.h and common/version.h: one flag style for every executable, --version's text.
#include "common/flags.h"

#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "common/status.h"
#include "common/version.h"
#include "gtest/gtest.h"

ABSL_FLAG(std::string, state_dir, "", "test: a string flag");
ABSL_FLAG(int, heartbeat_ms, 1000, "test: an int flag");
ABSL_FLAG(bool, dry_run, false, "test: a bool flag");

namespace kiln {
namespace {

using Args = std::vector<std::string>;

TEST(NormalizeFlagNamesTest, DashesAndUnderscoresAlike) {
  EXPECT_EQ(NormalizeFlagNames({"--state-dir=/a-b", "--dry-run", "-heartbeat-ms=5"}),
            (Args{"--state_dir=/a-b", "--dry_run", "-heartbeat_ms=5"}));
  EXPECT_EQ(NormalizeFlagNames({"--state_dir", "x"}), (Args{"--state_dir", "x"}));
}

TEST(NormalizeFlagNamesTest, LeavesValuesAndPositionalsAlone) {
  // The argument after a flag that takes a value is its value, even when it starts with '-'.
  EXPECT_EQ(NormalizeFlagNames({"--state-dir", "-my-dir", "pos-1", "--", "--not-a-flag"}),
            (Args{"--state_dir", "-my-dir", "pos-1", "--", "--not-a-flag"}));
  // A bool flag takes no separate value: the next flag is normalized.
  EXPECT_EQ(NormalizeFlagNames({"--dry-run", "--heartbeat-ms", "7"}),
            (Args{"--dry_run", "--heartbeat_ms", "7"}));
}

TEST(CheckFlagsTest, SetsValuesInEitherForm) {
  ASSERT_TRUE(CheckFlags(NormalizeFlagNames({"--state-dir", "/tmp/x", "--heartbeat-ms=250",
                                             "--dry-run"}))
                  .ok());
  EXPECT_EQ(absl::GetFlag(FLAGS_state_dir), "/tmp/x");
  EXPECT_EQ(absl::GetFlag(FLAGS_heartbeat_ms), 250);
  EXPECT_TRUE(absl::GetFlag(FLAGS_dry_run));
  ASSERT_TRUE(CheckFlags({"--nodry_run"}).ok());
  EXPECT_FALSE(absl::GetFlag(FLAGS_dry_run));
}

TEST(CheckFlagsTest, UnknownFlagIsBadInputNamingIt) {
  const absl::Status s = CheckFlags(NormalizeFlagNames({"--state-dri=/x"}));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ErrorField(s), "--state_dri");
  EXPECT_EQ(ExitCodeFor(s), kExitBadInput);
}

TEST(CheckFlagsTest, BadOrMissingValueIsBadInputNamingTheFlag) {
  const absl::Status bad = CheckFlags({"--heartbeat_ms=often"});
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ErrorField(bad), "--heartbeat_ms");
  EXPECT_TRUE(absl::StrContains(bad.message(), "often")) << bad;
  const absl::Status missing = CheckFlags({"--state_dir"});
  EXPECT_EQ(ErrorField(missing), "--state_dir");
  EXPECT_TRUE(CheckFlags({"--", "--whatever"}).ok());
}

TEST(NoPositionalArgumentsTest, OnlyTheProgramNameIsOk) {
  EXPECT_TRUE(NoPositionalArguments({"kiln-node"}).ok());
  EXPECT_TRUE(NoPositionalArguments({}).ok());
  const absl::Status extra = NoPositionalArguments({"kiln-node", "stray", "more"});
  EXPECT_EQ(extra.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(extra.message(), "unexpected argument 'stray'");
}

TEST(FlagsHelpTextTest, ListsOurFlagsNotAbseilOnes) {
  const std::string text = FlagsHelpText("prog --state-dir DIR");
  EXPECT_TRUE(absl::StartsWith(text, "usage: prog --state-dir DIR\n")) << text;
  EXPECT_TRUE(absl::StrContains(text, "--heartbeat-ms  test: an int flag (default: \"1000\")"))
      << text;
  EXPECT_FALSE(absl::StrContains(text, "--flagfile")) << text;
}

TEST(VersionTest, NamesProgramCommitTorchAndCuda) {
  const BuildInfo& info = GetBuildInfo();
  EXPECT_FALSE(info.version.empty());
  EXPECT_FALSE(info.git_commit.empty());
  const std::string text = VersionText("kiln-node");
  EXPECT_TRUE(absl::StartsWith(text, "kiln-node " + info.version + " (git " + info.git_commit))
      << text;
  EXPECT_TRUE(absl::StrContains(text, "torch " + info.torch + ", CUDA " + info.cuda)) << text;
}

}  // namespace
}  // namespace kiln
