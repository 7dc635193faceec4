// libFuzzer target: the T5 unigram tokenizer's loader and encoder (pipeline/tokenizer_t5.h,
// tokenizer_spm.h: our own reader of spiece.model's protobuf wire format and of the normalizer's
// double-array charsmap). The input packs three parts separated by "\n--8<--\n" lines:
// spiece.model, tokenizer_config.json, and a prompt; the files are written to an in-memory folder
// (MemDir) and loaded, and the prompt is encoded with the result. Bad files must give NotFound /
// InvalidArgument; an encoding must be max_length ids.
#include <cstdint>
#include <string>
#include <string_view>

#include "pipeline/tokenizer_t5.h"
#include "tests/fuzz/fuzz_support.h"
#include "tests/fuzz/tokenizer_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts =
      kiln::fuzz::SplitFiles(std::string_view(reinterpret_cast<const char*>(data), size), 3);
  static kiln::fuzz::MemDir& dir =
      *new kiln::fuzz::MemDir({"spiece.model", "tokenizer_config.json"});
  dir.Write("spiece.model", parts[0]);
  dir.Write("tokenizer_config.json", parts[1]);
  auto tok = kiln::pipeline::T5Tokenizer::Load(dir.path());
  if (!tok.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(tok.status()) || absl::IsNotFound(tok.status()));
    return 0;
  }
  for (int max_length : {64, 1}) {
    kiln::fuzz::CheckEncoding((*tok)->Encode(parts[2], max_length), max_length, 0);
  }
  return 0;
}
