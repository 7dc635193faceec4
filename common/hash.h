// SHA-256 helpers (libsodium) and canonical JSON, shared by the artifact key, the package store
// and the pipeline. Canonical JSON = keys sorted, no whitespace, UTF-8 as is; it is byte-identical
// to Python's json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) for the
// values kiln hashes (objects, strings, integers, booleans, null and doubles). Doubles are written
// as Python's float repr writes them: shortest round-trip digits, fixed notation for decimal
// exponents -4..15 (0.0001 -> "0.0001", 1e-05 -> "1e-05", 1e15 -> "1000000000000000.0"),
// NaN/Infinity as json.dumps writes them. Limits: integers beyond 64 bits parse as doubles in
// nlohmann (Python keeps them exact); invalid UTF-8 in a string throws nlohmann::json::type_error.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kiln {

// Lower-case hex SHA-256 of `data`.
std::string Sha256Hex(std::string_view data);

// Lower-case hex SHA-256 of a file's contents, streamed. NotFound / Internal on I/O errors.
absl::StatusOr<std::string> Sha256File(const std::string& path);

// Canonical JSON text of `value` (see file comment).
std::string CanonicalJson(const nlohmann::json& value);

}  // namespace kiln
