// MetricsServer over real loopback HTTP: /metrics in the Prometheus text format (with
// kiln_build_info), /healthz, /readyz following the readiness callback, routes added with
// Handle() (exact and folder matches, longest wins), 404s, and a throwing handler answered 500.
#include "metrics/metrics_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <stdexcept>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/counter.h"

namespace kiln::metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

// Static TLS as large as a CUDA LibTorch brings into kiln-node (libtorch_cuda and the CUDA
// libraries linked at load time): glibc places it inside every thread's stack, so a thread made
// with a smaller stack cannot start. Debian's civetweb asks for 100 KiB stacks; on the GPU host
// every kiln-node failed to start its metrics server ("Cannot create threads").
[[gnu::used]] thread_local char tls_ballast[512 * 1024];

TEST(MetricsServerTest, StartsInAProcessWithLargeStaticTls) {
  volatile char* ballast = tls_ballast;  // keeps the ballast in the binary
  ballast[0] = 1;
  EXPECT_EQ(ballast[0], 1);
  auto s = MetricsServer::Start("127.0.0.1:0");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_NE((*s)->port(), 0);
}

// A plain HTTP/1.0 GET over loopback; returns the whole response (status line, headers, body).
// The server answers in the request's protocol version.
std::string Get(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "connect failed";
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";
  (void)!write(fd, req.data(), req.size());
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

std::string Body(const std::string& response) {
  const size_t at = response.find("\r\n\r\n");
  return at == std::string::npos ? "" : response.substr(at + 4);
}

TEST(MetricsServerTest, ServesMetricsHealthAndBuildInfo) {
  auto server = MetricsServer::Start("127.0.0.1:0");
  ASSERT_TRUE(server.ok()) << server.status();
  MetricsServer& s = **server;
  EXPECT_GT(s.port(), 0);
  EXPECT_EQ(s.url(), "http://127.0.0.1:" + std::to_string(s.port()) + "/metrics");
  prometheus::BuildCounter().Name("kiln_test_things_total").Help("things").Register(s.registry())
      .Add({{"kind", "a"}})
      .Increment(3);

  const std::string metrics = Get(s.port(), "/metrics");
  EXPECT_THAT(metrics, StartsWith("HTTP/1.0 200"));
  EXPECT_THAT(metrics, HasSubstr("Content-Type: text/plain; version=0.0.4"));
  EXPECT_THAT(Body(metrics), HasSubstr("kiln_test_things_total{kind=\"a\"} 3"));
  EXPECT_THAT(Body(metrics), HasSubstr("# TYPE kiln_build_info gauge"));
  EXPECT_THAT(Body(metrics), HasSubstr("git_commit=\"" + ThisBuild().git_commit + "\""));
  EXPECT_FALSE(ThisBuild().torch.empty());

  const std::string health = Get(s.port(), "/healthz");
  EXPECT_THAT(health, StartsWith("HTTP/1.0 200"));
  EXPECT_EQ(Body(health), "ok\n");
  // No readiness callback: ready.
  EXPECT_THAT(Get(s.port(), "/readyz"), StartsWith("HTTP/1.0 200"));
  EXPECT_THAT(Get(s.port(), "/nothing-here"), StartsWith("HTTP/1.0 404"));
}

TEST(MetricsServerTest, ReadyzFollowsTheCallback) {
  auto server = MetricsServer::Start("127.0.0.1:0");
  ASSERT_TRUE(server.ok());
  MetricsServer& s = **server;
  std::atomic<bool> ready{false};
  s.SetReadiness([&ready]() -> absl::Status {
    if (ready) return absl::OkStatus();
    return absl::UnavailableError("not registered yet");
  });
  std::string r = Get(s.port(), "/readyz");
  EXPECT_THAT(r, StartsWith("HTTP/1.0 503"));
  EXPECT_EQ(Body(r), "not ready: not registered yet\n");
  EXPECT_THAT(Get(s.port(), "/healthz"), StartsWith("HTTP/1.0 200"));  // alive all the same
  ready = true;
  r = Get(s.port(), "/readyz");
  EXPECT_THAT(r, StartsWith("HTTP/1.0 200"));
  EXPECT_EQ(Body(r), "ready\n");
  s.SetReadiness(nullptr);
  EXPECT_THAT(Get(s.port(), "/readyz"), StartsWith("HTTP/1.0 200"));
}

TEST(MetricsServerTest, RoutesMatchExactlyOrByFolderLongestFirst) {
  auto server = MetricsServer::Start("127.0.0.1:0");
  ASSERT_TRUE(server.ok());
  MetricsServer& s = **server;
  s.Handle("/sd", [](const std::string&, const std::string&) {
    return HttpResponse{200, "application/json", "[]"};
  });
  s.Handle("/status/", [](const std::string& path, const std::string& query) {
    return HttpResponse{200, "text/plain", "status:" + path + "?" + query};
  });
  s.Handle("/status/jobs/", [](const std::string& path, const std::string&) {
    return HttpResponse{200, "image/png", "png:" + path};
  });
  s.Handle("/boom", [](const std::string&, const std::string&) -> HttpResponse {
    throw std::runtime_error("handler bug");
  });
  const std::string sd = Get(s.port(), "/sd");
  EXPECT_THAT(sd, HasSubstr("Content-Type: application/json"));
  EXPECT_EQ(Body(sd), "[]");
  EXPECT_THAT(Get(s.port(), "/sd/more"), StartsWith("HTTP/1.0 404"));  // exact route only
  EXPECT_EQ(Body(Get(s.port(), "/status/api?x=1")), "status:/status/api?x=1");
  EXPECT_EQ(Body(Get(s.port(), "/status/jobs/j1.png")), "png:/status/jobs/j1.png");
  EXPECT_THAT(Get(s.port(), "/boom"), StartsWith("HTTP/1.0 500"));
  EXPECT_THAT(Get(s.port(), "/metrics"), StartsWith("HTTP/1.0 200"));  // built-ins still win
  // Cross-origin reads are allowed (the coordinator's status page reads nodes' /metrics).
  EXPECT_THAT(Get(s.port(), "/metrics"), HasSubstr("Access-Control-Allow-Origin: *"));
}

TEST(MetricsServerTest, BadAddressesAreErrors) {
  EXPECT_EQ(MetricsServer::Start("no-port").status().code(), absl::StatusCode::kInvalidArgument);
  auto first = MetricsServer::Start("127.0.0.1:0");
  ASSERT_TRUE(first.ok());
  auto second = MetricsServer::Start("127.0.0.1:" + std::to_string((*first)->port()));
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  // The error names civetweb's own reason (CivetServer's exception alone says only "null
  // context"): the port and the socket error.
  EXPECT_THAT(second.status().message(), HasSubstr(std::to_string((*first)->port())));
  EXPECT_THAT(second.status().message(), HasSubstr("(civetweb)"));
  EXPECT_THAT(second.status().message(), Not(HasSubstr("null context")));
  // An address this machine does not have (TEST-NET-1) is named the same way.
  auto bad_host = MetricsServer::Start("192.0.2.1:0");
  ASSERT_FALSE(bad_host.ok());
  EXPECT_THAT(bad_host.status().message(), HasSubstr("(civetweb)"));
}

}  // namespace
}  // namespace kiln::metrics
