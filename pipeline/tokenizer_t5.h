// T5 tokenizer (Flux's tokenizer_2): SentencePiece unigram, matching transformers' T5Tokenizer /
// T5TokenizerFast (the HF `tokenizers` Unigram pipeline Flux's pipeline calls) id for id:
//
//   1. added tokens (<pad>, </s>, <unk>, <extra_id_N>, ...) are cut out of the raw text and
//      become their ids;
//   2. each other run is normalized with the model's precompiled charsmap (nmt_nfkc for T5),
//      applied grapheme by grapheme as the reference does;
//   3. split on White_Space; each word gets a leading U+2581 unless it has one, and is cut
//      before every U+2581 (Metaspace, prepend_scheme "always": what `legacy: true` means, and
//      what transformers 5 does whatever `legacy` says);
//   4. each piece is segmented by the unigram Viterbi over the model's pieces and scores;
//      unknown characters cost min score - 10 and consecutive ones fuse into one <unk>;
//   5. the first max_length - 1 ids are kept, </s> appended, <pad> (0) pads to max_length:
//      tokenizer_2(prompt, padding="max_length", max_length=L, truncation=True).
//
// Files read from the folder: spiece.model (through the SentencePiece library: pieces, scores,
// charsmap) and tokenizer_config.json (eos/pad/unk tokens, added_tokens_decoder, extra_ids).
//
// Threads: immutable after Load; Encode may be called from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "pipeline/tokenizer_common.h"

namespace kiln::pipeline {

class T5Tokenizer {
 public:
  // Loads `dir`/spiece.model and `dir`/tokenizer_config.json. NotFound for a missing file,
  // InvalidArgument for a malformed one (the message names the file).
  static absl::StatusOr<std::unique_ptr<T5Tokenizer>> Load(const std::string& dir);

  // Ids of `utf8`, exactly max_length long (see the file comment). InvalidArgument if `utf8` is
  // not valid UTF-8 (the message names the byte offset) or max_length < 1.
  absl::StatusOr<TokenizeResult> Encode(std::string_view utf8, int max_length) const;

  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }
  // Pieces of the model plus the added tokens past them (1100 for 1000 pieces + 100 sentinels);
  // the embedding may be larger (padded).
  int64_t vocab_size() const { return vocab_size_; }

 private:
  T5Tokenizer() = default;

  // HF Precompiled normalizer over the charsmap (no-op when the model has none).
  std::string Normalize(std::string_view text) const;
  // Shortest charsmap key that is a prefix of `bytes`: its replacement, or nullptr.
  const char* ShortestKey(std::string_view bytes) const;
  // Appends the ids of one pre-token (a U+2581-led piece).
  void AppendPieceIds(std::string_view piece, std::vector<int64_t>* ids) const;

  std::vector<std::string> pieces_;
  std::vector<double> scores_;
  std::unordered_map<std::string_view, int64_t> piece_ids_;  // views into pieces_
  size_t max_piece_bytes_ = 0;
  double unk_score_ = 0;
  int64_t unk_id_ = 2;
  int64_t eos_id_ = 1;
  int64_t pad_id_ = 0;
  int64_t vocab_size_ = 0;
  std::vector<AddedToken> added_;             // as configured
  std::vector<AddedToken> raw_added_;         // matched in the raw text
  std::vector<AddedToken> normalized_added_;  // matched in the normalized text
  std::vector<uint32_t> trie_;  // charsmap double array (darts-clone units)
  std::string replacements_;    // charsmap replacement strings, NUL-terminated
};

}  // namespace kiln::pipeline
