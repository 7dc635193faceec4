// Node-local package directory: ROOT/<digest>/{model.pt2, manifest.json[, constants.safetensors]}
// as kiln-compile writes it. Every Find() verifies the manifest against the key and the package
// against its SHA-256 before anyone loads it (a package is a shared library, i.e. code); a
// corrupt entry is moved to ROOT/quarantine/ so it can be rebuilt.
//
// Size bound: with max_bytes set, every Insert()/Admit() evicts least-recently-used packages until
// the packages under ROOT fit, never one that is pinned (Pin(): a caller between Get and load) or
// the one just added. Last use is kept in ROOT/.last_used/<digest> (its mtime, set explicitly from
// the injected clock, so it does not depend on atime or on mount options); an unbounded store
// writes no bookkeeping (its root holds only packages, and quarantine/ if something was corrupt).
//
// The TieredPackageProvider owns one per node; tools and tests may open a root directly. Thread-
// safe. A root belongs to one process at a time as far as pins go (pins are in memory); other
// processes may read and insert concurrently (every change is a rename), but could lose a package
// they are reading to an eviction.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "cache/artifact_key.h"
#include "cache/package.h"
#include "common/clock.h"

namespace prometheus {
class Registry;
class Counter;
class Gauge;
}  // namespace prometheus

namespace kiln::cache {

struct LocalDiskStoreOptions {
  std::string root;        // directory of packages; created if missing
  // Bound on BytesUsed() (bytes of packages and quarantined copies under root); 0 = unbounded.
  int64_t max_bytes = 0;
  // Source of last-use timestamps (UnixMs). Null: the system clock. Must outlive the store.
  const Clock* clock = nullptr;

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;
};

class LocalDiskStore;

// Keeps one digest from being evicted while it lives. Obtained from LocalDiskStore::Pin(); must not
// outlive the store.
class PackagePin {
 public:
  ~PackagePin();
  PackagePin(const PackagePin&) = delete;
  PackagePin& operator=(const PackagePin&) = delete;
  const std::string& digest() const { return digest_; }

 private:
  friend class LocalDiskStore;
  PackagePin(LocalDiskStore* store, std::string digest)
      : store_(store), digest_(std::move(digest)) {}
  LocalDiskStore* store_;
  std::string digest_;
};

// What Insert() did.
struct InsertResult {
  LocatedPackage package;  // verified, in this store
  int64_t bytes = 0;       // bytes copied (0 if an identical entry was already there)
};

class LocalDiskStore {
 public:
  // Validates `options`, creates the root. `registry` (nullable) receives
  // kiln_artifact_local_bytes and kiln_artifact_evictions_total.
  static absl::StatusOr<std::unique_ptr<LocalDiskStore>> Open(LocalDiskStoreOptions options,
                                                              prometheus::Registry* registry);
  // An unbounded store over `root` with the system clock and no metrics (tools, tests). Does no
  // I/O; Find() on a missing root is a miss.
  explicit LocalDiskStore(std::string root);
  ~LocalDiskStore();

  // NotFound if no package is stored for `key`. DataLoss if one is stored but fails
  // verification; it has then been quarantined and the caller may rebuild it. Marks the entry
  // used (LRU).
  absl::StatusOr<LocatedPackage> Find(const ArtifactKey& key) const;

  // Copies the package directory `source_dir` (another tier's copy) into the store: staged under a
  // temporary name in ROOT, fsynced, verified against `key`, renamed to ROOT/<digest>; then the
  // size bound is enforced. DataLoss if the copy fails verification (the source is corrupt; the
  // caller quarantines it at the source); NotFound if the source is gone. If the store already holds
  // a good entry for the key it is kept and returned (bytes = 0).
  absl::StatusOr<InsertResult> Insert(const ArtifactKey& key, const std::string& source_dir);

  // For a package written into ROOT/<digest> by someone else (kiln-compile): marks it used and
  // enforces the size bound, keeping `digest`.
  void Admit(const std::string& digest);

  // Pins `digest` against eviction until the returned pin is destroyed. Pins count.
  std::unique_ptr<PackagePin> Pin(const std::string& digest);
  bool IsPinned(const std::string& digest) const;

  // Digests with an entry under ROOT (not verified), oldest use first.
  std::vector<std::string> List() const;
  // Bytes the bound counts: package entries and quarantined copies (not staging directories).
  int64_t BytesUsed() const;

  std::string DirFor(const std::string& digest) const { return root_ + "/" + digest; }
  const std::string& root() const { return root_; }
  int64_t max_bytes() const { return max_bytes_; }

 private:
  friend class PackagePin;
  LocalDiskStore(LocalDiskStoreOptions options, prometheus::Registry* registry);
  void Unpin(const std::string& digest);
  void MarkUsed(const std::string& digest) const;
  int64_t LastUsedMs(const std::string& digest) const;
  // Evicts quarantined copies, then LRU entries (never pinned ones or `keep`), until the bound
  // holds; updates the bytes gauge. Best effort: logs when pinned entries alone exceed the bound.
  void EnforceBound(const std::string& keep);
  // Removes staging directories left by crashed copies or compiles (older than a day).
  void SweepStaging() const;

  const std::string root_;
  const int64_t max_bytes_;
  const Clock* clock_;
  std::unique_ptr<Clock> owned_clock_;
  prometheus::Counter* evictions_ = nullptr;  // owned by the registry
  prometheus::Gauge* bytes_gauge_ = nullptr;  // owned by the registry

  mutable absl::Mutex mu_;
  std::map<std::string, int> pins_ ABSL_GUARDED_BY(mu_);
  // Serializes eviction passes (a pass takes mu_ only around each pin check + rename).
  absl::Mutex evict_mu_;
};

}  // namespace kiln::cache
