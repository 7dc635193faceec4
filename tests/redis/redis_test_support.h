// A real redis-server for tests: started on an ephemeral loopback port in a temporary directory
// with AOF on (appendfsync always), killed with SIGKILL and restarted on the same port and data
// to test outages and durability. Tests skip when redis-server is not installed.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "redis/redis_client.h"

namespace kiln::redis::testing {

// A free TCP port on 127.0.0.1 (bound then released; racy only against other binders).
inline int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

inline bool HaveRedisServer() { return std::system("command -v redis-server >/dev/null") == 0; }

class RedisServer {
 public:
  RedisServer() : port_(FreePort()) {
    char tmpl[] = "/tmp/kiln-redis-test-XXXXXX";
    dir_ = mkdtemp(tmpl);
  }
  ~RedisServer() {
    Kill();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // Starts redis-server and waits until it answers PING (up to 10 s). False if it did not.
  bool Start() {
    pid_ = fork();
    if (pid_ == 0) {
      const std::string port = std::to_string(port_);
      execlp("redis-server", "redis-server", "--port", port.c_str(), "--bind", "127.0.0.1",
             "--dir", dir_.c_str(), "--appendonly", "yes", "--appendfsync", "always", "--save",
             "", "--logfile", (dir_ + "/redis.log").c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    RedisOptions o = options();
    o.client_name = "probe";
    auto client = RedisClient::Create(o);
    for (int i = 0; i < 200; ++i) {
      if ((*client)->Ping().ok()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
  // SIGKILL, as a crash; data written so far stays in the AOF.
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  void Stop() { Signal(SIGSTOP); }
  void Continue() { Signal(SIGCONT); }
  void Signal(int sig) {
    if (pid_ > 0) kill(pid_, sig);
  }

  RedisOptions options() const {
    RedisOptions o;
    o.port = port_;
    o.connect_timeout_ms = 500;
    o.command_timeout_ms = 1000;
    o.reconnect_initial_ms = 20;
    o.reconnect_max_ms = 200;
    return o;
  }
  std::string url() const { return absl::StrCat("redis://127.0.0.1:", port_, "/0"); }
  int port() const { return port_; }

 private:
  int port_;
  std::string dir_;
  pid_t pid_ = -1;
};

}  // namespace kiln::redis::testing

#define KILN_REQUIRE_REDIS()                                                  \
  do {                                                                        \
    if (!::kiln::redis::testing::HaveRedisServer()) {                          \
      GTEST_SKIP() << "redis-server is not installed (Debian: redis-server)";  \
    }                                                                         \
  } while (0)
