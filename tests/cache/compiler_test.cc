// Tests of SubprocessCompiler's code revision check (cache/compiler.h): a kiln-compile that runs
// other kiln code than this binary was built from is refused with a sentence naming both
// revisions, whether kiln-compile refuses itself (--kiln-revision, exit 5: the real tool, which
// stops before importing torch) or prints a package of the other revision (a stand-in script).
#include "cache/compiler.h"

#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/hash.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/cache/cache_test_support.h"
#include "tests/pipeline/test_support.h"

namespace kiln::cache {
namespace {

using ::kiln::testing::EnvOrEmpty;
using ::kiln::testing::TempDir;
using ::kiln::testing::WriteFileOrDie;
using ::testing::HasSubstr;

// A VAE decoder key for the real kiln-compile; `height` 0 is refused by kiln-compile as a usage
// error (exit 2) before it imports torch or reads the model, and after its revision check.
CompileRequest VaeRequest(const std::string& out_root, const std::string& kiln_revision) {
  CompileRequest r;
  r.model_dir = "/nonexistent-model";
  r.key = testing::MakeKey();
  r.key.component = "vae_decoder";
  r.key.precision = "fp32";
  r.key.target = "cpu";
  r.key.bucket = Bucket{1, 0, 64, 0};
  r.key.toolchain = Toolchain{"2.13.0+cpu", "", "", kiln_revision};
  r.compile_options = DefaultCompileOptions();
  r.out_root = out_root;
  return r;
}

std::string KilnCompileOrEmpty() {
  const std::string path = absl::StrCat(EnvOrEmpty("KILN_BIN"), "/kiln-compile");
  return EnvOrEmpty("KILN_BIN").empty() || !std::filesystem::exists(path) ? "" : path;
}

TEST(SubprocessCompilerTest, KilnCompileOfAnotherRevisionIsRefusedNamingBoth) {
  const std::string tool = KilnCompileOrEmpty();
  if (tool.empty()) GTEST_SKIP() << "no $KILN_BIN/kiln-compile (a build without LibTorch)";
  TempDir dir;
  SubprocessCompiler compiler(tool);
  const std::string other = Sha256Hex("a binary built from another checkout");
  const absl::Status s = compiler.Compile(VaeRequest(dir.path(), other));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(s.message(), HasSubstr("code revision mismatch"));
  EXPECT_THAT(s.message(), HasSubstr(other));
  // kiln-compile's own revision: this build's, as long as it was built from these sources
  // (tests/cache/artifact_key_test.cc checks that).
  EXPECT_THAT(s.message(), HasSubstr(BuildKilnRevision()));

  // The same request at this binary's revision passes the check and fails on its height.
  const absl::Status same = compiler.Compile(VaeRequest(dir.path(), BuildKilnRevision()));
  EXPECT_EQ(same.code(), absl::StatusCode::kInvalidArgument) << same;
  EXPECT_THAT(same.message(), HasSubstr("--height 0"));
}

TEST(SubprocessCompilerTest, PackageOfAnotherRevisionIsRefusedNamingBoth) {
  // A kiln-compile that ignores --kiln-revision (or predates it) and prints the manifest of a
  // package built from other code.
  TempDir dir;
  CompileRequest r = VaeRequest(dir.path(), BuildKilnRevision());
  ArtifactKey theirs = r.key;
  theirs.toolchain.kiln = Sha256Hex("kiln code of another checkout");
  const nlohmann::json manifest = {{"digest", theirs.Digest()}, {"key", theirs.ToJson()}};
  const std::string script = dir.Join("kiln-compile");
  WriteFileOrDie(script, absl::StrCat("#!/bin/sh\ncat <<'EOF'\n", manifest.dump(), "\nEOF\n"));
  std::filesystem::permissions(script, std::filesystem::perms::owner_all);
  const absl::Status s = SubprocessCompiler(script).Compile(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(s.message(), HasSubstr("code revision mismatch"));
  EXPECT_THAT(s.message(), HasSubstr(theirs.toolchain.kiln));
  EXPECT_THAT(s.message(), HasSubstr(BuildKilnRevision()));

  // One without the field at all (before keys had it) is named as such.
  nlohmann::json old_key = theirs.ToJson();
  old_key["toolchain"].erase("kiln");
  WriteFileOrDie(script, absl::StrCat("#!/bin/sh\ncat <<'EOF'\n",
                                      nlohmann::json({{"digest", Sha256Hex(CanonicalJson(old_key))},
                                                      {"key", old_key}})
                                          .dump(),
                                      "\nEOF\n"));
  const absl::Status old = SubprocessCompiler(script).Compile(r);
  EXPECT_EQ(old.code(), absl::StatusCode::kFailedPrecondition) << old;
  EXPECT_THAT(old.message(), HasSubstr("revision (none)"));

  // The same manifest at this binary's revision is accepted.
  const nlohmann::json ok = {{"digest", r.key.Digest()}, {"key", r.key.ToJson()}};
  WriteFileOrDie(script, absl::StrCat("#!/bin/sh\ncat <<'EOF'\n", ok.dump(), "\nEOF\n"));
  EXPECT_TRUE(SubprocessCompiler(script).Compile(r).ok());
}

}  // namespace
}  // namespace kiln::cache
