#include "pipeline/tokenizer_spm.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string_view>
#include <unordered_set>

namespace kiln::pipeline {
namespace {

// ModelProto.pieces = 1; SentencePiece.piece = 1, .score = 2 (float), .type = 3 (enum).
constexpr uint32_t kPiecesField = 1;
constexpr uint32_t kPieceField = 1, kScoreField = 2, kTypeField = 3;
constexpr uint64_t kTypeNormal = 1, kTypeUnknown = 2, kTypeControl = 3;

class WireReader {
 public:
  explicit WireReader(std::string_view data) : data_(data) {}
  bool done() const { return pos_ >= data_.size(); }

  // Next field: its number and wire type; for length-delimited fields `bytes`, for varints
  // `value`, for fixed32 `fixed32`. false on malformed input.
  bool Next(uint32_t* number, uint32_t* wire_type, std::string_view* bytes, uint64_t* value,
            uint32_t* fixed32) {
    uint64_t key;
    if (!Varint(&key)) return false;
    *number = static_cast<uint32_t>(key >> 3);
    *wire_type = static_cast<uint32_t>(key & 7);
    switch (*wire_type) {
      case 0:
        return Varint(value);
      case 1:
        if (data_.size() - pos_ < 8) return false;
        pos_ += 8;
        return true;
      case 2: {
        uint64_t len;
        if (!Varint(&len) || len > data_.size() - pos_) return false;
        *bytes = data_.substr(pos_, len);
        pos_ += len;
        return true;
      }
      case 5:
        if (data_.size() - pos_ < 4) return false;
        *fixed32 = 0;
        for (int i = 3; i >= 0; --i) {
          *fixed32 = *fixed32 << 8 | static_cast<unsigned char>(data_[pos_ + i]);
        }
        pos_ += 4;
        return true;
      default:
        return false;
    }
  }

 private:
  bool Varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64 && pos_ < data_.size(); shift += 7) {
      const auto b = static_cast<unsigned char>(data_[pos_++]);
      *v |= uint64_t{b & 0x7Fu} << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }
  std::string_view data_;
  size_t pos_ = 0;
};

}  // namespace

bool ReadSpmModel(const std::string& path, SpmModelData* out, std::string* error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = "cannot open";
    return false;
  }
  std::stringstream buf;
  buf << in.rdbuf();
  *out = SpmModelData();
  out->serialized_proto = buf.str();
  WireReader model(out->serialized_proto);
  std::unordered_set<std::string_view> seen;
  while (!model.done()) {
    uint32_t number, wire_type, fixed32 = 0;
    std::string_view bytes;
    uint64_t value = 0;
    if (!model.Next(&number, &wire_type, &bytes, &value, &fixed32)) {
      *error = "malformed protobuf (truncated or corrupt ModelProto)";
      return false;
    }
    if (number != kPiecesField || wire_type != 2) continue;
    std::string_view piece;
    float score = 0;
    uint64_t type = kTypeNormal;
    WireReader sp(bytes);
    while (!sp.done()) {
      uint32_t f, wt, f32 = 0;
      std::string_view b;
      uint64_t v = 0;
      if (!sp.Next(&f, &wt, &b, &v, &f32)) {
        *error = "malformed piece " + std::to_string(out->pieces.size());
        return false;
      }
      if (f == kPieceField && wt == 2) piece = b;
      if (f == kScoreField && wt == 5) std::memcpy(&score, &f32, sizeof(score));
      if (f == kTypeField && wt == 0) type = v;
    }
    const int id = static_cast<int>(out->pieces.size());
    out->pieces.emplace_back(piece);
    out->scores.push_back(score);
    out->control.push_back(type == kTypeControl || type == kTypeUnknown);
    if (type == kTypeUnknown && out->unk_id < 0) out->unk_id = id;
  }
  if (out->pieces.empty()) {
    *error = "no pieces";
    return false;
  }
  if (out->unk_id < 0) {
    *error = "no unknown piece";
    return false;
  }
  for (const auto& p : out->pieces) {
    if (!seen.insert(p).second) {
      *error = "piece '" + p + "' appears twice";
      return false;
    }
  }
  return true;
}

}  // namespace kiln::pipeline
