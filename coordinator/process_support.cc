#include "coordinator/process_support.h"

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "nlohmann/json.hpp"

namespace kiln::coordinator {

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
