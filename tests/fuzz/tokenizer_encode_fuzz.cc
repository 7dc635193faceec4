// libFuzzer target: both tokenizers' encoders on untrusted prompts, with the real flux-tiny
// tokenizer files (made by kiln.tokenizer_files into $KILN_FUZZ_DATA/tokenizer and tokenizer_2
// by tests/fuzz/run.sh). The first input byte picks CLIP (even) or T5 (odd) and the max_length;
// the rest is the prompt. Prompts must give max_length ids inside the vocabulary, or
// InvalidArgument (not UTF-8).
#include <cstdint>
#include <memory>
#include <string_view>

#include "pipeline/tokenizer_clip.h"
#include "pipeline/tokenizer_t5.h"
#include "tests/fuzz/fuzz_support.h"
#include "tests/fuzz/tokenizer_check.h"

namespace {
std::unique_ptr<kiln::pipeline::ClipTokenizer> clip;
std::unique_ptr<kiln::pipeline::T5Tokenizer> t5;
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const std::string dir = kiln::fuzz::DataDir();
  auto c = kiln::pipeline::ClipTokenizer::Load(dir + "/tokenizer");
  auto t = kiln::pipeline::T5Tokenizer::Load(dir + "/tokenizer_2");
  if (!c.ok() || !t.ok()) {
    std::fprintf(stderr, "cannot load the tokenizers in %s: %s %s\n", dir.c_str(),
                 c.status().ToString().c_str(), t.status().ToString().c_str());
    std::abort();
  }
  clip = std::move(*c);
  t5 = std::move(*t);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view prompt(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0) {
    const int max_length = data[0] & 2 ? 77 : 8;
    kiln::fuzz::CheckEncoding(clip->Encode(prompt, max_length), max_length, clip->vocab_size());
  } else {
    const int max_length = data[0] & 2 ? 512 : 8;
    kiln::fuzz::CheckEncoding(t5->Encode(prompt, max_length), max_length, t5->vocab_size());
  }
  return 0;
}
