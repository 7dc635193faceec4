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
