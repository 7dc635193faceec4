// RedisArtifactStore: the shared package tier in Redis, for clusters without a shared filesystem
// (`--shared_cache redis://HOST:PORT/DB`). Same contract as SharedFsStore (artifact_store.h):
// whole packages by digest, every fetch verified, a corrupt stored copy refused (DataLoss),
// removed from the index and counted so the caller rebuilds it, cluster-wide single-flight
// compiles under expiring leases. Redis runs every expiry, so no clock agreement between hosts is
// needed (the leases of SharedFsStore compare wall clocks).
//
// Keys (P = key_prefix):
//   P:pkg:<digest>                         hash {files: JSON [{name, bytes, sha256, chunks}],
//                                          upload, published_unix_ms}: the index entry, written
//                                          last, by one script, after every chunk is in place
//   P:blob:<digest>:<upload>:<file>:<i>    chunk i (chunk_bytes) of one file of one upload
//   P:index                                set of published digests (for tools)
//   P:lease:<digest>                       "<token> <LeaseInfo JSON>", SET NX PX ttl
//   P:lease-held:<digest>                  token of the last acquisition not released (took_over)
//   P:corrupt                              list of "<digest> <unix ms> <reason>" (for people)
//   P:revoked                              set of "key <hex>" / "package <hex>" (package_signing.h)
//
// Publish uploads chunks under a fresh upload token with a TTL (a publisher that dies mid-upload
// leaves nothing that lasts), then one script makes them permanent and writes the index entry
// unless another publisher won (its chunks are then deleted). Fetch reads the index entry, streams
// each file's chunks into a staging directory in the local store's root, checks each file's size
// and SHA-256 against the index, and inserts it into the LocalDiskStore (which verifies manifest
// and package SHA-256 again). Leases: acquire is SET NX PX; renew (PEXPIRE) and release (DEL) run
// in Lua and act only if the token is still ours.
//
// Thread-safe (one RedisClient, commands serialized); safe across processes and hosts. The store
// must outlive the leases it hands out. Metrics (registry passed in):
// kiln_artifact_redis_corrupt_total (stored copies refused), and the client's kiln_redis_*
// (client="artifact_store").
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/artifact_store.h"
#include "common/clock.h"
#include "prometheus/counter.h"
#include "prometheus/registry.h"
#include "redis/redis_client.h"

namespace kiln::cache {

struct RedisArtifactStoreOptions {
  std::string url;                    // redis://HOST:PORT/DB
  std::string key_prefix = "kiln:cache";
  int64_t chunk_bytes = 4 << 20;      // bytes per blob chunk (Redis strings stay small)
  int64_t upload_ttl_ms = 3600'000;   // ms unpublished chunks live (a publisher that died)
  int64_t command_timeout_ms = 10'000;  // ms per Redis command (chunks are megabytes)
  std::string host;                   // host name written into leases; "" = gethostname()
  // Wall clock for the informational LeaseInfo::expires_unix_ms. Null: the system clock.
  const Clock* clock = nullptr;

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;
};

class RedisArtifactStore : public ArtifactStore {
 public:
  // Validates `options`; does not contact Redis. `registry` may be null (a private one).
  static absl::StatusOr<std::unique_ptr<RedisArtifactStore>> Open(
      RedisArtifactStoreOptions options, prometheus::Registry* registry);

  std::string Describe() const override;
  absl::StatusOr<bool> Has(const std::string& digest) const override;
  absl::StatusOr<FetchResult> Fetch(const ArtifactKey& key, LocalDiskStore& local) override;
  absl::Status Publish(const LocatedPackage& package) override;
  absl::StatusOr<std::unique_ptr<CompileLease>> TryAcquireLease(
      const std::string& digest, const LeaseRequest& request) override;
  // The set P:revoked (members "key <hex>" / "package <hex>").
  absl::StatusOr<Revocations> ReadRevocations() const override;
  absl::Status AddRevocation(const std::string& entry) override;
  // Removes the entry and its chunks and records why in P:corrupt.
  absl::Status Quarantine(const std::string& digest, const std::string& reason) override;

  // Key names, for tools and tests.
  std::string PackageKey(const std::string& digest) const;
  std::string LeaseKey(const std::string& digest) const;
  redis::RedisClient& client() { return *client_; }

 private:
  RedisArtifactStore(RedisArtifactStoreOptions options,
                     std::unique_ptr<redis::RedisClient> client, prometheus::Registry& registry);
  // Removes the index entry of `digest` if it still names `upload` (and its chunks), and records
  // why. Returns what to tell the caller.
  absl::Status RefuseCorrupt(const std::string& digest, const std::string& upload,
                             const std::string& reason);

  const RedisArtifactStoreOptions options_;
  const std::string host_;
  std::unique_ptr<Clock> owned_clock_;
  const Clock* clock_;
  std::shared_ptr<prometheus::Registry> owned_registry_;
  const std::unique_ptr<redis::RedisClient> client_;
  prometheus::Counter& corrupt_;
};

}  // namespace kiln::cache
