// CURVE key pairs and key lists for kiln's ZeroMQ transport (coordinator, nodes, clients).
//
// A key pair is two Z85 strings of 40 characters (ZeroMQ's encoding of 32-byte Curve25519 keys).
// On disk, `kiln keys new NAME` writes
//   NAME.key  (mode 0600) — both keys:  public-key = "..."  /  secret-key = "..."
//   NAME.pub  (mode 0644) — the public key only:  public-key = "..."
// (the same lines as a czmq/zcert certificate, so those tools read them too). A key list (an
// allowlist) is either a file with one key per line ("Z85KEY [name]", '#' comments) or a
// directory whose *.pub files each hold one public key (name = file stem) — the shape a
// Kubernetes Secret mounted as a volume has.
//
// Also the socket side: CurveClient / CurveServer apply the options to a raw libzmq socket
// handle, so callers need not know the option names. Thread-compatible; no global state.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kiln {

struct CurveKeyPair {
  std::string public_key;  // Z85, 40 characters
  std::string secret_key;  // Z85, 40 characters
};

// True for a 40-character string that decodes as Z85 (a 32-byte key).
bool IsCurveKey(absl::string_view z85);

// A fresh key pair (zmq_curve_keypair). Internal when libzmq was built without CURVE.
absl::StatusOr<CurveKeyPair> NewCurveKeyPair();
// The public key of a Z85 secret key. InvalidArgument for a malformed key.
absl::StatusOr<std::string> CurvePublicKey(absl::string_view secret_z85);

// Writes DIR/NAME.key (0600, created new: AlreadyExists if either file exists unless `overwrite`)
// and DIR/NAME.pub; creates DIR (0700) if needed. InvalidArgument for a NAME that is not
// [A-Za-z0-9._-]+.
absl::Status WriteCurveKeyFiles(const std::string& dir, const std::string& name,
                                const CurveKeyPair& pair, bool overwrite = false);
// Reads a NAME.key file (secret-key line required; the public key is derived and checked against
// a public-key line when there is one). NotFound / PermissionDenied / InvalidArgument naming the
// path. A bare 40-character line is taken as the secret key.
absl::StatusOr<CurveKeyPair> ReadCurveKeyPair(const std::string& path);
// Reads a public key: a NAME.pub file, a NAME.key file (its public key) or a bare key line.
absl::StatusOr<std::string> ReadCurvePublicKey(const std::string& path);

// A key list: public key (Z85) → name. See the file comment for the formats. An empty path
// gives an empty list. NotFound for a missing path; InvalidArgument naming the file and line of
// a malformed entry.
using CurveKeyList = std::map<std::string, std::string>;
absl::StatusOr<CurveKeyList> ReadCurveKeyList(const std::string& path);
// A cheap fingerprint of the list at `path` (names, sizes and mtimes), to notice edits without
// reading them. Empty when the path is missing or empty.
std::string KeyListFingerprint(const std::string& path);

// The client side of a CURVE connection: its own pair and the server's public key.
struct CurveClient {
  CurveKeyPair own;
  std::string server_public_key;
  bool enabled() const { return !server_public_key.empty(); }
};
// Sets ZMQ_CURVE_SERVERKEY/PUBLICKEY/SECRETKEY on `zmq_socket` (a void* libzmq handle) before
// connect. Nothing when !client.enabled(). InvalidArgument for malformed keys; Internal when
// libzmq refuses.
absl::Status ApplyCurveClient(void* zmq_socket, const CurveClient& client);
// Makes `zmq_socket` a CURVE server with `secret_key`, authenticated by the ZAP handler of its
// context under `zap_domain` (set before bind).
absl::Status ApplyCurveServer(void* zmq_socket, const std::string& secret_key,
                              const std::string& zap_domain);

// Loads the client side from files: NAME.key of this peer and the server's .pub (or .key).
// Both empty: a disabled CurveClient (plaintext). One of them empty: InvalidArgument naming
// `own_flag` / `server_flag`.
absl::StatusOr<CurveClient> LoadCurveClient(const std::string& own_key_path,
                                            const std::string& server_key_path,
                                            absl::string_view own_flag = "key",
                                            absl::string_view server_flag = "server_key");

}  // namespace kiln
