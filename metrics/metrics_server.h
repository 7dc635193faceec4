// Serves a process's HTTP observability endpoints on one port (civetweb, the web server that
// prometheus-cpp's own exposer is built on):
//   /metrics   the Prometheus text exposition of the Registry this owns
//   /healthz   200 "ok" while the process serves HTTP at all (liveness)
//   /readyz    200 "ready" when the readiness callback returns OK (or none is set), else 503 with
//              the callback's message (readiness: take traffic / jobs or not)
//   any path a component adds with Handle() (the coordinator's status page and service discovery)
// Components create their metric families from registry(), passed to them by reference (no
// global registry). Start() binds at once, so a port conflict is an error here, not later; port 0
// picks a free port (tests, local clusters), reported by port(). Every process also gets
// kiln_build_info{version,git_commit,torch,cuda} = 1 in its registry.
//
// Threads: civetweb's worker threads call the handlers and the readiness callback concurrently;
// they must be thread-safe. Handle() and SetReadiness() may be called at any time from any thread.
// The destructor stops the web server (joining its threads) before anything else is destroyed.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/registry.h"

class CivetServer;

namespace kiln::metrics {

// One HTTP answer from a handler.
struct HttpResponse {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};

// `path` is the request path ("/status/jobs/j1.png"), `query` the raw query string ("" if none).
using HttpHandler = std::function<HttpResponse(const std::string& path, const std::string& query)>;

class MetricsServer {
 public:
  // `bind` is "HOST:PORT", e.g. "127.0.0.1:0" or "0.0.0.0:9400". InvalidArgument for a malformed
  // address, Unavailable when it cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& bind);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  prometheus::Registry& registry() { return *registry_; }
  int port() const { return port_; }
  // "http://HOST:PORT/metrics" (HOST 127.0.0.1 when bound to 0.0.0.0).
  std::string url() const { return url_; }
  // "http://HOST:PORT" (no trailing slash).
  std::string base_url() const { return base_url_; }

  // /readyz answers 200 when `ready` returns OK, else 503 with its message. Null: always ready.
  void SetReadiness(std::function<absl::Status()> ready);

  // Serves GET requests for `path` exactly, or for every path under it when `path` ends in '/'
  // ("/status/" serves "/status/" and "/status/jobs/x.png"). The longest match wins. Replaces an
  // earlier handler for the same path.
  void Handle(const std::string& path, HttpHandler handler);

  // What the routes answer, without a socket (tests; also what the web server calls).
  HttpResponse Serve(const std::string& path, const std::string& query);

 private:
  class Dispatcher;
  MetricsServer() = default;

  std::shared_ptr<prometheus::Registry> registry_;
  int port_ = 0;
  std::string url_;
  std::string base_url_;

  absl::Mutex mu_;
  std::function<absl::Status()> ready_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, HttpHandler> handlers_ ABSL_GUARDED_BY(mu_);

  // Declared last: destroyed (threads joined) first.
  std::unique_ptr<Dispatcher> dispatcher_;
  std::unique_ptr<CivetServer> server_;
};

// Histogram buckets for durations in seconds, from 1 ms to ~30 min.
std::vector<double> DurationBuckets();

// What kiln_build_info reports: the kiln version, the git commit the build was configured from,
// and the torch / CUDA versions of the toolchain the tree builds with ("" when none).
struct BuildInfo {
  std::string version;
  std::string git_commit;
  std::string torch;
  std::string cuda;
};
const BuildInfo& ThisBuild();

}  // namespace kiln::metrics
