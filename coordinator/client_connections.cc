#include "coordinator/client_connections.h"

namespace kiln::coordinator {

bool ClientConnections::Seen(int fd, const std::string& peer) {
  if (fd < 0) return false;
  if (closed_.count(fd) > 0) return true;
  auto [it, inserted] = fd_of_.emplace(peer, fd);
  if (!inserted && it->second != fd) {
    // The route moved to a new connection (a reconnect with a fixed routing id): the old one no
    // longer speaks for it.
    if (auto old = routes_on_.find(it->second); old != routes_on_.end()) {
      old->second.erase(peer);
      if (old->second.empty()) routes_on_.erase(old);
    }
    it->second = fd;
  }
  routes_on_[fd].insert(peer);
  return false;
}

std::vector<std::string> ClientConnections::Accepted(int fd) {
  if (fd < 0) return {};
  // A new connection on a reused descriptor starts with no routes: the old one's were given back
  // by its Disconnected, which libzmq reports first (Forget also covers a lost event).
  std::vector<std::string> gone = Forget(fd);
  closed_.erase(fd);
  return gone;
}

std::vector<std::string> ClientConnections::Disconnected(int fd) {
  if (fd < 0) return {};
  closed_.insert(fd);
  return Forget(fd);
}

std::vector<std::string> ClientConnections::Forget(int fd) {
  std::vector<std::string> gone;
  auto it = routes_on_.find(fd);
  if (it == routes_on_.end()) return gone;
  for (const std::string& peer : it->second) {
    auto f = fd_of_.find(peer);
    if (f != fd_of_.end() && f->second == fd) {
      gone.push_back(peer);
      fd_of_.erase(f);
    }
  }
  routes_on_.erase(it);
  return gone;
}

}  // namespace kiln::coordinator
