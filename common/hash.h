// SHA-256 helpers (libsodium) and canonical JSON, shared by the artifact key, the package store
// and the pipeline. Canonical JSON = keys sorted, no whitespace, UTF-8 as is; it is byte-identical
// to Python's json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) for the
// values kiln hashes (objects, strings, integers, booleans, null and finite doubles).
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
