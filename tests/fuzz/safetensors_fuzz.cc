// libFuzzer target: the safetensors header parser (pipeline/safetensors.h). The input is a whole
// .safetensors file (8-byte length, JSON header, data), opened through a memfd path as the
// pipeline opens checkpoint files. Any bytes must give a Status with one of the documented codes;
// every view of a file that opens must lie inside the file and hold numel * itemsize bytes.
#include <cstdint>
#include <string_view>

#include "pipeline/safetensors.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static kiln::fuzz::MemFile* file = new kiln::fuzz::MemFile();
  const std::string& path = file->Write(std::string_view(reinterpret_cast<const char*>(data), size));
  kiln::pipeline::SafetensorsOptions options;
  options.max_header_bytes = 1 << 20;
  auto st = kiln::pipeline::SafetensorsFile::Open(path, options);
  if (!st.ok()) {
    const absl::StatusCode code = st.status().code();
    FUZZ_CHECK(code == absl::StatusCode::kDataLoss || code == absl::StatusCode::kInvalidArgument ||
               code == absl::StatusCode::kUnimplemented);
    return 0;
  }
  FUZZ_CHECK((*st)->file_bytes() == size);
  uint64_t total = 0;
  for (const auto& view : (*st)->tensors()) {
    FUZZ_CHECK(view.numel() >= 0);
    FUZZ_CHECK(view.nbytes == static_cast<size_t>(view.numel()) * kiln::pipeline::DTypeSize(view.dtype));
    FUZZ_CHECK((*st)->Find(view.name) == &view);
    total += view.nbytes;
    if (view.nbytes == 0) continue;
    // Inside the file: the mapping holds exactly `size` bytes, and the data section starts after
    // the 8-byte length.
    const auto* p = static_cast<const uint8_t*>(view.data);
    volatile uint8_t first = p[0];
    volatile uint8_t last = p[view.nbytes - 1];
    (void)first;
    (void)last;
    FUZZ_CHECK(view.nbytes <= size - 8);
  }
  FUZZ_CHECK(total == (*st)->tensor_bytes());
  return 0;
}
