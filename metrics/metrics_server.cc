#include "metrics/metrics_server.h"

#include <exception>

#include "absl/strings/str_cat.h"
#include "prometheus/exposer.h"

namespace kiln::metrics {

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& bind) {
  auto colon = bind.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("metrics address '", bind, "': want HOST:PORT"));
  }
  std::unique_ptr<MetricsServer> s(new MetricsServer());
  s->registry_ = std::make_shared<prometheus::Registry>();
  try {
    s->exposer_ = std::make_unique<prometheus::Exposer>(bind);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", bind, ": ", e.what()));
  }
  s->exposer_->RegisterCollectable(s->registry_);
  auto ports = s->exposer_->GetListeningPorts();
  if (ports.empty()) return absl::UnavailableError(absl::StrCat("metrics: not listening on ", bind));
  s->port_ = ports.front();
  std::string host = bind.substr(0, colon);
  if (host == "0.0.0.0" || host.empty()) host = "127.0.0.1";
  s->url_ = absl::StrCat("http://", host, ":", s->port_, "/metrics");
  return s;
}

MetricsServer::~MetricsServer() = default;

std::vector<double> DurationBuckets() {
  return {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800};
}

}  // namespace kiln::metrics
