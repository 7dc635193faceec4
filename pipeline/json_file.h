// Reading the JSON files of a model repository (component configs, tokenizer files). The one JSON
// file reader of the pipeline: every caller gets the same error codes and messages.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kiln::pipeline {

// Parses the file at `path`. NotFound ("<path>: cannot open") if it cannot be opened,
// InvalidArgument ("<path>: not valid JSON") if it does not parse.
absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path);

// ReadJsonFile, and InvalidArgument ("<path>: not a JSON object") unless the document is an
// object.
absl::StatusOr<nlohmann::json> ReadJsonObject(const std::string& path);

}  // namespace kiln::pipeline
