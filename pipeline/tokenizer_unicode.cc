#include "pipeline/tokenizer_unicode.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <unordered_map>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace kiln::pipeline::unicode {
namespace {

#include "pipeline/tokenizer_unicode_data.inc"

constexpr char32_t kHangulFirst = 0xAC00, kHangulLast = 0xD7A3;
constexpr char32_t kJamoL = 0x1100, kJamoV = 0x1161, kJamoT = 0x11A7;
constexpr int kJamoLCount = 19, kJamoVCount = 21, kJamoTCount = 28;
constexpr int kSyllablesPerL = kJamoVCount * kJamoTCount;

// Index of the first [first, last] record (of `width` values) whose `last` >= c; n if none.
// Records are sorted and disjoint.
size_t FindRecord(const uint32_t* data, size_t n, size_t width, char32_t c) {
  size_t lo = 0, hi = n;
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (data[mid * width + 1] < c) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <size_t N>
bool InRanges(const uint32_t (&ranges)[N], char32_t c) {
  static_assert(N % 2 == 0, "ranges are first,last pairs");
  const size_t i = FindRecord(ranges, N / 2, 2, c);
  return i < N / 2 && ranges[2 * i] <= c;
}

int CombiningClass(char32_t c) {
  if (c < 0x300) return 0;
  constexpr size_t n = sizeof(kCombiningClassRuns) / sizeof(kCombiningClassRuns[0]) / 3;
  const size_t i = FindRecord(kCombiningClassRuns, n, 3, c);
  return i < n && kCombiningClassRuns[3 * i] <= c ? static_cast<int>(kCombiningClassRuns[3 * i + 2])
                                                   : 0;
}

// One-level canonical decomposition {first, second (0: none)}, or nullopt.
std::optional<std::pair<char32_t, char32_t>> Decomposition(char32_t c) {
  constexpr size_t n = sizeof(kDecompositions) / sizeof(kDecompositions[0]) / 3;
  size_t lo = 0, hi = n;
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (kDecompositions[3 * mid] < c) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  if (lo == n || kDecompositions[3 * lo] != c) return std::nullopt;
  return std::make_pair(char32_t{kDecompositions[3 * lo + 1]},
                        char32_t{kDecompositions[3 * lo + 2]});
}

void Decompose(char32_t c, std::u32string* out) {
  if (c >= kHangulFirst && c <= kHangulLast) {
    const int s = static_cast<int>(c - kHangulFirst);
    out->push_back(kJamoL + s / kSyllablesPerL);
    out->push_back(kJamoV + (s % kSyllablesPerL) / kJamoTCount);
    if (s % kJamoTCount != 0) out->push_back(kJamoT + s % kJamoTCount);
    return;
  }
  const auto d = Decomposition(c);
  if (!d) {
    out->push_back(c);
    return;
  }
  Decompose(d->first, out);
  if (d->second != 0) Decompose(d->second, out);
}

// Primary composites by their (first, second) pair, built once.
const std::unordered_map<uint64_t, char32_t>& CompositionTable() {
  static const auto* table = [] {
    auto* t = new std::unordered_map<uint64_t, char32_t>();
    const auto& ex = kCompositionExclusions;
    for (size_t i = 0; i + 2 < sizeof(kDecompositions) / sizeof(kDecompositions[0]); i += 3) {
      const char32_t c = kDecompositions[i], second = kDecompositions[i + 2];
      if (second == 0 || std::binary_search(std::begin(ex), std::end(ex), c)) continue;
      t->emplace(uint64_t{kDecompositions[i + 1]} << 32 | second, c);
    }
    return t;
  }();
  return *table;
}

std::optional<char32_t> Compose(char32_t a, char32_t b) {
  if (a >= kJamoL && a < kJamoL + kJamoLCount && b >= kJamoV && b < kJamoV + kJamoVCount) {
    return kHangulFirst + ((a - kJamoL) * kJamoVCount + (b - kJamoV)) * kJamoTCount;
  }
  if (a >= kHangulFirst && a <= kHangulLast && (a - kHangulFirst) % kJamoTCount == 0 &&
      b > kJamoT && b < kJamoT + kJamoTCount) {
    return a + (b - kJamoT);
  }
  const auto& table = CompositionTable();
  const auto it = table.find(uint64_t{a} << 32 | b);
  if (it == table.end()) return std::nullopt;
  return it->second;
}

absl::Status NotUtf8(std::string_view utf8, size_t offset, const char* what) {
  return absl::InvalidArgumentError(absl::StrFormat(
      "text is not valid UTF-8 at byte offset %d (byte 0x%02X: %s)", offset,
      static_cast<unsigned char>(utf8[offset]), what));
}

}  // namespace

absl::StatusOr<std::u32string> DecodeUtf8(std::string_view utf8) {
  std::u32string out;
  out.reserve(utf8.size());
  size_t i = 0;
  while (i < utf8.size()) {
    const auto b0 = static_cast<unsigned char>(utf8[i]);
    if (b0 < 0x80) {
      out.push_back(b0);
      ++i;
      continue;
    }
    size_t len;
    char32_t c;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      len = 2;
      c = b0 & 0x1F;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      len = 3;
      c = b0 & 0x0F;
      if (b0 == 0xE0) lo = 0xA0;  // overlong
      if (b0 == 0xED) hi = 0x9F;  // surrogates
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      len = 4;
      c = b0 & 0x07;
      if (b0 == 0xF0) lo = 0x90;  // overlong
      if (b0 == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      return NotUtf8(utf8, i, "invalid start byte");
    }
    for (size_t k = 1; k < len; ++k) {
      if (i + k >= utf8.size()) return NotUtf8(utf8, i, "truncated sequence");
      const auto b = static_cast<unsigned char>(utf8[i + k]);
      if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) {
        return NotUtf8(utf8, i, "invalid continuation byte");
      }
      c = (c << 6) | (b & 0x3F);
    }
    out.push_back(c);
    i += len;
  }
  return out;
}

void AppendUtf8(char32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

std::string EncodeUtf8(std::u32string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char32_t c : text) AppendUtf8(c, &out);
  return out;
}

bool IsLetter(char32_t c) {
  if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
  return InRanges(kLetterRanges, c);
}

bool IsNumber(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  return InRanges(kNumberRanges, c);
}

bool IsWhiteSpace(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0D);
  return InRanges(kSpaceRanges, c);
}

void AppendLowercase(char32_t c, std::u32string* out) {
  if (c < 0x80) {
    out->push_back(c >= 'A' && c <= 'Z' ? c + 32 : c);
    return;
  }
  if (c == 0x130) {  // LATIN CAPITAL LETTER I WITH DOT ABOVE
    out->push_back(U'i');
    out->push_back(0x307);
    return;
  }
  static_assert(sizeof(kLowercaseRuns) / sizeof(kLowercaseRuns[0]) % 4 == 0);
  constexpr size_t n = sizeof(kLowercaseRuns) / sizeof(kLowercaseRuns[0]) / 4;
  size_t lo = 0, hi = n;
  while (lo < hi) {  // first run whose last >= c
    const size_t mid = (lo + hi) / 2;
    if (static_cast<char32_t>(kLowercaseRuns[4 * mid + 1]) < c) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  if (lo < n) {
    const auto first = static_cast<char32_t>(kLowercaseRuns[4 * lo]);
    const auto stride = static_cast<char32_t>(kLowercaseRuns[4 * lo + 2]);
    if (first <= c && (c - first) % stride == 0) {
      out->push_back(static_cast<char32_t>(static_cast<int32_t>(c) + kLowercaseRuns[4 * lo + 3]));
      return;
    }
  }
  out->push_back(c);
}

std::u32string Nfc(std::u32string_view text) {
  // Below U+0300 nothing decomposes, combines or reorders.
  if (std::all_of(text.begin(), text.end(), [](char32_t c) { return c < 0x300; })) {
    return std::u32string(text);
  }
  std::u32string d;
  d.reserve(text.size() + 8);
  for (char32_t c : text) Decompose(c, &d);
  for (size_t i = 0; i < d.size();) {  // canonical order: stable sort of each non-starter run
    if (CombiningClass(d[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < d.size() && CombiningClass(d[j]) != 0) ++j;
    std::stable_sort(d.begin() + i, d.begin() + j,
                     [](char32_t a, char32_t b) { return CombiningClass(a) < CombiningClass(b); });
    i = j;
  }
  std::u32string out;
  out.reserve(d.size());
  std::optional<size_t> starter;  // position in `out` of the last starter
  int last_class = -1;            // class of the last char kept after it; -1: none
  for (char32_t c : d) {
    const int k = CombiningClass(c);
    // c combines with the starter unless a char between them blocks it (class 0 or >= k).
    if (starter && (last_class == -1 || (last_class > 0 && last_class < k))) {
      if (const auto p = Compose(out[*starter], c)) {
        out[*starter] = *p;
        continue;
      }
    }
    if (k == 0) {
      starter = out.size();
      last_class = -1;
    } else {
      last_class = k;
    }
    out.push_back(c);
  }
  return out;
}

GraphemeClass GetGraphemeClass(char32_t c) {
  if (c == '\r') return GraphemeClass::kCR;
  if (c == '\n') return GraphemeClass::kLF;
  if (c < 0x20 || c == 0x7F) return GraphemeClass::kControl;
  if (c < 0x80) return GraphemeClass::kOther;
  if (InRanges(kGraphemeExtendRanges, c)) return GraphemeClass::kExtend;
  if (InRanges(kGraphemePrependRanges, c)) return GraphemeClass::kPrepend;
  if (InRanges(kGraphemeControlRanges, c)) return GraphemeClass::kControl;
  return GraphemeClass::kOther;
}

}  // namespace kiln::pipeline::unicode
