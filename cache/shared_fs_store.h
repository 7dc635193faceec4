// SharedFsStore: the shared-filesystem tier. One directory that every node mounts (NFS, a cluster
// filesystem, or a plain local directory for a one-host cluster), laid out like a LocalDiskStore:
//
//   ROOT/<digest>/{model.pt2, manifest.json[, constants.safetensors]}   published packages
//   ROOT/.tmp-<digest12>-<token>/                                       publishes in flight
//   ROOT/quarantine/<digest>-<unix ms>-<token>/                         corrupt copies, for people
//   ROOT/leases/<digest>.lease                                          compile leases (JSON)
//   ROOT/leases/<digest>.lease.break                                    takeover in progress
//   ROOT/revoked.txt                                                    revoked keys and packages
//
// Publishing stages a copy under a temporary name, fsyncs it, verifies it and renames it into
// place: readers see a whole package or none. Entries are immutable once published.
//
// Leases: acquiring writes the lease JSON to a temporary file and link()s it to
// leases/<digest>.lease; link fails with EEXIST if the name exists, atomically (also on NFS), and
// a reader never sees a half-written lease. Renewal rewrites it (temporary file + rename) after
// checking that the token is still ours and the lease has not expired. An expired lease is taken
// over by one waiter: it takes leases/<digest>.lease.break (created the same way, itself expiring
// after 30 s so a breaker that dies there blocks nothing for long), checks again that the lease
// is the expired one it judged, and rename()s its own lease over it. The lease name never
// vanishes during a takeover, so no third node can slip in, and two waiters cannot both take
// over. Release renames the lease aside and deletes it only if it is still ours (a successor's is
// put back). Expiry compares wall clocks of different hosts: keep them in sync (NTP) to well
// under the lease ttl.
//
// Thread-safe; safe across processes and hosts. The store must outlive the leases it hands out.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/artifact_store.h"
#include "common/clock.h"

namespace kiln::cache {

struct SharedFsStoreOptions {
  std::string root;  // the shared directory; created if missing
  std::string host;  // host name written into leases; "" = gethostname()
  // Wall clock for lease expiry (UnixMs). Null: the system clock. Must outlive the store.
  const Clock* clock = nullptr;

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;
};

class SharedFsStore : public ArtifactStore {
 public:
  // Validates `options` and creates ROOT and ROOT/leases. PermissionDenied / Unavailable / ... if
  // the directory cannot be created.
  static absl::StatusOr<std::unique_ptr<SharedFsStore>> Open(SharedFsStoreOptions options);

  std::string Describe() const override;
  absl::StatusOr<bool> Has(const std::string& digest) const override;
  absl::StatusOr<FetchResult> Fetch(const ArtifactKey& key, LocalDiskStore& local) override;
  absl::Status Publish(const LocatedPackage& package) override;
  absl::StatusOr<std::unique_ptr<CompileLease>> TryAcquireLease(
      const std::string& digest, const LeaseRequest& request) override;
  // ROOT/revoked.txt (package_signing.h's format); no file = nothing revoked.
  absl::StatusOr<Revocations> ReadRevocations() const override;
  // Appends a line to ROOT/revoked.txt (O_APPEND, fsynced: safe for concurrent writers).
  absl::Status AddRevocation(const std::string& entry) override;
  // Moves ROOT/<digest> to ROOT/quarantine/.
  absl::Status Quarantine(const std::string& digest, const std::string& reason) override;

  // The lease on `digest` as stored (expired or not). NotFound if there is none, DataLoss if the
  // file is not a lease document. For tools and tests.
  absl::StatusOr<LeaseInfo> ReadLease(const std::string& digest) const;

  std::string DirFor(const std::string& digest) const { return root_ + "/" + digest; }
  std::string LeasePath(const std::string& digest) const;
  const std::string& root() const { return root_; }

 private:
  SharedFsStore(SharedFsStoreOptions options);
  // Replaces the expired lease at `path` (carrying `stale_token`; "" = unreadable) with the lease
  // file `new_lease`, under the lease's break lock. True if replaced; false if the lease changed
  // meanwhile (`new_lease` is then removed). AlreadyExists if another waiter is taking it over.
  absl::StatusOr<bool> ReplaceExpiredLease(const std::string& path, const std::string& stale_token,
                                           const std::string& new_lease,
                                           const std::string& holder);

  const std::string root_;
  const std::string leases_dir_;
  const std::string host_;
  const Clock* clock_;
  std::unique_ptr<Clock> owned_clock_;
};

}  // namespace kiln::cache
