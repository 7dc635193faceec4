#include "common/advertise.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace kiln {

absl::Status ValidateAdvertiseHost(absl::string_view host, absl::string_view field) {
  for (const char c : host) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-' && c != '_') {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": '", host, "' is not a hostname or IPv4 address"));
    }
  }
  return absl::OkStatus();
}

std::string WithHost(absl::string_view address, absl::string_view host) {
  if (host.empty()) return std::string(address);
  const size_t scheme = address.find("://");
  if (scheme == absl::string_view::npos) return std::string(address);
  const size_t host_start = scheme + 3;
  const size_t path = address.find('/', host_start);
  const absl::string_view authority = address.substr(
      host_start, path == absl::string_view::npos ? absl::string_view::npos : path - host_start);
  const size_t colon = authority.rfind(':');
  if (colon == absl::string_view::npos) return std::string(address);
  return absl::StrCat(address.substr(0, host_start), host, authority.substr(colon),
                      path == absl::string_view::npos ? "" : address.substr(path));
}

}  // namespace kiln
