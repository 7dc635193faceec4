// What the CLIP and T5 tokenizers (tokenizer_clip.h, tokenizer_t5.h) share: the result type, the
// split of a text on its added (special) tokens, the fixed-length truncate-and-pad step, and the
// reading of a tokenizer folder's JSON files.
//
// Threads: pure functions; any thread may call them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kiln::pipeline {

// Token ids of one prompt, exactly max_length long, as the reference pipeline builds them:
// [bos] + content tokens (truncated) + eos, then pad ids.
struct TokenizeResult {
  std::vector<int64_t> ids;  // max_length ids, the model's input_ids row
  int length = 0;            // ids before the padding (special tokens included)
  bool truncated = false;    // content tokens were dropped to fit max_length
  int dropped = 0;           // how many content tokens were dropped (0 unless truncated)
};

// A token of the tokenizer's added vocabulary (special tokens): found in the text before the
// model runs, and given its id directly.
struct AddedToken {
  std::string content;
  int64_t id = 0;
  bool normalized = false;  // matched in the normalized text (true) or in the raw text (false)
};

// A piece of text: either a run of ordinary text (added_id empty) or one added token.
struct TextSegment {
  std::string_view text;
  std::optional<int64_t> added_id;
};

// Splits `text` on the occurrences of `tokens` (leftmost, then longest match first, as the
// reference's Aho-Corasick LeftmostLongest split); empty ordinary runs are left out.
std::vector<TextSegment> SplitOnAddedTokens(std::string_view text,
                                            const std::vector<AddedToken>& tokens);

// Builds the fixed-length row: keeps the first max_length - specials content ids (specials: 1 for
// eos, 2 with a bos), adds bos/eos, pads with pad_id. InvalidArgument if max_length is smaller
// than the number of special tokens.
absl::StatusOr<TokenizeResult> FinishEncoding(const std::vector<int64_t>& content,
                                              std::optional<int64_t> bos_id, int64_t eos_id,
                                              int64_t pad_id, int max_length);

// The id of an added_tokens_decoder key: decimal digits only, 0..kMaxTokenId; nullopt otherwise
// (a negative, huge or "12abc" key once became a negative id or overflowed the vocabulary size;
// a fuzz-target finding, tests/fuzz).
inline constexpr int64_t kMaxTokenId = 2147483647;
std::optional<int64_t> ParseTokenId(std::string_view key);
// ParseTokenId as both loaders use it: InvalidArgument naming the file and the key.
absl::StatusOr<int64_t> AddedTokenId(const std::string& config_path, const std::string& key);

// The content of a special-token field of tokenizer_config.json / special_tokens_map.json, which
// is either a string or an AddedToken object {"content": ...}; nullopt if absent or null.
std::optional<std::string> TokenContent(const nlohmann::json& config, const std::string& field);

}  // namespace kiln::pipeline
