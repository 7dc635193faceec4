// Child processes of a local cluster: spawn with a log, liveness that checks the executable's
// name, graceful stop with SIGKILL as the fallback, clear errors for what cannot be started.
#include "cli/process.h"

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::cli {
namespace {

using ::testing::HasSubstr;

std::string TempDir() {
  std::string tmpl = ::testing::TempDir() + "/kiln_cli_proc_XXXXXX";
  EXPECT_NE(mkdtemp(tmpl.data()), nullptr);
  return tmpl;
}

TEST(Spawn, RunsInItsOwnSessionWithOutputInTheLog) {
  const std::string log = TempDir() + "/child.log";
  SpawnOptions o;
  o.argv = {"/bin/sh", "-c", "echo out; echo err >&2; echo sid=$(ps -o sid= $$); exec sleep 30"};
  o.log_path = log;
  auto pid = Spawn(o);
  ASSERT_TRUE(pid.ok()) << pid.status();
  // sh exec's sleep: the process keeps its pid, its name becomes "sleep".
  for (int i = 0; i < 100 && TailOfFile(log).find("ready") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_TRUE(ProcessAlive(*pid));
  EXPECT_TRUE(ProcessAlive(*pid, "sleep"));
  EXPECT_FALSE(ProcessAlive(*pid, "kiln-node"));  // someone else's process is never ours
  const std::string text = TailOfFile(log);
  EXPECT_THAT(text, HasSubstr("out\n"));
  EXPECT_THAT(text, HasSubstr("err\n"));
  EXPECT_EQ(getsid(*pid), *pid);  // session leader: Ctrl-C in our terminal does not reach it
  EXPECT_TRUE(StopProcess(*pid, 5000, "sleep"));
  EXPECT_FALSE(ProcessAlive(*pid));
}

TEST(Spawn, AddsTheGivenEnvironment) {
  const std::string log = TempDir() + "/env.log";
  setenv("KILN_TEST_KEPT", "kept", 1);
  setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3", 1);
  SpawnOptions o;
  o.argv = {"/bin/sh", "-c", "echo \"cvd=$CUDA_VISIBLE_DEVICES kept=$KILN_TEST_KEPT\""};
  o.log_path = log;
  o.env = {{"CUDA_VISIBLE_DEVICES", "MIG-4f1c"}};
  auto pid = Spawn(o);
  ASSERT_TRUE(pid.ok()) << pid.status();
  EXPECT_TRUE(WaitGone(*pid, 5000));
  EXPECT_THAT(TailOfFile(log), HasSubstr("cvd=MIG-4f1c kept=kept\n"));
  unsetenv("CUDA_VISIBLE_DEVICES");
  unsetenv("KILN_TEST_KEPT");
}

TEST(StopProcess, KillsWhatIgnoresSigterm) {
  SpawnOptions o;
  o.argv = {"/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"};
  auto pid = Spawn(o);
  ASSERT_TRUE(pid.ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(StopProcess(*pid, 300));  // had to be killed
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
  EXPECT_FALSE(ProcessAlive(*pid));
}

TEST(Spawn, MissingExecutableIsNotFound) {
  SpawnOptions o;
  o.argv = {"/nonexistent/kiln-node", "--x"};
  auto pid = Spawn(o);
  EXPECT_TRUE(absl::IsNotFound(pid.status()));
  EXPECT_THAT(pid.status().message(), HasSubstr("cannot run /nonexistent/kiln-node"));

  o.argv = {"/bin/true"};
  o.log_path = "/nonexistent-dir/x.log";
  EXPECT_THAT(Spawn(o).status().message(), HasSubstr("open log /nonexistent-dir/x.log"));
}

TEST(ProcessAlive, GoneAndInvalidPids) {
  SpawnOptions o;
  o.argv = {"/bin/true"};
  auto pid = Spawn(o);
  ASSERT_TRUE(pid.ok());
  EXPECT_TRUE(WaitGone(*pid, 5000));
  EXPECT_FALSE(ProcessAlive(0));
  EXPECT_FALSE(ProcessAlive(-1));
  EXPECT_TRUE(SignalProcess(*pid, SIGTERM).ok());  // already gone: fine
}

}  // namespace
}  // namespace kiln::cli
