// ArtifactStore: a cache tier beyond the node (a shared filesystem now, Redis later) that holds
// whole package directories by key digest. A node fetches from it into its LocalDiskStore and
// publishes what it compiled to it. Every fetch is verified; a corrupt stored copy is refused
// (DataLoss), quarantined inside the store and reported, so the caller rebuilds it.
//
// CompileLease: cluster-wide single-flight compilation. The node that holds a digest's lease
// compiles it; the others wait for the package to appear. A lease expires unless renewed, so a
// crashed holder's lease lapses and a waiter takes it over.
//
// Implementations are thread-safe and safe across processes and hosts sharing the store.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cache/artifact_key.h"
#include "cache/local_disk_store.h"
#include "cache/package_signing.h"
#include "nlohmann/json.hpp"

namespace kiln::cache {

// Who holds a compile lease and until when. Serialized as the lease's JSON document.
struct LeaseInfo {
  std::string digest;           // the artifact key digest the lease is for
  std::string holder;           // node id of the holder
  int64_t pid = 0;              // holder's process id (for people; pids are per host)
  std::string host;             // holder's host name
  int64_t expires_unix_ms = 0;  // the lease lapses at this wall-clock time (ms since the epoch)
  std::string token;            // unique per acquisition; tells a lease from its successor

  nlohmann::json ToJson() const;
  // InvalidArgument naming the missing field.
  static absl::StatusOr<LeaseInfo> FromJson(const nlohmann::json& j);
};

struct LeaseRequest {
  std::string holder;     // node id
  int64_t ttl_ms = 0;     // lease lifetime from acquisition or last renewal (ms), > 0
};

// A held lease. Renew() and Release() may be called from different threads.
class CompileLease {
 public:
  // Releases the lease if it is still held (best effort).
  virtual ~CompileLease() = default;
  virtual const std::string& digest() const = 0;
  // Pushes the expiry to now + ttl. Aborted if the lease was lost (it expired and another node
  // took it over): the caller should finish but expect a duplicate compile. Other codes: I/O
  // errors (the caller may retry; the lease is still held until it expires).
  virtual absl::Status Renew() = 0;
  // Gives the lease up. OK if it was already lost or released.
  virtual absl::Status Release() = 0;
  // True if acquiring it broke an expired lease (its holder crashed or hung).
  virtual bool took_over() const = 0;
  // The lease as last written by this holder.
  virtual LeaseInfo info() const = 0;
};

struct FetchResult {
  LocatedPackage package;  // verified, in the local store
  int64_t bytes = 0;       // bytes copied from the store (0: the local store already had it)
};

class ArtifactStore {
 public:
  virtual ~ArtifactStore() = default;

  // Where the store is, for messages ("shared filesystem /mnt/kiln").
  virtual std::string Describe() const = 0;

  // True if an entry is stored under `digest` (a presence check, not verified). Unavailable or
  // another code if the store cannot be read.
  virtual absl::StatusOr<bool> Has(const std::string& digest) const = 0;

  // Copies the package for `key` into `local` atomically and verifies the copy (manifest is for
  // the key, package SHA-256 matches the manifest). NotFound if not stored. DataLoss if the stored
  // copy is corrupt: it has been moved to the store's quarantine, so the caller may rebuild and
  // republish it.
  virtual absl::StatusOr<FetchResult> Fetch(const ArtifactKey& key, LocalDiskStore& local) = 0;

  // Copies a verified local package into the store atomically. Publishing a digest the store
  // already holds is a no-op success.
  virtual absl::Status Publish(const LocatedPackage& package) = 0;

  // Takes the compile lease for `digest`. AlreadyExists (naming the holder and expiry) if another
  // live holder has it; an expired lease is broken and taken over (took_over() on the result).
  // Unimplemented if the store cannot coordinate compiles (then callers compile without one).
  virtual absl::StatusOr<std::unique_ptr<CompileLease>> TryAcquireLease(
      const std::string& digest, const LeaseRequest& request) = 0;

  // The cluster's revocation list (package_signing.h), read fresh on every call: nodes check it
  // before every load. A store that keeps none returns an empty list. Unavailable (or another
  // code) if the store cannot be read: callers then refuse to trust what they cannot check.
  virtual absl::StatusOr<Revocations> ReadRevocations() const { return Revocations{}; }
  // Appends one entry ("key <hex>" / "package <hex>") to the revocation list. InvalidArgument for
  // a malformed entry; Unimplemented if the store keeps no list.
  virtual absl::Status AddRevocation(const std::string& entry) {
    (void)entry;
    return absl::UnimplementedError(absl::StrCat(Describe(), " keeps no revocation list"));
  }
  // Takes the stored copy of `digest` out of service (moved to the store's quarantine or removed
  // and recorded), so it is rebuilt and republished. `reason` is kept for people. NotFound if
  // there is no such entry (already quarantined by someone else).
  virtual absl::Status Quarantine(const std::string& digest, const std::string& reason) {
    (void)digest;
    (void)reason;
    return absl::UnimplementedError(absl::StrCat(Describe(), " cannot quarantine"));
  }
};

}  // namespace kiln::cache
