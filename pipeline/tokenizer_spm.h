// Reads a SentencePiece model file (spiece.model: a serialized sentencepiece.ModelProto) with a
// small protobuf wire-format reader of our own. kiln encodes with its own unigram implementation
// (tokenizer_t5.cc) and needs only the pieces, their scores and types, and the normalizer bytes,
// so it does not link libsentencepiece (whose Debian build carries its own copy of protobuf and
// clashes with the libprotobuf that the wire protocol uses in the same process).
#pragma once

#include <string>
#include <vector>

namespace kiln::pipeline {

struct SpmModelData {
  std::vector<std::string> pieces;  // by id
  std::vector<float> scores;        // by id
  std::vector<bool> control;        // by id: a control or the unknown piece
  int unk_id = -1;
  std::string serialized_proto;  // the ModelProto, for the fields not extracted here
};

// false with `error` set when the file cannot be read or is not a well-formed model (no pieces,
// a truncated field, no unknown piece, a repeated piece).
bool ReadSpmModel(const std::string& path, SpmModelData* out, std::string* error);

}  // namespace kiln::pipeline
