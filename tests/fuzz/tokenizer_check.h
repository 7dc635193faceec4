// What every tokenizer target checks of an Encode result (tests/fuzz).
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "pipeline/tokenizer_common.h"
#include "tests/fuzz/fuzz_support.h"

namespace kiln::fuzz {

// `result` of Encode(text, max_length) with a vocabulary of `vocab_size` ids (0: not checked).
inline void CheckEncoding(const absl::StatusOr<pipeline::TokenizeResult>& result, int max_length,
                          int64_t vocab_size) {
  if (!result.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(result.status()));
    return;
  }
  FUZZ_CHECK(result->ids.size() == static_cast<size_t>(max_length));
  FUZZ_CHECK(result->length >= 0 && result->length <= max_length);
  FUZZ_CHECK(result->dropped >= 0);
  FUZZ_CHECK(result->truncated == (result->dropped > 0));
  for (int64_t id : result->ids) {
    FUZZ_CHECK(id >= 0);
    if (vocab_size > 0) FUZZ_CHECK(id < vocab_size);
  }
}

}  // namespace kiln::fuzz
