// libFuzzer target: the CLIP BPE tokenizer's loader and encoder (pipeline/tokenizer_clip.h) on
// untrusted files. The input packs four parts separated by "\n--8<--\n" lines: vocab.json,
// merges.txt, tokenizer_config.json, and a prompt; the three files are written to an in-memory
// folder (MemDir) and loaded, and the prompt is encoded with the result. Bad files must give
// NotFound / InvalidArgument; an encoding must be max_length ids.
#include <cstdint>
#include <string>
#include <string_view>

#include "pipeline/tokenizer_clip.h"
#include "tests/fuzz/fuzz_support.h"
#include "tests/fuzz/tokenizer_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts =
      kiln::fuzz::SplitFiles(std::string_view(reinterpret_cast<const char*>(data), size), 4);
  static kiln::fuzz::MemDir& dir =
      *new kiln::fuzz::MemDir({"vocab.json", "merges.txt", "tokenizer_config.json"});
  dir.Write("vocab.json", parts[0]);
  dir.Write("merges.txt", parts[1]);
  dir.Write("tokenizer_config.json", parts[2]);
  auto tok = kiln::pipeline::ClipTokenizer::Load(dir.path());
  if (!tok.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(tok.status()) || absl::IsNotFound(tok.status()));
    return 0;
  }
  for (int max_length : {77, 3}) {
    kiln::fuzz::CheckEncoding((*tok)->Encode(parts[3], max_length), max_length, 0);
  }
  return 0;
}
