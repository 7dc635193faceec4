// Advertise addresses: what a process tells others to connect to when it binds every interface
// (0.0.0.0) or a port chosen by the kernel. Used by kiln-coordinator (its endpoints file and
// logged endpoints) and kiln-node (the metrics URL it registers with), each given
// `--advertise HOST`. Pure string functions; thread-safe.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kiln {

// InvalidArgument (naming `field`) unless `host` is empty (nothing to advertise), a hostname or an
// IPv4 address: letters, digits, '.', '-' and '_' only, no scheme, port or path.
absl::Status ValidateAdvertiseHost(absl::string_view host, absl::string_view field);

// `address` ("tcp://0.0.0.0:5555", "http://127.0.0.1:9400/metrics") with its host replaced by
// `host`: "tcp://10.0.0.1:5555", "http://10.0.0.1:9400/metrics". `address` is returned unchanged
// when `host` is empty or it has no "scheme://host:port" form.
std::string WithHost(absl::string_view address, absl::string_view host);

}  // namespace kiln
