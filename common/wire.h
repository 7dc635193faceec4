// Encoding and decoding of kiln's wire messages (common/proto/kiln.proto). Socket-free: the
// transport adapters (coordinator, node, CLI) move the bytes; this file turns them into checked
// Envelopes. Thread-safe (no state).
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/proto/kiln.pb.h"

namespace kiln {

inline constexpr uint32_t kProtocolVersion = 1;

// Serializes `env`, stamping protocol_version.
std::string Encode(kiln::v1::Envelope env);

// Parses one frame. InvalidArgument for bytes that are not an Envelope (malformed or truncated),
// FailedPrecondition for another protocol_version, InvalidArgument for an Envelope with no body.
absl::StatusOr<kiln::v1::Envelope> Decode(std::string_view frame);

// An Envelope holding ErrorReply{code name of `status`, field, message}, answering `request_id`.
kiln::v1::Envelope ErrorEnvelope(const absl::Status& status, const std::string& request_id,
                                 const std::string& field = "");

// absl::StatusCode ⇄ the upper-case names used in ErrorReply.code ("INVALID_ARGUMENT", ...).
std::string StatusCodeName(absl::StatusCode code);
absl::StatusCode StatusCodeFromName(const std::string& name);

}  // namespace kiln
