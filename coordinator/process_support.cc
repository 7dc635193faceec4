#include "coordinator/process_support.h"

#include "absl/strings/str_cat.h"
#include "common/advertise.h"
#include "common/files.h"
#include "coordinator/coordinator_server.h"
#include "nlohmann/json.hpp"

namespace kiln::coordinator {

EndpointsFile AdvertisedEndpoints(const std::string& client_bound, const std::string& node_bound,
                                  const std::string& metrics_url, const std::string& advertise) {
  EndpointsFile e;
  if (advertise.empty()) {
    e.client_endpoint = ConnectableEndpoint(client_bound);
    e.node_endpoint = ConnectableEndpoint(node_bound);
    e.metrics_url = metrics_url;
  } else {
    e.client_endpoint = WithHost(client_bound, advertise);
    e.node_endpoint = WithHost(node_bound, advertise);
    e.metrics_url = WithHost(metrics_url, advertise);
  }
  return e;
}

absl::Status WriteEndpointsFile(const std::string& path, const EndpointsFile& e) {
  const nlohmann::json j = {{"client_endpoint", e.client_endpoint},
                            {"node_endpoint", e.node_endpoint},
                            {"metrics_url", e.metrics_url},
                            {"pid", e.pid}};
  if (auto s = kiln::WriteFileAtomically(path, j.dump(2) + "\n"); !s.ok()) {
    return absl::UnavailableError(absl::StrCat("endpoints file: ", s.message()));
  }
  return absl::OkStatus();
}

}  // namespace kiln::coordinator
