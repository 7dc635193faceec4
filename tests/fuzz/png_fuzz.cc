// libFuzzer target: the PNG encoder's inputs (pipeline/png.h). The first bytes choose the width,
// height (each may be out of range: 0, negative, or past libpng's limit) and compression level
// (-2..11, out of range included); the rest are the pixels, repeated to fill the image. Bad sizes
// and levels must give InvalidArgument; a PNG that encodes must decode (libpng's reader) to the
// same pixels, and encode to the same bytes a second time.
#include <png.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "pipeline/png.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  // Mostly small images (fast); byte values >= 250 pick edge sizes.
  auto side = [](uint8_t b) -> int {
    switch (b) {
      case 250: return 0;
      case 251: return -1;
      case 252: return 1'000'001;
      case 253: return INT32_MIN;
      default: return b % 48 + 1;
    }
  };
  const int width = side(data[0]);
  const int height = side(data[1]);
  kiln::pipeline::PngOptions options;
  options.compression_level = static_cast<int>(data[2] % 14) - 2;
  data += 3;
  size -= 3;

  const bool valid_size = width >= 1 && height >= 1 && width <= 1'000'000 && height <= 1'000'000;
  std::vector<uint8_t> rgb;
  if (valid_size && width <= 256 && height <= 256) {
    rgb.resize(static_cast<size_t>(width) * height * 3);
    for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = size ? data[i % size] : static_cast<uint8_t>(i);
  } else {
    rgb.resize(3);  // never read: the size is refused first
  }
  auto png = kiln::pipeline::EncodePng(rgb.data(), width, height, options);
  const bool valid_level = options.compression_level >= 0 && options.compression_level <= 9;
  if (!valid_size || !valid_level) {
    FUZZ_CHECK(absl::IsInvalidArgument(png.status()));
    return 0;
  }
  FUZZ_CHECK(png.ok());
  FUZZ_CHECK(*png == *kiln::pipeline::EncodePng(rgb.data(), width, height, options));

  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  FUZZ_CHECK(png_image_begin_read_from_memory(&image, png->data(), png->size()) != 0);
  FUZZ_CHECK(image.width == static_cast<png_uint_32>(width));
  FUZZ_CHECK(image.height == static_cast<png_uint_32>(height));
  image.format = PNG_FORMAT_RGB;
  std::vector<uint8_t> decoded(PNG_IMAGE_SIZE(image));
  FUZZ_CHECK(png_image_finish_read(&image, nullptr, decoded.data(), 0, nullptr) != 0);
  FUZZ_CHECK(decoded == rgb);
  return 0;
}
