#include "pipeline/tokenizer_common.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kiln::pipeline {

std::optional<int64_t> ParseTokenId(std::string_view key) {
  if (key.empty() || key.size() > 10) return std::nullopt;
  int64_t id = 0;
  for (const char c : key) {
    if (c < '0' || c > '9') return std::nullopt;
    id = id * 10 + (c - '0');
  }
  if (id > kMaxTokenId) return std::nullopt;
  return id;
}

absl::StatusOr<int64_t> AddedTokenId(const std::string& config_path, const std::string& key) {
  const std::optional<int64_t> id = ParseTokenId(key);
  if (!id) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": added_tokens_decoder key '", key,
                                                   "' is not an id (0..", kMaxTokenId, ")"));
  }
  return *id;
}

std::vector<TextSegment> SplitOnAddedTokens(std::string_view text,
                                            const std::vector<AddedToken>& tokens) {
  std::vector<TextSegment> out;
  size_t run_start = 0, pos = 0;
  while (pos < text.size()) {
    const AddedToken* best = nullptr;
    for (const AddedToken& t : tokens) {
      if (!t.content.empty() && text.compare(pos, t.content.size(), t.content) == 0 &&
          (best == nullptr || t.content.size() > best->content.size())) {
        best = &t;
      }
    }
    if (best == nullptr) {
      ++pos;
      continue;
    }
    if (pos > run_start) out.push_back({text.substr(run_start, pos - run_start), std::nullopt});
    out.push_back({text.substr(pos, best->content.size()), best->id});
    pos += best->content.size();
    run_start = pos;
  }
  if (pos > run_start) out.push_back({text.substr(run_start, pos - run_start), std::nullopt});
  return out;
}

absl::StatusOr<TokenizeResult> FinishEncoding(const std::vector<int64_t>& content,
                                              std::optional<int64_t> bos_id, int64_t eos_id,
                                              int64_t pad_id, int max_length) {
  const int specials = bos_id ? 2 : 1;
  if (max_length < specials) {
    return absl::InvalidArgumentError(absl::StrCat("max_length ", max_length,
                                                   " leaves no room for the ", specials,
                                                   " special tokens"));
  }
  const size_t room = static_cast<size_t>(max_length - specials);
  TokenizeResult r;
  r.ids.reserve(max_length);
  if (bos_id) r.ids.push_back(*bos_id);
  const size_t kept = std::min(room, content.size());
  r.ids.insert(r.ids.end(), content.begin(), content.begin() + kept);
  r.ids.push_back(eos_id);
  r.length = static_cast<int>(r.ids.size());
  r.truncated = kept < content.size();
  r.dropped = static_cast<int>(content.size() - kept);
  r.ids.resize(max_length, pad_id);
  return r;
}

std::optional<std::string> TokenContent(const nlohmann::json& config, const std::string& field) {
  if (!config.is_object() || !config.contains(field)) return std::nullopt;
  const nlohmann::json& v = config[field];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return v["content"].get<std::string>();
  }
  return std::nullopt;
}

}  // namespace kiln::pipeline
