// Small process-level helpers for kiln-coordinator's main: the stderr event log and the
// endpoints file that `kiln up` reads. Kept here (not in apps/) so they are tested.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "coordinator/coordinator.h"

namespace kiln::coordinator {

// An EventLog writing "<program>: <UTC time> <line>" to stderr, one whole line per write.
// Thread-safe.
EventLog StderrLog(std::string program);

struct EndpointsFile {
  std::string client_endpoint;  // e.g. "tcp://127.0.0.1:41234"
  std::string node_endpoint;
  std::string metrics_url;      // e.g. "http://127.0.0.1:9400/metrics"
  int pid = 0;
};

// Writes {"client_endpoint": ..., "node_endpoint": ..., "metrics_url": ..., "pid": N} to `path`
// atomically: a temporary file in the same directory, fsync, rename. A reader sees either the
// old file or the whole new one. Unavailable (with errno's text) when it cannot be written.
absl::Status WriteEndpointsFile(const std::string& path, const EndpointsFile& endpoints);

}  // namespace kiln::coordinator
