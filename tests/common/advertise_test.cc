// WithHost and ValidateAdvertiseHost: the addresses kiln-coordinator and kiln-node advertise.
#include "common/advertise.h"

#include "gtest/gtest.h"

namespace kiln {
namespace {

TEST(WithHost, ReplacesTheHostOfEndpointsAndUrls) {
  EXPECT_EQ(WithHost("tcp://0.0.0.0:5555", "10.0.0.1"), "tcp://10.0.0.1:5555");
  EXPECT_EQ(WithHost("tcp://127.0.0.1:41000", "coord-a.internal"), "tcp://coord-a.internal:41000");
  EXPECT_EQ(WithHost("http://0.0.0.0:9400/metrics", "10.0.0.2"), "http://10.0.0.2:9400/metrics");
  EXPECT_EQ(WithHost("http://127.0.0.1:9400", "h"), "http://h:9400");
}

TEST(WithHost, LeavesWhatItCannotReplace) {
  EXPECT_EQ(WithHost("tcp://0.0.0.0:5555", ""), "tcp://0.0.0.0:5555");
  EXPECT_EQ(WithHost("ipc:///tmp/kiln.sock", "10.0.0.1"), "ipc:///tmp/kiln.sock");
  EXPECT_EQ(WithHost("127.0.0.1:5555", "10.0.0.1"), "127.0.0.1:5555");
}

TEST(ValidateAdvertiseHost, NamesTheFieldAndTheBadHost) {
  EXPECT_TRUE(ValidateAdvertiseHost("", "advertise").ok());
  EXPECT_TRUE(ValidateAdvertiseHost("10.0.0.1", "advertise").ok());
  EXPECT_TRUE(ValidateAdvertiseHost("node-b.example_1", "advertise").ok());
  const absl::Status bad = ValidateAdvertiseHost("tcp://10.0.0.1", "advertise");
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.message(), "advertise: 'tcp://10.0.0.1' is not a hostname or IPv4 address");
  EXPECT_FALSE(ValidateAdvertiseHost("10.0.0.1:80", "advertise").ok());
}

}  // namespace
}  // namespace kiln
