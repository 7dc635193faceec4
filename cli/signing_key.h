// Package signing keys for a local cluster and for operators: `kiln signing-key new KEY` (an
// ed25519 key pair, secret 0600, KEY.pub beside it), `kiln signing-key sign KEY PACKAGE_DIR`
// (signs a package directory, e.g. packages copied in from elsewhere after checking them),
// `kiln signing-key revoke key PUB|HEX` / `revoke package SHA256` (appends to the cluster's
// revocation list in its shared cache). `kiln up` calls EnsureClusterSigningKey so every node of
// a local cluster signs what it compiles and trusts only the cluster's key.
// Named signing-key, not keys: `kiln keys` is the transport (CURVE) keys' command.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "cli/args.h"
#include "cli/commands.h"

namespace kiln::cli {

// STATE/keys/package-signing.key and STATE/keys/trusted/ (holding cluster.pub).
std::string ClusterSigningKeyPath(const std::string& state_dir);
std::string ClusterTrustDir(const std::string& state_dir);

// Makes the cluster's signing key and trust set under `state_dir` unless the key exists (an
// existing key is kept: packages it signed stay valid across `kiln down` / `kiln up`).
absl::Status EnsureClusterSigningKey(const std::string& state_dir);

int CmdSigningKey(const CommandLine& cl, Io& io);

}  // namespace kiln::cli
