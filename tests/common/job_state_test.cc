// common/job_state.h: state names from the proto, terminal states.
#include "common/job_state.h"

#include "gtest/gtest.h"

namespace kiln {
namespace {

TEST(StateNameTest, ProtoNamesWithoutPrefix) {
  EXPECT_EQ(JobStateName(kiln::v1::JOB_STATE_QUEUED), "QUEUED");
  EXPECT_EQ(JobStateName(kiln::v1::JOB_STATE_CANCELLED), "CANCELLED");
  EXPECT_EQ(JobStateName(kiln::v1::JOB_STATE_UNSPECIFIED), "UNSPECIFIED");
  EXPECT_EQ(JobStateName(static_cast<kiln::v1::JobState>(99)), "UNSPECIFIED");
  EXPECT_EQ(NodeStateName(kiln::v1::NODE_STATE_DRAINING), "DRAINING");
  EXPECT_EQ(NodeStateName(kiln::v1::NODE_STATE_LEFT), "LEFT");
  EXPECT_EQ(NodeStateName(static_cast<kiln::v1::NodeState>(42)), "UNSPECIFIED");
}

TEST(StateNameTest, TerminalStates) {
  EXPECT_FALSE(IsTerminal(kiln::v1::JOB_STATE_QUEUED));
  EXPECT_FALSE(IsTerminal(kiln::v1::JOB_STATE_RUNNING));
  EXPECT_TRUE(IsTerminal(kiln::v1::JOB_STATE_SUCCEEDED));
  EXPECT_TRUE(IsTerminal(kiln::v1::JOB_STATE_FAILED));
  EXPECT_TRUE(IsTerminal(kiln::v1::JOB_STATE_CANCELLED));
}

}  // namespace
}  // namespace kiln
