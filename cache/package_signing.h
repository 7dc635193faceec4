// Package signatures: who built a package, and whether this node may load it.
//
// A package is a directory of flat files (model.pt2 is a shared library: code). Whoever compiles
// it (the node whose provider ran kiln-compile, or `kiln signing-key sign`) signs its *statement*:
// the canonical JSON of {"format", "digest" (the artifact key digest), "files": {name: {"bytes",
// "sha256"}}} over every file of the directory except signature.json itself, with an ed25519 key
// (libsodium) that never leaves that host. The signature, the signer's public key and the
// statement are written to <dir>/signature.json. A node loads a package only if the statement
// matches the files on disk, the signature verifies, the signer is in its TrustSet and neither
// the signer nor the package (the SHA-256 of model.pt2) is in the cluster's Revocations.
//
// Files on disk:
//   signing key  {"type": "kiln-package-signing-key", "public_key": hex, "secret_key": hex}, 0600
//   public key   <name>.pub: the hex public key on its first line (a trust set is a directory of
//                these, or a comma list of files and directories)
//   revocations  one entry a line, "key <hex public key>" or "package <sha256 of model.pt2>",
//                '#' starts a comment (SHARED/revoked.txt; P:revoked in Redis)
// Thread-safe: every type here is immutable after construction.
#pragma once

#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kiln::cache {

inline constexpr char kSignatureFile[] = "signature.json";

// An ed25519 key pair. `secret_key` holds libsodium's 64-byte secret key (seed + public key).
struct SigningKey {
  std::string public_key_hex;  // 64 hex characters
  std::string secret_key;      // raw bytes, 64

  // A new random key pair.
  static SigningKey Generate();
  // Reads a key file written by Write(). InvalidArgument naming the file if it is malformed,
  // FailedPrecondition if it is readable by group or others (a key that may have leaked).
  static absl::StatusOr<SigningKey> Read(const std::string& path);
  // Writes the secret key file (0600, atomically) and, if `public_path` is not empty, the public
  // key (0644). Errors carry errno's code and name the path.
  absl::Status Write(const std::string& path, const std::string& public_path) const;
};

// Reads a .pub file: its first whitespace-separated word, checked to be 64 hex characters.
absl::StatusOr<std::string> ReadPublicKeyFile(const std::string& path);

// The public keys a node accepts package signatures from.
class TrustSet {
 public:
  TrustSet() = default;
  // `spec`: a comma list of .pub files and directories (every *.pub file in them). NotFound or
  // InvalidArgument naming the path if one cannot be read; an empty result is InvalidArgument
  // (a node that trusts no one could load nothing).
  static absl::StatusOr<TrustSet> Load(const std::string& spec);
  void Add(const std::string& public_key_hex) { keys_.insert(public_key_hex); }
  bool Trusts(const std::string& public_key_hex) const { return keys_.count(public_key_hex) > 0; }
  size_t size() const { return keys_.size(); }

 private:
  std::set<std::string> keys_;
};

// Revoked signing keys and packages, as the cluster's shared state holds them.
struct Revocations {
  std::set<std::string> keys;      // hex public keys
  std::set<std::string> packages;  // SHA-256 of a package's model.pt2 (manifest package.sha256)

  // Parses the text format (file comment). InvalidArgument naming the line number of a bad line.
  static absl::StatusOr<Revocations> Parse(const std::string& text);
  // One entry, "key <hex>" or "package <hex>": InvalidArgument unless well formed.
  static absl::Status CheckEntry(const std::string& entry);
  void Merge(const Revocations& other);
};

// Why a package was refused, as the metric label kiln_artifact_refused_total{reason} says it.
enum class Refusal { kNone, kUnsigned, kBadSignature, kUntrusted, kRevokedKey, kRevokedPackage };
const char* RefusalLabel(Refusal r);

// The statement of the package in `dir` for `digest` (see the file comment). Errors as I/O
// reports them (NotFound if the directory vanished).
absl::StatusOr<nlohmann::json> PackageStatement(const std::string& dir, const std::string& digest);

// Signs the package in `dir` with `key`: writes dir/signature.json atomically.
absl::Status SignPackageDir(const std::string& dir, const std::string& digest,
                            const SigningKey& key);

// What VerifyPackageSignature found.
struct SignatureCheck {
  Refusal refusal = Refusal::kNone;
  std::string signer;  // hex public key, when signature.json could be read
  std::string reason;  // for people, when refused
  bool ok() const { return refusal == Refusal::kNone; }
};

// Checks the signature of the package in `dir` for `digest` against `trust` and `revoked`.
// `package_sha256` is the manifest's (already checked against model.pt2 by VerifyPackageDir).
// A non-OK status only for I/O errors that say nothing about the package; a refused package is an
// OK status whose SignatureCheck says why.
absl::StatusOr<SignatureCheck> VerifyPackageSignature(const std::string& dir,
                                                      const std::string& digest,
                                                      const std::string& package_sha256,
                                                      const TrustSet& trust,
                                                      const Revocations& revoked);

}  // namespace kiln::cache
