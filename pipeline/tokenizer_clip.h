// CLIP tokenizer (Flux's tokenizer): byte-level BPE with CLIP's end-of-word suffix, matching
// transformers' CLIPTokenizer id for id. In transformers 5 that class is the HF `tokenizers`
// pipeline (the former CLIPTokenizerFast; there is no ftfy / BasicTokenizer path any more):
//
//   1. added tokens whose config says normalized: false are cut out of the raw text;
//   2. normalization: NFC, every run of White_Space becomes one " ", lower case (full Unicode
//      mappings, code point by code point: U+0130 -> "i\u0307", final sigma not special);
//   3. added tokens with normalized: true (Flux's <|startoftext|>, <|endoftext|>) are cut out of
//      the normalized text, so "<|ENDOFTEXT|>" is the end token too;
//   4. pre-tokenization: the matches of
//   <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
//      (everything else, i.e. whitespace, dropped), each mapped byte by byte to CLIP's printable
//      byte alphabet;
//   5. BPE on each piece, "</w>" appended to its last symbol, lowest-rank merge first (leftmost
//      on ties), results cached per piece;
//   6. <|startoftext|> + the first max_length - 2 ids + <|endoftext|>, padded with pad_token's
//      id to max_length: tokenizer(prompt, padding="max_length", max_length=77, truncation=True).
//      Flux's pad_token is <|endoftext|>.
//
// Files read from the folder: vocab.json, merges.txt, tokenizer_config.json.
//
// Threads: Encode may be called from any thread (the piece cache has its own lock).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "pipeline/tokenizer_common.h"

namespace kiln::pipeline {

class ClipTokenizer {
 public:
  static constexpr int kDefaultMaxLength = 77;  // CLIP's context (model_max_length)

  // Loads `dir`/vocab.json, merges.txt and tokenizer_config.json. NotFound for a missing file,
  // InvalidArgument for a malformed one (the message names the file and, for merges, the line).
  static absl::StatusOr<std::unique_ptr<ClipTokenizer>> Load(const std::string& dir);

  // Ids of `utf8`, exactly max_length long (see the file comment). InvalidArgument if `utf8` is
  // not valid UTF-8 (the message names the byte offset) or max_length < 2.
  absl::StatusOr<TokenizeResult> Encode(std::string_view utf8,
                                        int max_length = kDefaultMaxLength) const;

  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }
  int64_t vocab_size() const { return static_cast<int64_t>(vocab_.size()); }

 private:
  ClipTokenizer() = default;

  // Appends the BPE ids of one pre-token (its UTF-8 bytes).
  void AppendBpeIds(std::string_view piece, std::vector<int64_t>* ids) const;
  std::vector<int64_t> Bpe(std::string_view piece) const;

  std::unordered_map<std::string, int64_t> vocab_;
  // (left id << 32 | right id) -> (rank, merged id)
  std::unordered_map<uint64_t, std::pair<int, int64_t>> merges_;
  std::array<std::string, 256> byte_symbols_;  // byte -> UTF-8 of its stand-in character
  std::vector<AddedToken> raw_added_;          // matched in the raw text
  std::vector<AddedToken> normalized_added_;   // matched in the normalized text
  int64_t bos_id_ = 0;
  int64_t eos_id_ = 0;
  int64_t pad_id_ = 0;
  int64_t unk_id_ = 0;

  static constexpr size_t kMaxCachedPieces = 1 << 14;
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_ ABSL_GUARDED_BY(cache_mu_);
};

}  // namespace kiln::pipeline
