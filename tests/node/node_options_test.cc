// NodeOptions::Validate names the bad field; AdvertisedJobSlots makes room for a batch.
#include "node/node_options.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::node {
namespace {

using ::testing::HasSubstr;

TEST(NodeOptionsTest, ValidateNamesTheField) {
  NodeOptions o;
  o.node_id = "n";
  o.coordinator = "tcp://127.0.0.1:1";
  EXPECT_TRUE(o.Validate().ok()) << o.Validate();
  auto bad = [&](auto edit, const std::string& field) {
    NodeOptions c = o;
    edit(c);
    const auto s = c.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(std::string(s.message()), HasSubstr(field));
  };
  bad([](NodeOptions& c) { c.node_id = "bad id"; }, "node_id");
  bad([](NodeOptions& c) { c.coordinator = "127.0.0.1:7701"; }, "coordinator");
  bad([](NodeOptions& c) { c.device = "tpu"; }, "device");
  bad([](NodeOptions& c) { c.precision = "fp16"; }, "precision");
  bad([](NodeOptions& c) { c.precision = "fp8"; }, "fp8");
  bad([](NodeOptions& c) { c.precisions = {"bf16"}; }, "precision");
  bad([](NodeOptions& c) { c.resolutions.clear(); }, "resolutions");
  bad([](NodeOptions& c) { c.link.heartbeat_interval_ms = 0; }, "link.heartbeat_interval_ms");
  bad([](NodeOptions& c) { c.models["a/b"] = "/x"; }, "models");
  bad([](NodeOptions& c) { c.compile_options = nlohmann::json::array(); }, "compile_options");
  bad([](NodeOptions& c) { c.drain_timeout_ms = -1; }, "drain_timeout_ms");
  bad([](NodeOptions& c) { c.batching.max_batch = 5; }, "batching.max_batch");
  bad([](NodeOptions& c) { c.batching.batch_wait_ms = -1; }, "batching.batch_wait_ms");
}

TEST(NodeOptionsTest, BatchingAdvertisesSlotsForABatchAndItsPrefetchedJob) {
  NodeOptions o;
  EXPECT_EQ(o.AdvertisedJobSlots(), 2);  // no batching: job_slots as given
  o.job_slots = 1;
  EXPECT_EQ(o.AdvertisedJobSlots(), 1);
  o.batching.max_batch = 4;
  EXPECT_EQ(o.AdvertisedJobSlots(), 5);  // a batch of 4 and one encoded beside it
  o.job_slots = 7;
  EXPECT_EQ(o.AdvertisedJobSlots(), 7);  // more asked for: kept
}

}  // namespace
}  // namespace kiln::node

namespace kiln::node {
namespace {

TEST(NodeOptionsTest, ParseGpusTakesDistinctNonNegativeIndices) {
  auto none = ParseGpus("");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->empty());
  auto two = ParseGpus("1,0");
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ(*two, (std::vector<int>{1, 0}));  // rank 0 is the first listed
  auto refused = [](const std::string& text, const std::string& why) {
    const auto got = ParseGpus(text);
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_THAT(std::string(got.status().message()), HasSubstr(why)) << text;
  };
  refused("0,,1", "--gpus '0,,1': entry 2 is empty");
  refused("0,", "entry 2 is empty");
  refused(",0", "entry 1 is empty");
  refused("0,-1", "entry 2 '-1' is not a device index");
  refused("0,x", "entry 2 'x' is not a device index");
  refused("0,1.5", "entry 2 '1.5' is not a device index");
  refused("0, 1", "entry 2 ' 1' is not a device index");
  refused("0,1,0", "device 0 is listed twice");
}

TEST(NodeOptionsTest, ValidateChecksTheGpuList) {
  NodeOptions o;
  o.node_id = "n";
  o.coordinator = "tcp://127.0.0.1:1";
  o.gpus = {0, 1};
  EXPECT_TRUE(o.Validate().ok()) << o.Validate();
  EXPECT_EQ(o.RankDevices(), (std::vector<std::string>{"cpu", "cpu"}));
  o.device = "cuda";
  o.gpus = {2, 0};
  EXPECT_TRUE(o.Validate().ok()) << o.Validate();
  EXPECT_EQ(o.RankDevices(), (std::vector<std::string>{"cuda:2", "cuda:0"}));
  auto bad = [&](auto edit, const std::string& why) {
    NodeOptions c = o;
    edit(c);
    const auto s = c.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << why;
    EXPECT_THAT(std::string(s.message()), HasSubstr(why));
  };
  bad([](NodeOptions& c) { c.gpus = {0}; }, "gpus: 1 device(s); a multi-GPU node has 2..16");
  bad([](NodeOptions& c) { c.gpus = std::vector<int>(17); }, "gpus: 17 device(s)");
  bad([](NodeOptions& c) { c.gpus = {0, -1}; }, "gpus: -1 is negative");
  bad([](NodeOptions& c) { c.gpus = {1, 1}; }, "gpus: 1 is listed twice");
  bad([](NodeOptions& c) { c.device = "cuda:1"; }, "gpus: needs --device cpu or cuda");
  bad([](NodeOptions& c) { c.batching.max_batch = 2; }, "--max_batch must be 1");
  bad([](NodeOptions& c) { c.group_timeout_seconds = 0; }, "group_timeout_seconds");
  NodeOptions one = o;
  one.gpus.clear();
  one.group_timeout_seconds = 0;  // only read with --gpus
  EXPECT_TRUE(one.Validate().ok());
  EXPECT_TRUE(one.RankDevices().empty());
}

}  // namespace
}  // namespace kiln::node
