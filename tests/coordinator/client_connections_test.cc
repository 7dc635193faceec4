// ClientConnections (coordinator/client_connections.h): which reply routes a closed client
// connection takes with it, with descriptors reused by the OS and routing ids reused by clients
// that reconnect.
#include "coordinator/client_connections.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::coordinator {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using ::testing::UnorderedElementsAre;

TEST(ClientConnectionsTest, AClosedConnectionGivesBackTheRoutesSeenOnIt) {
  ClientConnections c;
  EXPECT_THAT(c.Accepted(10), IsEmpty());
  EXPECT_THAT(c.Accepted(11), IsEmpty());
  EXPECT_FALSE(c.Seen(10, "Da"));
  EXPECT_FALSE(c.Seen(10, "Ra"));  // a REQ and a DEALER route of the same routing id
  EXPECT_FALSE(c.Seen(11, "Db"));
  EXPECT_THAT(c.Disconnected(10), UnorderedElementsAre("Da", "Ra"));
  EXPECT_EQ(c.routes(), 1u);
  EXPECT_THAT(c.Disconnected(10), IsEmpty());  // given back once
  EXPECT_THAT(c.Disconnected(11), ElementsAre("Db"));
  EXPECT_EQ(c.routes(), 0u);
}

TEST(ClientConnectionsTest, AReusedDescriptorStartsWithoutTheOldConnectionsRoutes) {
  ClientConnections c;
  c.Accepted(10);
  c.Seen(10, "Dold");
  EXPECT_THAT(c.Disconnected(10), ElementsAre("Dold"));
  c.Accepted(10);  // the OS gave the next connection the same descriptor
  EXPECT_FALSE(c.Seen(10, "Dnew"));
  EXPECT_THAT(c.Disconnected(10), ElementsAre("Dnew"));
}

TEST(ClientConnectionsTest, ARouteSeenOnANewConnectionIsNotDroppedWithItsOldOne) {
  ClientConnections c;
  c.Accepted(10);
  c.Seen(10, "Dfixed-id");
  c.Accepted(11);
  c.Seen(11, "Dfixed-id");  // the client came back with the same routing id
  EXPECT_THAT(c.Disconnected(10), IsEmpty());
  EXPECT_THAT(c.Disconnected(11), ElementsAre("Dfixed-id"));
}

TEST(ClientConnectionsTest, AMessageReadAfterItsConnectionClosedIsReportedGone) {
  ClientConnections c;
  c.Accepted(10);
  EXPECT_THAT(c.Disconnected(10), IsEmpty());  // closed before its last message was read
  EXPECT_TRUE(c.Seen(10, "Dlate"));
  EXPECT_EQ(c.routes(), 0u);
  c.Accepted(10);
  EXPECT_FALSE(c.Seen(10, "Dnext"));  // a new connection on the descriptor is live
}

TEST(ClientConnectionsTest, ALostDisconnectEventIsCaughtUpByTheNextAcceptOnTheDescriptor) {
  ClientConnections c;
  c.Accepted(10);
  c.Seen(10, "Da");
  EXPECT_THAT(c.Accepted(10), ElementsAre("Da"));
  EXPECT_EQ(c.routes(), 0u);
}

TEST(ClientConnectionsTest, UnknownDescriptorsAreNotTracked) {
  ClientConnections c;
  EXPECT_FALSE(c.Seen(-1, "Dinproc"));
  EXPECT_EQ(c.routes(), 0u);
  EXPECT_THAT(c.Disconnected(-1), IsEmpty());
}

}  // namespace
}  // namespace kiln::coordinator
