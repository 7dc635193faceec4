// PNG output for the generated images: 8-bit RGB, encoded with libpng, deterministic bytes.
//
// The encoding writes only IHDR, IDAT and IEND: no tIME, gAMA, sRGB, text or other ancillary
// chunk, with a fixed zlib level, strategy and filter choice, so the same pixels always give the
// same bytes (for a given libpng and zlib build), and the bytes can be hashed or compared.
// WritePng writes atomically: a temporary file beside `path`, fsync, rename over `path`, fsync of
// the folder; readers see the old file or the complete new one, never a partial PNG.
//
// Threads: the functions keep no state; any thread may call them.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kiln::pipeline {

struct PngOptions {
  // zlib compression level, 0 (store) .. 9 (smallest). 6 is zlib's and PIL's default.
  int compression_level = 6;

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;
};

// Encodes `height` rows of `width` RGB pixels, 3 bytes each, rows top to bottom without padding
// (the buffer holds width * height * 3 bytes). InvalidArgument for a null buffer or a size outside
// 1..1000000 (libpng's limit) per side; Internal if libpng fails.
absl::StatusOr<std::string> EncodePng(const uint8_t* rgb, int width, int height,
                                      const PngOptions& options = {});

// EncodePng, then writes the bytes to `path` atomically (see the file comment). The file gets mode
// 0644 less the umask. Errors: those of EncodePng; NotFound when the folder does not exist,
// PermissionDenied, ResourceExhausted on a full disk, other errno codes; each names the path.
absl::Status WritePng(const std::string& path, const uint8_t* rgb, int width, int height,
                      const PngOptions& options = {});

}  // namespace kiln::pipeline
