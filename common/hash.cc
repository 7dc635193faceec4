#include "common/hash.h"

#include <sodium.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kiln {
namespace {

std::string ToHex(const unsigned char* bytes, size_t n) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kDigits[bytes[i] >> 4];
    out[2 * i + 1] = kDigits[bytes[i] & 0xf];
  }
  return out;
}

}  // namespace

std::string Sha256Hex(std::string_view data) {
  unsigned char digest[crypto_hash_sha256_BYTES];
  crypto_hash_sha256(digest, reinterpret_cast<const unsigned char*>(data.data()), data.size());
  return ToHex(digest, sizeof(digest));
}

absl::StatusOr<std::string> Sha256File(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) {
    int err = errno;
    auto msg = absl::StrCat("cannot open ", path, ": ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(msg) : absl::InternalError(msg);
  }
  crypto_hash_sha256_state state;
  crypto_hash_sha256_init(&state);
  std::string buf(1 << 20, '\0');
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), f.get())) > 0) {
    crypto_hash_sha256_update(&state, reinterpret_cast<const unsigned char*>(buf.data()), n);
  }
  if (std::ferror(f.get())) return absl::InternalError(absl::StrCat("read error on ", path));
  unsigned char digest[crypto_hash_sha256_BYTES];
  crypto_hash_sha256_final(&state, digest);
  return ToHex(digest, sizeof(digest));
}

namespace {

// Python's float.__repr__ (what json.dumps writes for a float): the shortest digit string that
// round-trips, closest to the value on ties (std::to_chars gives the same digits), in fixed
// notation when the decimal point position is in (-4, 16] (with ".0" added to integral values),
// otherwise d[.ddd]e+XX / e-XX with at least two exponent digits. Non-finite values are written
// as json.dumps writes them by default (NaN, Infinity, -Infinity).
//
// nlohmann's own dump() differs in two ways, hence this function: it switches to exponent
// notation one decade earlier (1e15 -> "1e+15", Python "1000000000000000.0"), and its Grisu2
// digits are not always the shortest/closest (~0.4% of random doubles, e.g. Python
// "2.332715332206741e+16", nlohmann "2.3327153322067408e+16").
void AppendPythonFloat(double v, std::string* out) {
  if (std::isnan(v)) {
    out->append("NaN");
    return;
  }
  if (std::isinf(v)) {
    out->append(v < 0 ? "-Infinity" : "Infinity");
    return;
  }
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  // res.ptr is within buf: 17 digits + sign + point + "e-308" fit easily.
  std::string_view sci(buf, static_cast<size_t>(res.ptr - buf));
  bool negative = !sci.empty() && sci.front() == '-';
  if (negative) sci.remove_prefix(1);
  size_t e = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e)) {
    if (c != '.') digits.push_back(c);
  }
  int exponent = 0;
  std::string_view exp_text = sci.substr(e + 1);
  if (!exp_text.empty() && exp_text.front() == '+') exp_text.remove_prefix(1);
  std::from_chars(exp_text.data(), exp_text.data() + exp_text.size(), exponent);
  const int ndigits = static_cast<int>(digits.size());
  const int decpt = exponent + 1;  // position of the decimal point relative to digits[0]

  if (negative) out->push_back('-');
  if (decpt <= -4 || decpt > 16) {
    out->push_back(digits[0]);
    if (ndigits > 1) {
      out->push_back('.');
      out->append(digits, 1, std::string::npos);
    }
    char exp_buf[16];
    std::snprintf(exp_buf, sizeof(exp_buf), "e%c%02d", exponent < 0 ? '-' : '+',
                  std::abs(exponent));
    out->append(exp_buf);
  } else if (decpt <= 0) {
    out->append("0.");
    out->append(static_cast<size_t>(-decpt), '0');
    out->append(digits);
  } else if (decpt >= ndigits) {
    out->append(digits);
    out->append(static_cast<size_t>(decpt - ndigits), '0');
    out->append(".0");
  } else {
    out->append(digits, 0, static_cast<size_t>(decpt));
    out->push_back('.');
    out->append(digits, static_cast<size_t>(decpt), std::string::npos);
  }
}

void AppendCanonical(const nlohmann::json& value, std::string* out) {
  switch (value.type()) {
    case nlohmann::json::value_t::object: {
      // nlohmann::json keeps object keys in a std::map: sorted by UTF-8 bytes, which is the
      // code point order Python's sort_keys uses.
      out->push_back('{');
      bool first = true;
      for (const auto& [k, v] : value.items()) {
        if (!first) out->push_back(',');
        first = false;
        AppendCanonical(nlohmann::json(k), out);
        out->push_back(':');
        AppendCanonical(v, out);
      }
      out->push_back('}');
      return;
    }
    case nlohmann::json::value_t::array: {
      out->push_back('[');
      bool first = true;
      for (const auto& v : value) {
        if (!first) out->push_back(',');
        first = false;
        AppendCanonical(v, out);
      }
      out->push_back(']');
      return;
    }
    case nlohmann::json::value_t::number_float:
      AppendPythonFloat(value.get<double>(), out);
      return;
    default:
      // Strings (escapes as Python's: \" \\ \b \f \n \r \t, other controls \u00xx, the
      // rest as UTF-8), integers, booleans, null: nlohmann's dump already matches json.dumps.
      out->append(value.dump(/*indent=*/-1, ' ', /*ensure_ascii=*/false,
                             nlohmann::json::error_handler_t::strict));
      return;
  }
}

}  // namespace

std::string CanonicalJson(const nlohmann::json& value) {
  std::string out;
  AppendCanonical(value, &out);
  return out;
}

}  // namespace kiln
