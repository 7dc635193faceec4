#include "pipeline/tokenizer_t5.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "pipeline/json_file.h"
#include "pipeline/tokenizer_spm.h"
#include "pipeline/tokenizer_unicode.h"

namespace kiln::pipeline {
namespace {

constexpr std::string_view kMetaspace = "\xE2\x96\x81";  // U+2581, SentencePiece's space
constexpr double kUnkPenalty = 10.0;  // unknown char score: min piece score - 10 (as HF's)
constexpr int64_t kMaxExtraIds = 100000;  // sentinel tokens <extra_id_N> a config may ask for
constexpr size_t kWholeGraphemeBytes = 6;  // graphemes shorter than this are looked up whole

// Minimal protobuf wire-format reader: the first length-delimited field `number` of `message`.
std::optional<std::string_view> ProtoBytesField(std::string_view message, uint32_t number) {
  size_t pos = 0;
  auto varint = [&](uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64 && pos < message.size(); shift += 7) {
      const auto b = static_cast<unsigned char>(message[pos++]);
      *v |= uint64_t{b & 0x7Fu} << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  };
  while (pos < message.size()) {
    uint64_t key, len;
    if (!varint(&key)) return std::nullopt;
    switch (key & 7) {
      case 0:  // varint
        if (!varint(&len)) return std::nullopt;
        break;
      case 1:  // fixed64
        pos += 8;
        break;
      case 2:  // length-delimited
        if (!varint(&len) || len > message.size() - pos) return std::nullopt;
        if ((key >> 3) == number) return message.substr(pos, len);
        pos += len;
        break;
      case 5:  // fixed32
        pos += 4;
        break;
      default:
        return std::nullopt;
    }
  }
  return std::nullopt;
}

// Darts-clone double-array unit fields (the charsmap trie's format).
inline bool UnitHasLeaf(uint32_t u) { return (u >> 8) & 1; }
inline uint32_t UnitValue(uint32_t u) { return u & 0x7FFFFFFFu; }
inline uint32_t UnitLabel(uint32_t u) { return u & 0x800000FFu; }
inline uint32_t UnitOffset(uint32_t u) { return (u >> 10) << ((u & (1u << 9)) >> 6); }

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

}  // namespace

absl::StatusOr<std::unique_ptr<T5Tokenizer>> T5Tokenizer::Load(const std::string& dir) {
  const std::string model_path = dir + "/spiece.model";
  if (!std::ifstream(model_path, std::ios::binary)) {
    return absl::NotFoundError(absl::StrCat(model_path, ": cannot open"));
  }
  SpmModelData sp;
  if (std::string error; !ReadSpmModel(model_path, &sp, &error)) {
    return absl::InvalidArgumentError(
        absl::StrCat(model_path, ": not a SentencePiece model: ", error));
  }
  auto config = ReadJsonFile(dir + "/tokenizer_config.json");
  if (!config.ok()) return config.status();

  auto tok = std::unique_ptr<T5Tokenizer>(new T5Tokenizer());
  const int n = static_cast<int>(sp.pieces.size());
  tok->pieces_ = std::move(sp.pieces);
  double min_score = std::numeric_limits<double>::infinity();
  for (float score : sp.scores) {
    tok->scores_.push_back(score);  // the reference adds scores as doubles
    min_score = std::min(min_score, tok->scores_.back());
  }
  for (int id = 0; id < n; ++id) {  // SentencePiece rejects models with duplicated pieces
    tok->piece_ids_.emplace(tok->pieces_[id], id);
    tok->max_piece_bytes_ = std::max(tok->max_piece_bytes_, tok->pieces_[id].size());
  }
  tok->unk_score_ = min_score - kUnkPenalty;
  tok->unk_id_ = sp.unk_id;

  // The normalizer: ModelProto.normalizer_spec (3) .precompiled_charsmap (2) =
  // [uint32 trie bytes, little-endian][trie units][NUL-terminated replacement strings].
  const std::string& proto = sp.serialized_proto;
  if (auto spec = ProtoBytesField(proto, 3)) {
    if (auto charsmap = ProtoBytesField(*spec, 2); charsmap && !charsmap->empty()) {
      uint32_t trie_bytes = 0;
      if (charsmap->size() >= 4) {
        for (int i = 3; i >= 0; --i) {
          trie_bytes = trie_bytes << 8 | static_cast<unsigned char>((*charsmap)[i]);
        }
      }
      if (charsmap->size() < 4 || trie_bytes % 4 != 0 || trie_bytes == 0 ||
          trie_bytes > charsmap->size() - 4) {
        return absl::InvalidArgumentError(absl::StrCat(model_path, ": malformed charsmap"));
      }
      tok->trie_.resize(trie_bytes / 4);
      for (size_t i = 0; i < tok->trie_.size(); ++i) {
        uint32_t u = 0;
        for (int b = 3; b >= 0; --b) {
          u = u << 8 | static_cast<unsigned char>((*charsmap)[4 + 4 * i + b]);
        }
        tok->trie_[i] = u;
      }
      tok->replacements_ = std::string(charsmap->substr(4 + trie_bytes));
      // Replacements go into the normalized text, which must stay UTF-8 (a fuzz-target finding:
      // tests/fuzz/corpus/t5_tokenizer_fuzz/bad_utf8_charsmap): refused here rather than failing
      // every Encode that meets them. ShortestKey also ignores a leaf value pointing into the
      // middle of a character.
      if (!unicode::DecodeUtf8(tok->replacements_).ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(model_path, ": malformed charsmap: replacements are not UTF-8"));
      }
    }
  }

  // Added tokens: added_tokens_decoder when the config has one (transformers writes it), else
  // the model's control/unknown pieces and the extra_ids sentinels (<extra_id_0> is the last id).
  const std::string config_path = dir + "/tokenizer_config.json";
  const nlohmann::json& cfg = *config;
  if (cfg.contains("added_tokens_decoder") && cfg["added_tokens_decoder"].is_object()) {
    for (const auto& [key, value] : cfg["added_tokens_decoder"].items()) {
      AddedToken t;
      const absl::StatusOr<int64_t> id = AddedTokenId(config_path, key);
      if (!id.ok()) return id.status();
      t.id = *id;
      if (!value.is_object() || !value.contains("content") || !value["content"].is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(config_path, ": added_tokens_decoder[", key, "] has no content"));
      }
      t.content = value["content"].get<std::string>();
      t.normalized = value.contains("normalized") && value["normalized"].is_boolean() &&
                     value["normalized"].get<bool>();
      tok->added_.push_back(t);
    }
  } else {
    for (int id = 0; id < n; ++id) {
      if (sp.control[id]) tok->added_.push_back({tok->pieces_[id], id, false});
    }
    const int64_t extra = cfg.contains("extra_ids") && cfg["extra_ids"].is_number_integer()
                              ? cfg["extra_ids"].get<int64_t>()
                              : 100;
    // T5 has 100; a huge count once overflowed the ids (a fuzz-target finding, tests/fuzz).
    if (extra < 0 || extra > kMaxExtraIds) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, ": extra_ids ", extra,
                                                     " is outside 0..", kMaxExtraIds));
    }
    for (int64_t i = 0; i < extra; ++i) {
      tok->added_.push_back({absl::StrCat("<extra_id_", i, ">"), n + extra - 1 - i, false});
    }
  }
  tok->vocab_size_ = n;
  for (AddedToken& t : tok->added_) {
    tok->vocab_size_ = std::max<int64_t>(tok->vocab_size_, t.id + 1);
    if (t.normalized) {
      AddedToken matched = t;
      matched.content = tok->Normalize(t.content);  // the reference normalizes the pattern too
      tok->normalized_added_.push_back(std::move(matched));
    } else {
      tok->raw_added_.push_back(t);
    }
  }

  auto id_of = [&](const std::string& field, const char* fallback) -> std::optional<int64_t> {
    const std::string content = TokenContent(cfg, field).value_or(fallback);
    for (const AddedToken& t : tok->added_) {
      if (t.content == content) return t.id;
    }
    if (auto it = tok->piece_ids_.find(content); it != tok->piece_ids_.end()) return it->second;
    return std::nullopt;
  };
  const auto eos = id_of("eos_token", "</s>");
  const auto pad = id_of("pad_token", "<pad>");
  if (!eos || !pad) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": eos_token or pad_token is not in the vocabulary"));
  }
  tok->eos_id_ = *eos;
  tok->pad_id_ = *pad;
  return tok;
}

const char* T5Tokenizer::ShortestKey(std::string_view bytes) const {
  if (trie_.empty()) return nullptr;
  size_t pos = UnitOffset(trie_[0]);
  for (const char ch : bytes) {
    const auto b = static_cast<unsigned char>(ch);
    pos ^= b;
    if (pos >= trie_.size()) return nullptr;
    const uint32_t unit = trie_[pos];
    if (UnitLabel(unit) != b) return nullptr;
    pos ^= UnitOffset(unit);
    if (UnitHasLeaf(unit)) {
      if (pos >= trie_.size()) return nullptr;
      const uint32_t value = UnitValue(trie_[pos]);
      if (value >= replacements_.size()) return nullptr;
      const auto lead = static_cast<unsigned char>(replacements_[value]);
      return (lead & 0xC0) == 0x80 ? nullptr : replacements_.c_str() + value;
    }
  }
  return nullptr;
}

std::string T5Tokenizer::Normalize(std::string_view text) const {
  if (trie_.empty()) return std::string(text);
  // Byte offset of each code point (the text is valid UTF-8), and its grapheme class.
  std::vector<size_t> starts;
  std::vector<unicode::GraphemeClass> classes;
  for (size_t i = 0; i < text.size();) {
    const size_t len = unicode::Utf8Length(static_cast<unsigned char>(text[i]));
    char32_t c = static_cast<unsigned char>(text[i]) & (len == 1 ? 0x7F : 0xFF >> (len + 1));
    for (size_t k = 1; k < len; ++k) c = c << 6 | (static_cast<unsigned char>(text[i + k]) & 0x3F);
    starts.push_back(i);
    classes.push_back(unicode::GetGraphemeClass(c));
    i += len;
  }
  const size_t n = starts.size();
  starts.push_back(text.size());
  using GC = unicode::GraphemeClass;

  std::string out;
  out.reserve(text.size());
  // The reference: a grapheme under 6 bytes that starts with a charsmap key is replaced whole by
  // the shortest such key's replacement; any other grapheme is mapped code point by code point.
  auto emit = [&](size_t first, size_t last) {  // code points [first, last)
    const std::string_view g = text.substr(starts[first], starts[last] - starts[first]);
    if (g.size() < kWholeGraphemeBytes) {
      if (const char* r = ShortestKey(g)) {
        out += r;
        return;
      }
    }
    for (size_t k = first; k < last; ++k) {
      const std::string_view cp = text.substr(starts[k], starts[k + 1] - starts[k]);
      const char* r = ShortestKey(cp);
      out += r != nullptr ? std::string_view(r) : cp;
    }
  };
  for (size_t i = 0; i < n;) {
    size_t j = i;
    while (j < n && classes[j] == GC::kPrepend) ++j;
    if (j < n && (classes[j] == GC::kControl || classes[j] == GC::kCR || classes[j] == GC::kLF)) {
      if (j > i) emit(i, j);  // prepends end before a control
      const size_t end = classes[j] == GC::kCR && j + 1 < n && classes[j + 1] == GC::kLF ? j + 2
                                                                                         : j + 1;
      emit(j, end);
      i = end;
      continue;
    }
    j = std::min(j + 1, n);
    while (j < n && classes[j] == GC::kExtend) ++j;
    emit(i, j);
    i = j;
  }
  return out;
}

void T5Tokenizer::AppendPieceIds(std::string_view piece, std::vector<int64_t>* ids) const {
  struct Node {
    double score = 0;
    int64_t id = -1;  // -1: not reached yet
    size_t start = 0;
  };
  const size_t n = piece.size();
  std::vector<Node> best(n + 1);
  best[0].id = 0;
  auto relax = [&](size_t start, size_t end, int64_t id, double score) {
    const double candidate = score + best[start].score;
    if (best[end].id < 0 || candidate > best[end].score) best[end] = {candidate, id, start};
  };
  for (size_t start = 0; start < n;) {
    const size_t char_len = unicode::Utf8Length(static_cast<unsigned char>(piece[start]));
    bool single = false;  // a piece covers exactly this character
    for (size_t len = 1; len <= max_piece_bytes_ && start + len <= n; ++len) {
      const auto it = piece_ids_.find(piece.substr(start, len));
      if (it == piece_ids_.end()) continue;
      relax(start, start + len, it->second, scores_[it->second]);
      if (len == char_len) single = true;
    }
    if (!single) relax(start, start + char_len, unk_id_, unk_score_);
    start += char_len;
  }
  // Back from the end; consecutive unknowns fuse into one token (looked up, normally <unk>).
  std::vector<std::pair<std::string_view, int64_t>> tokens;
  size_t fused_end = 0;  // end of the pending run of unknowns; 0: none
  size_t end = n;
  auto flush_unknowns = [&](size_t start) {
    if (fused_end == 0) return;
    const std::string_view s = piece.substr(start, fused_end - start);
    const auto it = piece_ids_.find(s);
    tokens.emplace_back(s, it != piece_ids_.end() ? it->second : unk_id_);
    fused_end = 0;
  };
  size_t fused_start = 0;
  while (end > 0) {
    const Node& node = best[end];
    if (node.id == unk_id_) {
      if (fused_end == 0) fused_end = end;
      fused_start = node.start;
    } else {
      flush_unknowns(fused_start);
      tokens.emplace_back(piece.substr(node.start, end - node.start), node.id);
    }
    end = node.start;
  }
  flush_unknowns(fused_start);
  for (auto it = tokens.rbegin(); it != tokens.rend(); ++it) ids->push_back(it->second);
}

absl::StatusOr<TokenizeResult> T5Tokenizer::Encode(std::string_view utf8, int max_length) const {
  if (auto decoded = unicode::DecodeUtf8(utf8); !decoded.ok()) return decoded.status();
  std::vector<int64_t> content;
  for (const TextSegment& seg : SplitOnAddedTokens(utf8, raw_added_)) {
    if (seg.added_id) {
      content.push_back(*seg.added_id);
      continue;
    }
    const std::string norm = Normalize(seg.text);
    for (const TextSegment& part : SplitOnAddedTokens(norm, normalized_added_)) {
      if (part.added_id) {
        content.push_back(*part.added_id);
        continue;
      }
      // Words: maximal runs without White_Space.
      auto cps = unicode::DecodeUtf8(part.text);
      if (!cps.ok()) return absl::InternalError("T5 charsmap produced text that is not UTF-8");
      std::string word;
      auto flush_word = [&] {
        if (word.empty()) return;
        if (!StartsWith(word, kMetaspace)) word.insert(0, kMetaspace);
        // Cut before every U+2581 (each piece keeps its leading one).
        size_t from = 0;
        while (from < word.size()) {
          size_t next = word.find(kMetaspace, from + kMetaspace.size());
          if (next == std::string::npos) next = word.size();
          AppendPieceIds(std::string_view(word).substr(from, next - from), &content);
          from = next;
        }
        word.clear();
      };
      for (char32_t c : *cps) {
        if (unicode::IsWhiteSpace(c)) {
          flush_word();
        } else {
          unicode::AppendUtf8(c, &word);
        }
      }
      flush_word();
    }
  }
  return FinishEncoding(content, std::nullopt, eos_id_, pad_id_, max_length);
}

}  // namespace kiln::pipeline
