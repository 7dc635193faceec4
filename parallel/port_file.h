// The port file of a launcher that starts a host's ranks as separate processes without knowing
// rank 0's port in advance: rank 0 binds an ephemeral port (GroupOptions.port = 0) and writes it
// from GroupOptions.on_listen with WritePortFile; the other ranks wait for it with
// WaitForPortFile. Used by the tools that run one rank per process (kiln-broadcast-bench,
// kiln-sp-a2a-run) and so by their tests.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kiln::parallel {

// Writes `port` and a newline to `path`, atomically (a reader never sees a partial file).
absl::Status WritePortFile(const std::string& path, int port);

// The port in `path`, polled every 10 ms until it holds a positive number; DeadlineExceeded
// naming the file after `timeout_seconds`.
absl::StatusOr<int> WaitForPortFile(const std::string& path, double timeout_seconds);

}  // namespace kiln::parallel
