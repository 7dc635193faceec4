// cli/format.h: the progress line shows a running job's phase (a cold node spends a minute
// "preparing" at step 0), and the JSON form carries it.
#include "cli/format.h"

#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::cli {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

kiln::v1::JobInfo Running(const std::string& phase, uint32_t step) {
  kiln::v1::JobInfo job;
  job.mutable_spec()->set_job_id("j1");
  job.mutable_spec()->set_steps(8);
  job.set_state(kiln::v1::JOB_STATE_RUNNING);
  job.set_node_id("node-1");
  job.set_attempts(1);
  job.set_step(step);
  job.set_total_steps(8);
  job.set_phase(phase);
  return job;
}

TEST(ProgressBarTest, LogLinesNamePhaseChanges) {
  std::ostringstream out;
  ProgressBar bar(out, /*is_terminal=*/false, "j1");
  bar.Update(Running("preparing", 0));
  bar.Update(Running("text_encoding", 0));  // same step, new phase: a new line
  bar.Update(Running("denoising", 1));
  const std::string text = out.str();
  EXPECT_THAT(text, HasSubstr("j1: RUNNING, preparing (packages, weights) on node-1, 0/8 steps"));
  EXPECT_THAT(text, HasSubstr("j1: RUNNING, encoding text on node-1, 0/8 steps"));
  EXPECT_THAT(text, HasSubstr("j1: RUNNING, denoising on node-1, 1/8 steps"));
}

TEST(ProgressBarTest, TerminalLineShowsThePhase) {
  std::ostringstream out;
  ProgressBar bar(out, /*is_terminal=*/true, "j1");
  bar.Update(Running("preparing", 0));
  EXPECT_THAT(out.str(), HasSubstr("0/8 steps, preparing (packages, weights) on node-1"));
  kiln::v1::JobInfo queued = Running("decoding", 0);
  queued.set_state(kiln::v1::JOB_STATE_QUEUED);  // a stale phase is not shown once requeued
  std::ostringstream out2;
  ProgressBar bar2(out2, /*is_terminal=*/true, "j1");
  bar2.Update(queued);
  EXPECT_THAT(out2.str(), Not(HasSubstr("decoding")));
}

TEST(ProgressBarTest, AQueuedJobSaysWhyItWaits) {
  std::ostringstream out;
  ProgressBar bar(out, /*is_terminal=*/false, "j1");
  kiln::v1::JobInfo job = Running("queued", 0);
  job.set_state(kiln::v1::JOB_STATE_QUEUED);
  job.clear_node_id();
  job.set_error("waiting: the nodes that can run it are busy");
  bar.Update(job);
  job.set_error("waiting: the nodes that can run it are draining (node-1)");  // a new line
  bar.Update(job);
  EXPECT_EQ(out.str(),
            "j1: QUEUED, waiting: the nodes that can run it are busy, 0/8 steps\n"
            "j1: QUEUED, waiting: the nodes that can run it are draining (node-1), 0/8 steps\n");
}

TEST(FormatJobTest, ShowsThePhaseOfAnUnfinishedJob) {
  EXPECT_THAT(FormatJob(Running("loading weights transformer", 0)),
              HasSubstr("phase      loading weights transformer\n"));
  kiln::v1::JobInfo done = Running("", 8);
  done.set_state(kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_THAT(FormatJob(done), Not(HasSubstr("phase")));
}

TEST(JobToJsonTest, CarriesThePhase) {
  EXPECT_EQ(JobToJson(Running("decoding", 8))["phase"], "decoding");
}

}  // namespace
TEST(NodesTest, AMultiGpuNodeShowsItsGpuCount) {
  kiln::v1::ListNodesReply nodes;
  auto* n = nodes.add_nodes();
  n->mutable_info()->set_node_id("node-x4");
  n->mutable_info()->mutable_device()->set_kind("cuda");
  n->mutable_info()->mutable_device()->set_name("NVIDIA H200");
  n->mutable_info()->mutable_device()->set_gpu_count(4);
  EXPECT_THAT(FormatNodesTable(nodes, 0), HasSubstr("cuda NVIDIA H200 x4"));
  EXPECT_EQ(NodeToJson(*n)["device"]["gpu_count"], 4);
  n->mutable_info()->mutable_device()->set_gpu_count(0);  // an older node: one GPU
  EXPECT_THAT(FormatNodesTable(nodes, 0), Not(HasSubstr(" x")));
  EXPECT_EQ(NodeToJson(*n)["device"]["gpu_count"], 1);
}

}  // namespace kiln::cli
