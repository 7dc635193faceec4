// /metrics keeps answering while idle TCP connections are open (issue 12: two idle connections
// blocked it for 30 s each, civetweb's request timeout, with 4 worker threads).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "metrics/metrics_server.h"

namespace kiln::metrics {
namespace {

int ConnectLoopback(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

std::string Get(int port, const std::string& path) {
  const int fd = ConnectLoopback(port);
  if (fd < 0) return "connect failed";
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";
  (void)!write(fd, req.data(), req.size());
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

TEST(MetricsIdleConnections, MetricsAnswerWhileIdleConnectionsAreOpen) {
  auto server = MetricsServer::Start("127.0.0.1:0");
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  std::vector<int> idle;
  for (int i = 0; i < 8; ++i) {
    const int fd = ConnectLoopback(port);
    ASSERT_GE(fd, 0);
    idle.push_back(fd);  // connected, never sends a request
  }
  for (int round = 0; round < 3; ++round) {
    const auto start = std::chrono::steady_clock::now();
    const std::string response = Get(port, "/metrics");
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_THAT(response, ::testing::StartsWith("HTTP/1.0 200")) << round;
    EXPECT_LT(seconds, 1.0) << "round " << round;
  }
  // Idle connections are closed by the server after its request timeout (2 s), not held.
  char byte;
  timeval tv{6, 0};
  setsockopt(idle[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(read(idle[0], &byte, 1), 0);  // EOF
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
  for (int fd : idle) close(fd);
}

}  // namespace
}  // namespace kiln::metrics
