// The `kiln` command-line parser: flags in both spellings, values, switches, positional counts,
// and usage errors that say what is wrong.
#include "cli/args.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::cli {
namespace {

using ::testing::HasSubstr;

TEST(ParseCommandLine, FlagsInBothSpellingsAndForms) {
  auto cl = ParseCommandLine({"generate", "--prompt", "a fox", "--width=512", "--state_dir", "/s",
                              "--no-progress", "--out", "x.png"});
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(cl->spec->name, "generate");
  EXPECT_EQ(cl->Get("prompt"), "a fox");
  EXPECT_EQ(*cl->GetInt("width", 0, 0, 10000), 512);
  EXPECT_EQ(cl->Get("state-dir"), "/s");
  EXPECT_TRUE(cl->Has("no-progress"));
  EXPECT_EQ(*cl->GetInt("height", 256, 0, 10000), 256);  // default when absent
}

TEST(ParseCommandLine, ValueMayStartWithADash) {
  auto cl = ParseCommandLine({"submit", "--prompt", "--not a flag--"});
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(cl->Get("prompt"), "--not a flag--");
}

TEST(ParseCommandLine, RepeatedFlagsKeepEveryValueLastWins) {
  auto cl =
      ParseCommandLine({"up", "--models", "a=/x", "--models=b=/y", "--nodes", "1", "--nodes", "3"});
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_THAT(cl->All("models"), ::testing::ElementsAre("a=/x", "b=/y"));
  EXPECT_EQ(*cl->GetInt("nodes", 1, 1, 64), 3);
}

TEST(ParseCommandLine, PositionalArguments) {
  auto cl = ParseCommandLine({"wait", "job-1", "--timeout", "5"});
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(cl->positional, std::vector<std::string>{"job-1"});
  EXPECT_DOUBLE_EQ(*cl->GetDouble("timeout", 0), 5);

  auto missing = ParseCommandLine({"wait"});
  EXPECT_TRUE(absl::IsInvalidArgument(missing.status()));
  EXPECT_THAT(missing.status().message(), HasSubstr("expected JOB"));

  auto extra = ParseCommandLine({"nodes", "node-1"});
  EXPECT_THAT(extra.status().message(), HasSubstr("unexpected argument 'node-1'"));
}

TEST(ParseCommandLine, UsageErrorsNameTheProblem) {
  EXPECT_THAT(ParseCommandLine({"frobnicate"}).status().message(),
              HasSubstr("unknown command 'frobnicate'"));
  EXPECT_THAT(ParseCommandLine({"nodes", "--prompt", "x"}).status().message(),
              HasSubstr("unknown flag --prompt"));
  EXPECT_THAT(ParseCommandLine({"generate", "--out"}).status().message(),
              HasSubstr("--out needs a value"));
  EXPECT_THAT(ParseCommandLine({"up", "--detach=yes"}).status().message(),
              HasSubstr("--detach takes no value"));
  EXPECT_TRUE(absl::IsInvalidArgument(ParseCommandLine({}).status()));
}

TEST(ParseCommandLine, HelpFlagBecomesHelpCommand) {
  auto cl = ParseCommandLine({"generate", "--help"});
  ASSERT_TRUE(cl.ok());
  EXPECT_EQ(cl->spec->name, "help");
  EXPECT_EQ(cl->positional, std::vector<std::string>{"generate"});
}

TEST(CommandLine, TypedValuesAreChecked) {
  auto cl = ParseCommandLine(
      {"submit", "--width", "abc", "--seed", "-1", "--steps", "99999999999", "--guidance", "nan"});
  ASSERT_TRUE(cl.ok());
  EXPECT_THAT(cl->GetInt("width", 0, 0, 100).status().message(),
              HasSubstr("--width: 'abc' is not an integer"));
  EXPECT_THAT(cl->GetUint64("seed", 0).status().message(),
              HasSubstr("--seed: '-1' is not a non-negative integer"));
  EXPECT_THAT(cl->GetInt("steps", 0, 0, 4294967295).status().message(),
              HasSubstr("outside 0..4294967295"));
  EXPECT_TRUE(absl::IsInvalidArgument(cl->GetDouble("guidance", 0).status()));
  auto big = ParseCommandLine({"submit", "--seed", "18446744073709551615"});
  EXPECT_EQ(*big->GetUint64("seed", 0), 18446744073709551615ull);
}

TEST(Usage, ListsEveryCommandAndItsFlags) {
  const std::string usage = Usage();
  for (const char* c : {"up", "down", "add-node", "generate", "submit", "status", "wait", "cancel",
                        "nodes", "drain", "uncordon", "remove-node"}) {
    EXPECT_THAT(usage, HasSubstr(std::string("  ") + c)) << c;
  }
  EXPECT_THAT(CommandUsage(*FindCommand("up")), HasSubstr("--models NAME=DIR"));
}

TEST(TakeLogFormat, OnlyBeforeTheCommand) {
  std::vector<std::string> args = {"--log-format", "json", "--log_format=text", "nodes", "--json"};
  auto v = TakeLogFormat(&args);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, "text");  // the last one wins
  EXPECT_EQ(args, (std::vector<std::string>{"nodes", "--json"}));

  // After the command it is the command's business (a prompt may be "--log-format").
  args = {"submit", "--prompt", "--log-format"};
  EXPECT_EQ(*TakeLogFormat(&args), "");
  EXPECT_EQ(args.size(), 3u);

  args = {"--log-format"};
  EXPECT_EQ(TakeLogFormat(&args).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kiln::cli
