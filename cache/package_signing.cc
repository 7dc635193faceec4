#include "cache/package_signing.h"

#include <dirent.h>
#include <sodium.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/files.h"
#include "common/hash.h"

namespace kiln::cache {
namespace {

constexpr char kKeyType[] = "kiln-package-signing-key";
// Domain separation: a kiln package signature can never be replayed as another kind of message.
constexpr char kSignedPrefix[] = "kiln-package-statement-v1\n";

void InitSodium() {
  // Idempotent and thread-safe; fails only if no entropy source exists at all.
  if (sodium_init() < 0) std::abort();
}

std::string ToHex(const unsigned char* data, size_t n) {
  std::string out(n * 2 + 1, '\0');
  sodium_bin2hex(out.data(), out.size(), data, n);
  out.resize(n * 2);
  return out;
}

bool FromHex(const std::string& hex, size_t want_bytes, std::string* out) {
  if (hex.size() != want_bytes * 2) return false;
  out->assign(want_bytes, '\0');
  size_t got = 0;
  if (sodium_hex2bin(reinterpret_cast<unsigned char*>(out->data()), want_bytes, hex.data(),
                     hex.size(), nullptr, &got, nullptr) != 0) {
    return false;
  }
  return got == want_bytes;
}

bool IsHexKey(const std::string& s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

absl::StatusOr<std::string> ReadWhole(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) return absl::NotFoundError(absl::StrCat(path, ": missing"));
    return absl::PermissionDeniedError(absl::StrCat(path, ": cannot be read"));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

SigningKey SigningKey::Generate() {
  InitSodium();
  unsigned char pk[crypto_sign_PUBLICKEYBYTES];
  unsigned char sk[crypto_sign_SECRETKEYBYTES];
  crypto_sign_keypair(pk, sk);
  SigningKey key{ToHex(pk, sizeof(pk)), std::string(reinterpret_cast<char*>(sk), sizeof(sk))};
  sodium_memzero(sk, sizeof(sk));
  return key;
}

absl::StatusOr<SigningKey> SigningKey::Read(const std::string& path) {
  InitSodium();
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("signing key ", path, ": missing"));
  }
  if ((st.st_mode & 077) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "signing key ", path, " is readable by others (mode ", absl::StrCat(st.st_mode & 0777),
        "); chmod 600 it, or make a new one if it may have leaked"));
  }
  auto text = ReadWhole(path);
  if (!text.ok()) return text.status();
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("signing key ", path, ": ", why));
  };
  if (!j.is_object() || j.value("type", "") != kKeyType) return bad("not a kiln signing key");
  if (!j.contains("public_key") || !j["public_key"].is_string() || !j.contains("secret_key") ||
      !j["secret_key"].is_string()) {
    return bad("public_key and secret_key must be hex strings");
  }
  SigningKey key;
  key.public_key_hex = j["public_key"].get<std::string>();
  if (!IsHexKey(key.public_key_hex)) return bad("public_key is not 64 hex characters");
  if (!FromHex(j["secret_key"].get<std::string>(), crypto_sign_SECRETKEYBYTES, &key.secret_key)) {
    return bad("secret_key is not 128 hex characters");
  }
  // The secret key embeds its public key: they must agree.
  unsigned char pk[crypto_sign_PUBLICKEYBYTES];
  crypto_sign_ed25519_sk_to_pk(pk, reinterpret_cast<const unsigned char*>(key.secret_key.data()));
  if (ToHex(pk, sizeof(pk)) != key.public_key_hex) return bad("public_key does not match secret_key");
  return key;
}

absl::Status SigningKey::Write(const std::string& path, const std::string& public_path) const {
  for (const std::string& p : {path, public_path}) {
    const auto slash = p.rfind('/');
    if (p.empty() || slash == std::string::npos || slash == 0) continue;
    std::error_code ec;
    std::filesystem::create_directories(p.substr(0, slash), ec);
    if (ec) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot create ", p.substr(0, slash), ": ", ec.message()));
    }
  }
  nlohmann::json j = {
      {"type", kKeyType},
      {"public_key", public_key_hex},
      {"secret_key", ToHex(reinterpret_cast<const unsigned char*>(secret_key.data()),
                           secret_key.size())}};
  if (auto s = WriteFileAtomically(path, j.dump(1) + "\n", 0600); !s.ok()) return s;
  // WriteFileAtomically's mode is less the umask; make sure no one else can read it either way.
  ::chmod(path.c_str(), 0600);
  if (!public_path.empty()) {
    return WriteFileAtomically(public_path, public_key_hex + "\n", 0644);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadPublicKeyFile(const std::string& path) {
  auto text = ReadWhole(path);
  if (!text.ok()) return text.status();
  std::istringstream in(*text);
  std::string word;
  in >> word;
  word = absl::AsciiStrToLower(word);
  if (!IsHexKey(word)) {
    return absl::InvalidArgumentError(
        absl::StrCat("public key ", path, ": first word is not 64 hex characters"));
  }
  return word;
}

absl::StatusOr<TrustSet> TrustSet::Load(const std::string& spec) {
  TrustSet out;
  for (absl::string_view part : absl::StrSplit(spec, ',', absl::SkipWhitespace())) {
    const std::string path(absl::StripAsciiWhitespace(part));
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      return absl::NotFoundError(absl::StrCat("trusted keys: ", path, " does not exist"));
    }
    std::vector<std::string> files;
    if (S_ISDIR(st.st_mode)) {
      DIR* d = ::opendir(path.c_str());
      if (d == nullptr) {
        return absl::PermissionDeniedError(absl::StrCat("trusted keys: cannot list ", path));
      }
      while (dirent* e = ::readdir(d)) {
        const std::string name = e->d_name;
        if (name.size() > 4 && name.substr(name.size() - 4) == ".pub" && name[0] != '.') {
          files.push_back(absl::StrCat(path, "/", name));
        }
      }
      ::closedir(d);
    } else {
      files.push_back(path);
    }
    for (const auto& f : files) {
      auto key = ReadPublicKeyFile(f);
      if (!key.ok()) return key.status();
      out.Add(*key);
    }
  }
  if (out.size() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("trusted keys: no .pub file in '", spec, "'; a node must trust a signer"));
  }
  return out;
}

absl::StatusOr<Revocations> Revocations::Parse(const std::string& text) {
  Revocations out;
  int line_no = 0;
  for (absl::string_view raw : absl::StrSplit(text, '\n')) {
    ++line_no;
    std::string line(raw.substr(0, raw.find('#')));
    line = std::string(absl::StripAsciiWhitespace(line));
    if (line.empty()) continue;
    std::vector<std::string> words = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (words.size() != 2 || !IsHexKey(words[1]) ||
        (words[0] != "key" && words[0] != "package")) {
      return absl::InvalidArgumentError(absl::StrCat(
          "revocations line ", line_no, ": expected 'key <64 hex>' or 'package <64 hex>', got '",
          line, "'"));
    }
    (words[0] == "key" ? out.keys : out.packages).insert(words[1]);
  }
  return out;
}

absl::Status Revocations::CheckEntry(const std::string& entry) {
  auto parsed = Parse(entry);
  if (!parsed.ok()) return parsed.status();
  if (parsed->keys.size() + parsed->packages.size() != 1) {
    return absl::InvalidArgumentError("a revocation is one line: 'key <hex>' or 'package <hex>'");
  }
  return absl::OkStatus();
}

void Revocations::Merge(const Revocations& other) {
  keys.insert(other.keys.begin(), other.keys.end());
  packages.insert(other.packages.begin(), other.packages.end());
}

const char* RefusalLabel(Refusal r) {
  switch (r) {
    case Refusal::kNone:
      return "none";
    case Refusal::kUnsigned:
      return "unsigned";
    case Refusal::kBadSignature:
      return "bad_signature";
    case Refusal::kUntrusted:
      return "untrusted";
    case Refusal::kRevokedKey:
      return "revoked_key";
    case Refusal::kRevokedPackage:
      return "revoked_package";
  }
  return "unknown";
}

absl::StatusOr<nlohmann::json> PackageStatement(const std::string& dir,
                                                const std::string& digest) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return absl::NotFoundError(absl::StrCat("package ", dir, ": cannot list"));
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.empty() || name[0] == '.' || name == kSignatureFile) continue;
    names.push_back(name);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  nlohmann::json files = nlohmann::json::object();
  for (const auto& name : names) {
    const std::string path = absl::StrCat(dir, "/", name);
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0) {
      return absl::NotFoundError(absl::StrCat(path, " vanished while being read"));
    }
    // Anything but a regular file (a symlink, a subdirectory) is listed so that the statement
    // cannot match a signed one: a package is flat regular files only.
    if (!S_ISREG(st.st_mode)) {
      files[name] = {{"bytes", -1}, {"sha256", "not a regular file"}};
      continue;
    }
    auto sha = Sha256File(path);
    if (!sha.ok()) return sha.status();
    files[name] = {{"bytes", static_cast<int64_t>(st.st_size)}, {"sha256", *sha}};
  }
  return nlohmann::json{{"format", 1}, {"digest", digest}, {"files", files}};
}

absl::Status SignPackageDir(const std::string& dir, const std::string& digest,
                            const SigningKey& key) {
  InitSodium();
  auto statement = PackageStatement(dir, digest);
  if (!statement.ok()) return statement.status();
  const std::string message = kSignedPrefix + CanonicalJson(*statement);
  unsigned char sig[crypto_sign_BYTES];
  crypto_sign_detached(sig, nullptr, reinterpret_cast<const unsigned char*>(message.data()),
                       message.size(),
                       reinterpret_cast<const unsigned char*>(key.secret_key.data()));
  nlohmann::json doc = {{"format", 1},
                        {"public_key", key.public_key_hex},
                        {"signature", ToHex(sig, sizeof(sig))},
                        {"statement", *statement}};
  return WriteFileAtomically(absl::StrCat(dir, "/", kSignatureFile), doc.dump(1) + "\n", 0644);
}

absl::StatusOr<SignatureCheck> VerifyPackageSignature(const std::string& dir,
                                                      const std::string& digest,
                                                      const std::string& package_sha256,
                                                      const TrustSet& trust,
                                                      const Revocations& revoked) {
  InitSodium();
  SignatureCheck check;
  auto refuse = [&](Refusal r, std::string why) {
    check.refusal = r;
    check.reason = std::move(why);
    return check;
  };
  const std::string sig_path = absl::StrCat(dir, "/", kSignatureFile);
  auto text = ReadWhole(sig_path);
  if (absl::IsNotFound(text.status())) {
    return refuse(Refusal::kUnsigned, "the package is not signed (no signature.json)");
  }
  if (!text.ok()) return text.status();
  nlohmann::json doc = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (!doc.is_object() || !doc.contains("public_key") || !doc["public_key"].is_string() ||
      !doc.contains("signature") || !doc["signature"].is_string()) {
    return refuse(Refusal::kBadSignature, "signature.json is malformed");
  }
  check.signer = doc["public_key"].get<std::string>();
  std::string pk, sig;
  if (!IsHexKey(check.signer) || !FromHex(check.signer, crypto_sign_PUBLICKEYBYTES, &pk) ||
      !FromHex(doc["signature"].get<std::string>(), crypto_sign_BYTES, &sig)) {
    return refuse(Refusal::kBadSignature, "signature.json holds a malformed key or signature");
  }
  // Revocation and trust are decided before hashing: refusing costs nothing.
  if (revoked.keys.count(check.signer)) {
    return refuse(Refusal::kRevokedKey,
                  absl::StrCat("its signing key ", check.signer.substr(0, 16), "… is revoked"));
  }
  if (revoked.packages.count(package_sha256)) {
    return refuse(Refusal::kRevokedPackage,
                  absl::StrCat("the package ", package_sha256.substr(0, 16), "… is revoked"));
  }
  if (!trust.Trusts(check.signer)) {
    return refuse(Refusal::kUntrusted, absl::StrCat("its signer ", check.signer.substr(0, 16),
                                                    "… is not in this node's trust set"));
  }
  auto statement = PackageStatement(dir, digest);
  if (!statement.ok()) return statement.status();
  const std::string message = kSignedPrefix + CanonicalJson(*statement);
  if (crypto_sign_verify_detached(reinterpret_cast<const unsigned char*>(sig.data()),
                                  reinterpret_cast<const unsigned char*>(message.data()),
                                  message.size(),
                                  reinterpret_cast<const unsigned char*>(pk.data())) != 0) {
    std::string which;
    if (doc.contains("statement") && doc["statement"].is_object() &&
        doc["statement"].contains("files") && doc["statement"]["files"].is_object()) {
      const auto& signed_files = doc["statement"]["files"];
      for (const auto& [name, entry] : (*statement)["files"].items()) {
        if (!signed_files.contains(name)) {
          which = absl::StrCat(name, " was added");
        } else if (signed_files[name] != entry) {
          which = absl::StrCat(name, " was changed");
        }
        if (!which.empty()) break;
      }
    }
    return refuse(Refusal::kBadSignature,
                  absl::StrCat("the signature does not match the package's files",
                               which.empty() ? "" : absl::StrCat(" (", which, ")")));
  }
  return check;
}

}  // namespace kiln::cache
