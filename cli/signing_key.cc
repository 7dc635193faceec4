#include "cli/signing_key.h"

#include <sys/stat.h>

#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cache/package.h"
#include "cache/package_signing.h"
#include "cache/redis_artifact_store.h"
#include "cache/shared_fs_store.h"
#include "cli/cluster_state.h"
#include "redis/redis_client.h"

namespace kiln::cli {
namespace {

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::string PublicPathFor(const std::string& key_path) {
  std::string base = key_path;
  if (absl::EndsWith(base, ".key")) base.resize(base.size() - 4);
  return base + ".pub";
}

int Error(Io& io, const absl::Status& s) {
  io.err << "kiln: error: " << s.message() << "\n";
  return absl::IsInvalidArgument(s) ? 2 : 1;
}

// The shared cache to revoke in: --shared-cache, else the local cluster's.
absl::StatusOr<std::unique_ptr<cache::ArtifactStore>> OpenShared(const CommandLine& cl) {
  std::string where = cl.Get("shared-cache");
  if (where.empty()) {
    auto state = LoadClusterState(cl.Get("state-dir", ".kiln/cluster"));
    if (!state.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "no --shared-cache given and no local cluster state: ", state.status().message()));
    }
    where = state->shared_cache;
  }
  if (redis::IsRedisUrl(where)) {
    cache::RedisArtifactStoreOptions o;
    o.url = where;
    auto s = cache::RedisArtifactStore::Open(o, nullptr);
    if (!s.ok()) return s.status();
    return std::unique_ptr<cache::ArtifactStore>(*std::move(s));
  }
  cache::SharedFsStoreOptions o;
  o.root = where;
  auto s = cache::SharedFsStore::Open(o);
  if (!s.ok()) return s.status();
  return std::unique_ptr<cache::ArtifactStore>(*std::move(s));
}

}  // namespace

std::string ClusterSigningKeyPath(const std::string& state_dir) {
  return state_dir + "/keys/package-signing.key";
}
std::string ClusterTrustDir(const std::string& state_dir) { return state_dir + "/keys/trusted"; }

absl::Status EnsureClusterSigningKey(const std::string& state_dir) {
  const std::string key_path = ClusterSigningKeyPath(state_dir);
  if (Exists(key_path)) {
    auto key = cache::SigningKey::Read(key_path);
    if (!key.ok()) return key.status();
    if (!Exists(ClusterTrustDir(state_dir) + "/cluster.pub")) {
      return key->Write(key_path, ClusterTrustDir(state_dir) + "/cluster.pub");
    }
    return absl::OkStatus();
  }
  ::mkdir((state_dir + "/keys").c_str(), 0700);
  return cache::SigningKey::Generate().Write(key_path, ClusterTrustDir(state_dir) + "/cluster.pub");
}

int CmdSigningKey(const CommandLine& cl, Io& io) {
  const std::vector<std::string>& p = cl.positional;
  const std::string action = p.empty() ? "" : p[0];
  if (action == "new" && p.size() == 2) {
    if (Exists(p[1])) {
      return Error(io, absl::AlreadyExistsError(
                           absl::StrCat(p[1], " exists; refusing to overwrite a signing key")));
    }
    const cache::SigningKey key = cache::SigningKey::Generate();
    if (auto s = key.Write(p[1], PublicPathFor(p[1])); !s.ok()) return Error(io, s);
    io.out << "signing key " << p[1] << " (secret, 0600; keep it on this host)\n"
           << "public key  " << PublicPathFor(p[1]) << " " << key.public_key_hex
           << " (copy it into every node's --trusted_keys directory)\n";
    return 0;
  }
  if (action == "sign" && p.size() == 3) {
    auto key = cache::SigningKey::Read(p[1]);
    if (!key.ok()) return Error(io, key.status());
    std::string dir = p[2];
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    auto manifest = cache::PackageManifest::FromFile(dir + "/manifest.json");
    if (!manifest.ok()) return Error(io, manifest.status());
    if (auto s = cache::SignPackageDir(dir, manifest->digest, *key); !s.ok()) return Error(io, s);
    io.out << "signed " << dir << " (" << manifest->key.component << ") with "
           << key->public_key_hex.substr(0, 16) << "…\n";
    return 0;
  }
  if (action == "revoke" && p.size() == 3 && (p[1] == "key" || p[1] == "package")) {
    std::string value = p[2];
    if (p[1] == "key" && Exists(value)) {
      auto pub = cache::ReadPublicKeyFile(value);
      if (!pub.ok()) return Error(io, pub.status());
      value = *pub;
    }
    const std::string entry = absl::StrCat(p[1], " ", value);
    if (auto s = cache::Revocations::CheckEntry(entry); !s.ok()) return Error(io, s);
    auto shared = OpenShared(cl);
    if (!shared.ok()) return Error(io, shared.status());
    if (auto s = (*shared)->AddRevocation(entry); !s.ok()) return Error(io, s);
    io.out << "revoked " << entry << " in " << (*shared)->Describe()
           << "; nodes refuse it before their next load and rebuild what it signed\n";
    return 0;
  }
  return Error(io, absl::InvalidArgumentError(
                       "usage: kiln signing-key new KEY | sign KEY PACKAGE_DIR | "
                       "revoke key PUB_FILE|HEX | revoke package SHA256 "
                       "[--shared-cache DIR|redis://...] [--state-dir DIR]"));
}

}  // namespace kiln::cli
