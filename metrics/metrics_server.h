// Serves a process's Prometheus metrics on /metrics (prometheus-cpp's civetweb exposer).
// Components create their metric families from the Registry this owns, passed to them by
// reference (no global registry). Start() binds at once, so a port conflict is an error here, not
// later; port 0 picks a free port (tests, local clusters), reported by port().
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "prometheus/registry.h"

namespace prometheus {
class Exposer;
}

namespace kiln::metrics {

class MetricsServer {
 public:
  // `bind` is "HOST:PORT", e.g. "127.0.0.1:0" or "0.0.0.0:9400".
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& bind);
  ~MetricsServer();

  prometheus::Registry& registry() { return *registry_; }
  int port() const { return port_; }
  // "http://HOST:PORT/metrics"
  std::string url() const { return url_; }

 private:
  MetricsServer() = default;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
  std::string url_;
};

// Histogram buckets for durations in seconds, from 1 ms to ~30 min.
std::vector<double> DurationBuckets();

}  // namespace kiln::metrics
