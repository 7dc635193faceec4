// Small process-level helpers for kiln-coordinator's main: the endpoints file that `kiln up`
// reads. Kept here (not in apps/) so they are tested.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "coordinator/coordinator.h"

namespace kiln::coordinator {

struct EndpointsFile {
  std::string client_endpoint;  // e.g. "tcp://127.0.0.1:41234"
  std::string node_endpoint;
  std::string metrics_url;      // e.g. "http://127.0.0.1:9400/metrics"
  int pid = 0;
};

// What the endpoints file and the log advertise: the bound endpoints and metrics URL with
// `advertise` (a host other machines can reach, from --advertise) as their host; without one,
// endpoints bound to every interface (0.0.0.0, *) say 127.0.0.1 (ConnectableEndpoint) and the
// metrics URL stays as the server made it.
EndpointsFile AdvertisedEndpoints(const std::string& client_bound, const std::string& node_bound,
                                  const std::string& metrics_url, const std::string& advertise);

// Writes {"client_endpoint": ..., "node_endpoint": ..., "metrics_url": ..., "pid": N} to `path`
// atomically (kiln::WriteFileAtomically: temporary file, fsync, rename, fsync of the directory).
// A reader sees either the old file or the whole new one. Unavailable (with errno's text) when it
// cannot be written.
absl::Status WriteEndpointsFile(const std::string& path, const EndpointsFile& endpoints);

}  // namespace kiln::coordinator
