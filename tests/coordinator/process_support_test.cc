// What kiln-coordinator advertises in its endpoints file: the bound addresses with --advertise as
// their host, or 127.0.0.1 for an all-interfaces bind without one.
#include "coordinator/process_support.h"

#include "gtest/gtest.h"

namespace kiln::coordinator {
namespace {

TEST(AdvertisedEndpoints, TheAdvertiseHostReplacesTheBoundOne) {
  const EndpointsFile e = AdvertisedEndpoints("tcp://0.0.0.0:7700", "tcp://0.0.0.0:7701",
                                              "http://0.0.0.0:9400/metrics", "10.0.0.2");
  EXPECT_EQ(e.client_endpoint, "tcp://10.0.0.2:7700");
  EXPECT_EQ(e.node_endpoint, "tcp://10.0.0.2:7701");
  EXPECT_EQ(e.metrics_url, "http://10.0.0.2:9400/metrics");
}

TEST(AdvertisedEndpoints, WithoutOneAnAllInterfacesBindSaysLoopback) {
  const EndpointsFile e = AdvertisedEndpoints("tcp://0.0.0.0:7700", "tcp://10.0.0.2:7701",
                                              "http://127.0.0.1:9400/metrics", "");
  EXPECT_EQ(e.client_endpoint, "tcp://127.0.0.1:7700");
  EXPECT_EQ(e.node_endpoint, "tcp://10.0.0.2:7701");
  EXPECT_EQ(e.metrics_url, "http://127.0.0.1:9400/metrics");
}

}  // namespace
}  // namespace kiln::coordinator
