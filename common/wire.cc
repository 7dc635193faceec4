#include "common/wire.h"

#include "absl/strings/str_cat.h"

namespace kiln {

std::string Encode(kiln::v1::Envelope env) {
  env.set_protocol_version(kProtocolVersion);
  return env.SerializeAsString();
}

absl::StatusOr<kiln::v1::Envelope> Decode(std::string_view frame) {
  kiln::v1::Envelope env;
  if (!env.ParseFromArray(frame.data(), static_cast<int>(frame.size()))) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed message: ", frame.size(), " bytes that are not a kiln Envelope"));
  }
  if (env.protocol_version() != kProtocolVersion) {
    return absl::FailedPreconditionError(absl::StrCat("protocol version ", env.protocol_version(),
                                                      " is not supported (this peer speaks ",
                                                      kProtocolVersion, ")"));
  }
  if (env.body_case() == kiln::v1::Envelope::BODY_NOT_SET) {
    return absl::InvalidArgumentError("message has no body (unknown or missing message type)");
  }
  return env;
}

kiln::v1::Envelope ErrorEnvelope(const absl::Status& status, const std::string& request_id,
                                 const std::string& field) {
  kiln::v1::Envelope env;
  env.set_protocol_version(kProtocolVersion);
  env.set_request_id(request_id);
  auto* e = env.mutable_error();
  e->set_code(StatusCodeName(status.code()));
  e->set_field(field);
  e->set_message(std::string(status.message()));
  return env;
}

std::string StatusCodeName(absl::StatusCode code) {
  std::string s = absl::StatusCodeToString(code);  // e.g. "INVALID_ARGUMENT"
  return s.empty() ? "UNKNOWN" : s;
}

absl::StatusCode StatusCodeFromName(const std::string& name) {
  for (int c = 0; c <= 16; ++c) {
    auto code = static_cast<absl::StatusCode>(c);
    if (absl::StatusCodeToString(code) == name) return code;
  }
  return absl::StatusCode::kUnknown;
}

}  // namespace kiln
