// ClientConnections: which client connections of the coordinator's client ROUTER have gone away,
// and which reply routes (ReplyTo::peer) were theirs, so that CoordinatorServer can drop the
// pending Waits nobody can receive any more (Coordinator::DropWaitsOf). Socket-free: the server
// feeds it the socket monitor's ACCEPTED / DISCONNECTED events (zmq_socket_monitor; both carry
// the connection's file descriptor) and each message's source descriptor (ZMQ_SRCFD).
//
// File descriptors are reused by the OS as soon as a connection closes, and a client may come
// back with the same routing id (a fixed ZMQ_ROUTING_ID), so a route belongs to the connection it
// was last seen on: a disconnect gives back only the routes whose last connection it was, and a
// route seen again on a new connection is not dropped with its old one. This relies on the order
// libzmq's I/O thread keeps (a connection's DISCONNECTED event is queued before its descriptor
// is closed, hence before any later connection on the same descriptor is accepted and its
// messages are queued), which holds when the server reads the monitor's events after receiving
// each message and before handling it (CoordinatorServer does). The one case it cannot tell
// apart: a message read after its connection closed *and* a new connection took its descriptor
// is attributed to the new connection, so its waits stay until that one closes (or they time
// out: the server caps Wait timeouts).
//
// Thread-compatible: the server's poll thread owns it.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

namespace kiln::coordinator {

class ClientConnections {
 public:
  // A message for route `peer` came in on descriptor `fd` (negative: unknown, e.g. inproc; not
  // tracked). True when that connection has already closed (its DISCONNECTED event was read
  // before the message): the caller drops the route's waits once it has handled the message.
  bool Seen(int fd, const std::string& peer);
  // A connection was accepted on `fd` (ZMQ_EVENT_ACCEPTED). Returns the routes still recorded on
  // `fd` (none, unless the previous connection's DISCONNECTED event was lost): they are gone too.
  std::vector<std::string> Accepted(int fd);
  // The connection on `fd` closed (ZMQ_EVENT_DISCONNECTED): the routes last seen on it, whose
  // waits nobody can receive any more. They are forgotten.
  std::vector<std::string> Disconnected(int fd);

  size_t routes() const { return fd_of_.size(); }  // routes of open connections (tests, bounds)

 private:
  // The routes whose last connection was `fd`, removed from both maps.
  std::vector<std::string> Forget(int fd);

  std::map<std::string, int> fd_of_;               // route → descriptor it was last seen on
  std::map<int, std::set<std::string>> routes_on_;  // descriptor → routes seen on it
  std::set<int> closed_;                           // descriptors disconnected, not accepted since
};

}  // namespace kiln::coordinator
