#include "pipeline/tokenizer_clip.h"

#include <fstream>
#include <queue>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "pipeline/json_file.h"
#include "pipeline/tokenizer_unicode.h"

namespace kiln::pipeline {
namespace {

constexpr std::string_view kEndOfWord = "</w>";
constexpr std::u32string_view kContractions[] = {U"'s", U"'t", U"'re", U"'ve",
                                                 U"'m", U"'ll", U"'d"};
constexpr std::u32string_view kSpecialPieces[] = {U"<|startoftext|>", U"<|endoftext|>"};

// CLIP's (GPT-2's) byte -> printable code point map.
std::array<char32_t, 256> ByteToUnicode() {
  std::array<char32_t, 256> map{};
  std::array<bool, 256> printable{};
  for (int b = '!'; b <= '~'; ++b) printable[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
  int next = 256;
  for (int b = 0; b < 256; ++b) map[b] = printable[b] ? b : next++;
  return map;
}

// Normalization: NFC, runs of White_Space -> " ", lower case.
std::u32string Normalize(std::u32string_view text) {
  const std::u32string nfc = unicode::Nfc(text);
  std::u32string out;
  out.reserve(nfc.size());
  bool in_space = false;
  for (char32_t c : nfc) {
    if (unicode::IsWhiteSpace(c)) {
      if (!in_space) out.push_back(U' ');
      in_space = true;
      continue;
    }
    in_space = false;
    unicode::AppendLowercase(c, &out);
  }
  return out;
}

bool StartsWithAt(std::u32string_view text, size_t pos, std::u32string_view prefix) {
  return text.substr(pos, prefix.size()) == prefix;
}

// The matches of CLIP's split pattern, in order (see tokenizer_clip.h).
std::vector<std::u32string_view> PreTokenize(std::u32string_view text) {
  std::vector<std::u32string_view> out;
  size_t i = 0;
  auto other = [](char32_t c) {
    return !unicode::IsWhiteSpace(c) && !unicode::IsLetter(c) && !unicode::IsNumber(c);
  };
  while (i < text.size()) {
    size_t len = 0;
    for (std::u32string_view s : kSpecialPieces) {
      if (len == 0 && StartsWithAt(text, i, s)) len = s.size();
    }
    if (len == 0 && text[i] == U'\'') {
      for (std::u32string_view s : kContractions) {
        if (len == 0 && StartsWithAt(text, i, s)) len = s.size();
      }
    }
    if (len == 0) {
      const char32_t c = text[i];
      if (unicode::IsLetter(c)) {
        while (i + len < text.size() && unicode::IsLetter(text[i + len])) ++len;
      } else if (unicode::IsNumber(c)) {
        len = 1;
      } else if (other(c)) {
        while (i + len < text.size() && other(text[i + len])) ++len;
      } else {  // whitespace: not part of any piece
        ++i;
        continue;
      }
    }
    out.push_back(text.substr(i, len));
    i += len;
  }
  return out;
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

absl::StatusOr<std::unique_ptr<ClipTokenizer>> ClipTokenizer::Load(const std::string& dir) {
  const std::string vocab_path = dir + "/vocab.json";
  const std::string merges_path = dir + "/merges.txt";
  const std::string config_path = dir + "/tokenizer_config.json";
  auto vocab = ReadJsonFile(vocab_path);
  if (!vocab.ok()) return vocab.status();
  auto merges = ReadTextFile(merges_path);
  if (!merges.ok()) return merges.status();
  auto config = ReadJsonFile(config_path);
  if (!config.ok()) return config.status();

  auto tok = std::unique_ptr<ClipTokenizer>(new ClipTokenizer());
  if (!vocab->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(vocab_path, ": not a token -> id object"));
  }
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(vocab_path, ": id of '", token, "' is not a non-negative integer"));
    }
    tok->vocab_.emplace(token, id.get<int64_t>());
  }

  const std::string_view text = *merges;
  int line_no = 0, rank = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || (line_no == 1 && line.substr(0, 8) == "#version")) continue;
    const size_t space = line.find(' ');
    if (space == std::string_view::npos || line.find(' ', space + 1) != std::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(merges_path, ":", line_no, ": not two space-separated symbols"));
    }
    const std::string a(line.substr(0, space)), b(line.substr(space + 1));
    const auto ia = tok->vocab_.find(a), ib = tok->vocab_.find(b), iab = tok->vocab_.find(a + b);
    if (ia == tok->vocab_.end() || ib == tok->vocab_.end() || iab == tok->vocab_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(merges_path, ":", line_no, ": merge of symbols not in vocab.json"));
    }
    const uint64_t key =
        static_cast<uint64_t>(ia->second) << 32 | static_cast<uint64_t>(ib->second);
    tok->merges_.emplace(key, std::make_pair(rank++, iab->second));
  }

  const std::array<char32_t, 256> byte_map = ByteToUnicode();
  for (int b = 0; b < 256; ++b) unicode::AppendUtf8(byte_map[b], &tok->byte_symbols_[b]);

  const nlohmann::json& cfg = *config;
  auto id_of = [&](const std::string& field, const char* fallback) -> absl::StatusOr<int64_t> {
    const std::string content = TokenContent(cfg, field).value_or(fallback);
    const auto it = tok->vocab_.find(content);
    if (it == tok->vocab_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(config_path, ": ", field, " '", content, "' is not in vocab.json"));
    }
    return it->second;
  };
  auto bos = id_of("bos_token", "<|startoftext|>");
  auto eos = id_of("eos_token", "<|endoftext|>");
  auto pad = id_of("pad_token", "<|endoftext|>");
  auto unk = id_of("unk_token", "<|endoftext|>");
  for (const auto* s : {&bos, &eos, &pad, &unk}) {
    if (!s->ok()) return s->status();
  }
  tok->bos_id_ = *bos;
  tok->eos_id_ = *eos;
  tok->pad_id_ = *pad;
  tok->unk_id_ = *unk;

  // Added tokens: added_tokens_decoder when present, else bos and eos, normalized as Flux's.
  std::vector<AddedToken> added;
  if (cfg.contains("added_tokens_decoder") && cfg["added_tokens_decoder"].is_object()) {
    for (const auto& [key, value] : cfg["added_tokens_decoder"].items()) {
      if (!value.is_object() || !value.contains("content") || !value["content"].is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(config_path, ": added_tokens_decoder[", key, "] has no content"));
      }
      AddedToken t;
      t.content = value["content"].get<std::string>();
      t.normalized = value.contains("normalized") && value["normalized"].is_boolean() &&
                     value["normalized"].get<bool>();
      const absl::StatusOr<int64_t> id = AddedTokenId(config_path, key);
      if (!id.ok()) return id.status();
      t.id = *id;
      added.push_back(std::move(t));
    }
  } else {
    added.push_back({TokenContent(cfg, "bos_token").value_or("<|startoftext|>"), *bos, true});
    added.push_back({TokenContent(cfg, "eos_token").value_or("<|endoftext|>"), *eos, true});
  }
  for (AddedToken& t : added) {
    if (t.normalized) {
      // The pattern is the normalized content (the reference normalizes it too).
      auto cps = unicode::DecodeUtf8(t.content);
      if (!cps.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(config_path, ": ", cps.status().message()));
      }
      t.content = unicode::EncodeUtf8(Normalize(*cps));
      tok->normalized_added_.push_back(std::move(t));
    } else {
      tok->raw_added_.push_back(std::move(t));
    }
  }
  return tok;
}

std::vector<int64_t> ClipTokenizer::Bpe(std::string_view piece) const {
  struct Symbol {
    int64_t id;
    int prev, next;
    bool alive;
  };
  std::vector<Symbol> syms;
  syms.reserve(piece.size());
  for (size_t i = 0; i < piece.size(); ++i) {
    std::string s = byte_symbols_[static_cast<unsigned char>(piece[i])];
    if (i + 1 == piece.size()) s += kEndOfWord;
    const auto it = vocab_.find(s);
    syms.push_back({it != vocab_.end() ? it->second : unk_id_, static_cast<int>(i) - 1,
                    i + 1 < piece.size() ? static_cast<int>(i) + 1 : -1, true});
  }
  struct Merge {
    int rank;
    int pos;
    int64_t new_id;
    bool operator>(const Merge& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  auto lookup = [&](int64_t a, int64_t b) -> const std::pair<int, int64_t>* {
    const auto it = merges_.find(static_cast<uint64_t>(a) << 32 | static_cast<uint64_t>(b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  // Lowest rank first, leftmost on ties; stale entries are skipped when popped.
  std::priority_queue<Merge, std::vector<Merge>, std::greater<Merge>> queue;
  for (size_t i = 0; i + 1 < syms.size(); ++i) {
    if (const auto* m = lookup(syms[i].id, syms[i + 1].id)) {
      queue.push({m->first, static_cast<int>(i), m->second});
    }
  }
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Symbol& left = syms[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = syms[left.next];
    const auto* m = lookup(left.id, right.id);
    if (m == nullptr || m->second != top.new_id) continue;
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) syms[right.next].prev = top.pos;
    if (left.prev >= 0) {
      if (const auto* p = lookup(syms[left.prev].id, left.id)) {
        queue.push({p->first, left.prev, p->second});
      }
    }
    if (left.next >= 0) {
      if (const auto* n = lookup(left.id, syms[left.next].id)) {
        queue.push({n->first, top.pos, n->second});
      }
    }
  }
  std::vector<int64_t> ids;
  for (const Symbol& s : syms) {
    if (s.alive) ids.push_back(s.id);
  }
  return ids;
}

void ClipTokenizer::AppendBpeIds(std::string_view piece, std::vector<int64_t>* ids) const {
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (const auto it = cache_.find(std::string(piece)); it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int64_t> result = Bpe(piece);
  ids->insert(ids->end(), result.begin(), result.end());
  std::lock_guard<std::mutex> lock(cache_mu_);
  if (cache_.size() >= kMaxCachedPieces) cache_.clear();
  cache_.emplace(std::string(piece), std::move(result));
}

absl::StatusOr<TokenizeResult> ClipTokenizer::Encode(std::string_view utf8, int max_length) const {
  if (auto decoded = unicode::DecodeUtf8(utf8); !decoded.ok()) return decoded.status();
  std::vector<int64_t> content;
  for (const TextSegment& seg : SplitOnAddedTokens(utf8, raw_added_)) {
    if (seg.added_id) {
      content.push_back(*seg.added_id);
      continue;
    }
    const std::string norm = unicode::EncodeUtf8(Normalize(*unicode::DecodeUtf8(seg.text)));
    for (const TextSegment& part : SplitOnAddedTokens(norm, normalized_added_)) {
      if (part.added_id) {
        content.push_back(*part.added_id);
        continue;
      }
      const std::u32string cps = *unicode::DecodeUtf8(part.text);
      for (std::u32string_view piece : PreTokenize(cps)) {
        AppendBpeIds(unicode::EncodeUtf8(piece), &content);
      }
    }
  }
  return FinishEncoding(content, bos_id_, eos_id_, pad_id_, max_length);
}

}  // namespace kiln::pipeline
