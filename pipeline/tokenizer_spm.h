// Reads a SentencePiece model file with the SentencePiece library, for T5Tokenizer
// (tokenizer_t5.h). Kept in a translation unit of its own, free of Abseil: the library's header
// declares its own absl::string_view, which clashes with Abseil's. Errors are therefore plain
// strings here; T5Tokenizer turns them into a Status.
//
// Threads: a pure function; any thread may call it.
#pragma once

#include <string>
#include <vector>

namespace kiln::pipeline {

struct SpmModelData {
  std::vector<std::string> pieces;  // by id
  std::vector<float> scores;        // by id
  std::vector<bool> control;        // by id: a control or the unknown piece
  int unk_id = -1;
  std::string serialized_proto;  // the ModelProto, for the fields the API does not expose
};

// Loads the model at `path` into *out. False with *error set if the library rejects it.
bool ReadSpmModel(const std::string& path, SpmModelData* out, std::string* error);

}  // namespace kiln::pipeline
