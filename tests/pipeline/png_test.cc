// Tests of the PNG writer: pixels survive a round trip through PIL (tests/pipeline/decode_png.py),
// the bytes are deterministic and hold no ancillary chunks, writes are atomic and errors specific.
#include "pipeline/png.h"

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/pipeline/test_support.h"

namespace kiln::pipeline {
namespace {

using ::kiln::testing::ReadFileOrDie;
using ::kiln::testing::TempDir;
using ::kiln::testing::WriteFileOrDie;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Gradients, a checkerboard and the extremes 0 and 255, so every byte position of a pixel varies.
std::vector<uint8_t> Pattern(int width, int height) {
  std::vector<uint8_t> rgb(static_cast<size_t>(width) * height * 3);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      uint8_t* p = &rgb[(static_cast<size_t>(y) * width + x) * 3];
      p[0] = static_cast<uint8_t>(x * 255 / std::max(1, width - 1));
      p[1] = static_cast<uint8_t>(y * 255 / std::max(1, height - 1));
      p[2] = ((x / 3 + y / 3) % 2) ? 255 : static_cast<uint8_t>((x * 7 + y * 13) & 0xff);
    }
  }
  return rgb;
}

std::vector<uint8_t> Noise(int width, int height, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> rgb(static_cast<size_t>(width) * height * 3);
  for (auto& b : rgb) b = static_cast<uint8_t>(rng());
  return rgb;
}

uint32_t BigEndian32(const std::string& s, size_t at) {
  return (uint32_t{static_cast<uint8_t>(s[at])} << 24) |
         (uint32_t{static_cast<uint8_t>(s[at + 1])} << 16) |
         (uint32_t{static_cast<uint8_t>(s[at + 2])} << 8) |
         uint32_t{static_cast<uint8_t>(s[at + 3])};
}

// The chunk types of a PNG, in order.
std::vector<std::string> Chunks(const std::string& png) {
  std::vector<std::string> out;
  size_t at = 8;
  while (at + 12 <= png.size()) {
    const uint32_t len = BigEndian32(png, at);
    out.push_back(png.substr(at + 4, 4));
    at += 12 + len;
  }
  EXPECT_EQ(at, png.size());
  return out;
}

// Pixels PIL decodes from `png_path`, checking it decodes as an RGB image of that size.
std::string DecodeWithPil(const TempDir& dir, const std::string& png_path, int width, int height) {
  const std::string raw = dir.Join("decoded.raw");
  auto run = kiln::testing::RunPython("tests/pipeline/decode_png.py", {png_path, raw});
  EXPECT_TRUE(run.ok()) << run.status();
  const auto info = nlohmann::json::parse(ReadFileOrDie(raw + ".json"));
  EXPECT_EQ(info["mode"], "RGB");
  EXPECT_EQ(info["format"], "PNG");
  EXPECT_EQ(info["width"], width);
  EXPECT_EQ(info["height"], height);
  return ReadFileOrDie(raw);
}

std::string AsString(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }

TEST(PngTest, PilDecodesThePixelsWritten) {
  if (!kiln::testing::HavePython()) GTEST_SKIP() << "KILN_PYTHON / KILN_SOURCE not set";
  TempDir dir;
  struct Case {
    int width, height, level;
    bool noise;
  };
  for (const Case& c : {Case{37, 23, 6, false}, Case{1, 1, 6, false}, Case{1, 300, 0, false},
                        Case{300, 1, 9, false}, Case{512, 384, 6, true}}) {
    SCOPED_TRACE(::testing::Message() << c.width << "x" << c.height << " level " << c.level);
    const auto rgb = c.noise ? Noise(c.width, c.height, 5) : Pattern(c.width, c.height);
    PngOptions options;
    options.compression_level = c.level;
    const std::string path = dir.Join("image.png");
    ASSERT_TRUE(WritePng(path, rgb.data(), c.width, c.height, options).ok());
    EXPECT_EQ(DecodeWithPil(dir, path, c.width, c.height), AsString(rgb));
  }
}

TEST(PngTest, SameInputSameBytesAndNoAncillaryChunks) {
  const auto rgb = Pattern(64, 48);
  auto a = EncodePng(rgb.data(), 64, 48);
  auto b = EncodePng(rgb.data(), 64, 48);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*a, *b);
  EXPECT_EQ(a->substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_THAT(Chunks(*a), ElementsAre("IHDR", "IDAT", "IEND"));
  // IHDR: width, height, bit depth 8, colour type 2 (RGB), no interlace.
  EXPECT_EQ(BigEndian32(*a, 16), 64u);
  EXPECT_EQ(BigEndian32(*a, 20), 48u);
  EXPECT_EQ(static_cast<uint8_t>((*a)[24]), 8);
  EXPECT_EQ(static_cast<uint8_t>((*a)[25]), 2);
  EXPECT_EQ(static_cast<uint8_t>((*a)[28]), 0);

  // A file written later holds the same bytes.
  TempDir dir;
  ASSERT_TRUE(WritePng(dir.Join("x.png"), rgb.data(), 64, 48).ok());
  EXPECT_EQ(ReadFileOrDie(dir.Join("x.png")), *a);
  // Other pixels, other bytes; other levels, other bytes.
  auto other = EncodePng(Noise(64, 48, 1).data(), 64, 48);
  ASSERT_TRUE(other.ok());
  EXPECT_NE(*other, *a);
  PngOptions store;
  store.compression_level = 0;
  auto stored = EncodePng(rgb.data(), 64, 48, store);
  ASSERT_TRUE(stored.ok());
  EXPECT_GT(stored->size(), rgb.size());
}

TEST(PngTest, WriteReplacesAtomicallyAndLeavesNoTemporaryFiles) {
  TempDir dir;
  const std::string path = dir.Join("out.png");
  WriteFileOrDie(path, "old contents");
  const auto rgb = Pattern(16, 16);
  ASSERT_TRUE(WritePng(path, rgb.data(), 16, 16).ok());
  EXPECT_EQ(ReadFileOrDie(path), *EncodePng(rgb.data(), 16, 16));
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    names.push_back(e.path().filename().string());
  }
  EXPECT_THAT(names, ElementsAre("out.png"));
  // The file is readable by others (0644 less the umask), not mkstemp's 0600.
  const auto perms = std::filesystem::status(path).permissions();
  EXPECT_NE(perms & std::filesystem::perms::owner_read, std::filesystem::perms::none);
}

TEST(PngTest, WriteErrorsNameThePathAndHaveSpecificCodes) {
  TempDir dir;
  const auto rgb = Pattern(4, 4);
  const std::string missing = dir.Join("no/such/folder/x.png");
  absl::Status s = WritePng(missing, rgb.data(), 4, 4);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_THAT(s.message(), HasSubstr(missing));

  if (geteuid() != 0) {  // root ignores permissions
    const std::string ro = dir.Join("ro");
    std::filesystem::create_directory(ro);
    std::filesystem::permissions(ro, std::filesystem::perms::owner_read |
                                         std::filesystem::perms::owner_exec);
    s = WritePng(ro + "/x.png", rgb.data(), 4, 4);
    EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << s;
    EXPECT_THAT(s.message(), HasSubstr(ro + "/x.png"));
    std::filesystem::permissions(ro, std::filesystem::perms::owner_all);
  }

  // Renaming onto a folder fails after the temporary file was written: it must be removed.
  const std::string folder = dir.Join("a_folder.png");
  std::filesystem::create_directory(folder);
  std::filesystem::create_directory(folder + "/keep");
  s = WritePng(folder, rgb.data(), 4, 4);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr(folder));
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    files += e.is_regular_file() ? 1 : 0;
  }
  EXPECT_EQ(files, 0) << "temporary file left behind";
}

TEST(PngTest, BadArgumentsAreInvalidArgument) {
  const auto rgb = Pattern(4, 4);
  EXPECT_EQ(EncodePng(nullptr, 4, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodePng(rgb.data(), 0, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodePng(rgb.data(), 4, -1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodePng(rgb.data(), 1000001, 1).status().code(), absl::StatusCode::kInvalidArgument);
  PngOptions bad;
  bad.compression_level = 10;
  auto s = EncodePng(rgb.data(), 4, 4, bad);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("compression_level"));
  TempDir dir;
  EXPECT_EQ(WritePng(dir.Join("x.png"), rgb.data(), 0, 0).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(dir.Join("x.png")));
}

}  // namespace
}  // namespace kiln::pipeline
