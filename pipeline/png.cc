#include "pipeline/png.h"

#include <png.h>
#include <zlib.h>

#include <cstdio>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/files.h"

namespace kiln::pipeline {
namespace {

constexpr int kMaxSide = 1000000;  // libpng's default user limit on width and height

// What the libpng callbacks write to; lives in EncodePng's frame, outside the longjmp's reach.
struct EncodeState {
  std::string* out = nullptr;
  char message[256] = {0};  // libpng's error message
};

void OnPngError(png_structp png, png_const_charp msg) {
  auto* state = static_cast<EncodeState*>(png_get_error_ptr(png));
  std::snprintf(state->message, sizeof(state->message), "%s", msg);
  png_longjmp(png, 1);
}

void OnPngWarning(png_structp, png_const_charp) {}

void OnPngWrite(png_structp png, png_bytep data, size_t n) {
  auto* state = static_cast<EncodeState*>(png_get_io_ptr(png));
  bool failed = false;
  try {
    state->out->append(reinterpret_cast<const char*>(data), n);
  } catch (const std::bad_alloc&) {
    failed = true;
  }
  // Outside the try block: no C++ object is alive in this frame when png_error longjmps.
  if (failed) png_error(png, "out of memory");
}

void OnPngFlush(png_structp) {}

// The libpng calls. libpng reports errors by longjmp back to the setjmp here, skipping only its
// own C frames and the callbacks above; this function holds only trivially destructible locals,
// so the jump skips no destructor.
bool WriteImage(png_structp png, png_infop info, const uint8_t* rgb, int width, int height,
                int level) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_set_IHDR(png, info, static_cast<png_uint_32>(width), static_cast<png_uint_32>(height), 8,
               PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  // Pinned, not left to libpng defaults, so the bytes do not change with them.
  png_set_compression_level(png, level);
  png_set_compression_strategy(png, Z_FILTERED);
  png_set_filter(png, PNG_FILTER_TYPE_BASE, PNG_ALL_FILTERS);
  png_write_info(png, info);
  const size_t stride = static_cast<size_t>(width) * 3;
  for (int y = 0; y < height; ++y) png_write_row(png, rgb + static_cast<size_t>(y) * stride);
  png_write_end(png, nullptr);
  return true;
}

// Owns libpng's write structs.
struct PngWriteStructs {
  png_structp png = nullptr;
  png_infop info = nullptr;
  ~PngWriteStructs() { png_destroy_write_struct(&png, &info); }
};

}  // namespace

absl::Status PngOptions::Validate() const {
  if (compression_level < 0 || compression_level > 9) {
    return absl::InvalidArgumentError(
        absl::StrCat("png options: compression_level ", compression_level, " not in 0..9"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> EncodePng(const uint8_t* rgb, int width, int height,
                                      const PngOptions& options) {
  if (auto s = options.Validate(); !s.ok()) return s;
  if (rgb == nullptr) return absl::InvalidArgumentError("EncodePng: rgb is null");
  if (width < 1 || width > kMaxSide || height < 1 || height > kMaxSide) {
    return absl::InvalidArgumentError(absl::StrCat("EncodePng: size ", width, "x", height,
                                                   " outside 1..", kMaxSide, " per side"));
  }
  std::string out;
  EncodeState state;
  state.out = &out;
  PngWriteStructs structs;
  structs.png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &state, OnPngError, OnPngWarning);
  if (structs.png == nullptr) return absl::InternalError("png_create_write_struct failed");
  structs.info = png_create_info_struct(structs.png);
  if (structs.info == nullptr) return absl::InternalError("png_create_info_struct failed");
  png_set_write_fn(structs.png, &state, OnPngWrite, OnPngFlush);
  if (!WriteImage(structs.png, structs.info, rgb, width, height, options.compression_level)) {
    return absl::InternalError(absl::StrCat("libpng: ", state.message));
  }
  return out;
}

absl::Status WritePng(const std::string& path, const uint8_t* rgb, int width, int height,
                      const PngOptions& options) {
  absl::StatusOr<std::string> bytes = EncodePng(rgb, width, height, options);
  if (!bytes.ok()) return bytes.status();
  return WriteFileAtomically(path, *bytes);  // common/files.h
}

}  // namespace kiln::pipeline
