// PackageProvider: the package for an artifact key, from the nearest tier that holds it.
// TieredPackageProvider walks node-local disk → shared store (optional; fetched into local disk)
// → compile (optional) under the shared store's cluster-wide compile lease, then publishes what
// it compiled to the shared store; if another node holds the lease it waits for that node's
// package instead. It reports where the package came from and what it cost, and counts every step
// in kiln_artifact_* metrics. The pipeline asks it for every package; a node gives it the
// cluster's shared store, kiln-run only a local directory and a compiler.
//
// Threads: Get() may be called from any number of threads. Calls for the same digest are
// serialized within the process (the second finds the first's result on local disk); calls for
// different digests run in parallel. While compiling under a lease one LeaseHeartbeat thread per
// compile renews it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "cache/artifact_key.h"
#include "cache/artifact_store.h"
#include "cache/compiler.h"
#include "cache/local_disk_store.h"
#include "cache/package_signing.h"
#include "common/clock.h"
#include "nlohmann/json.hpp"

namespace prometheus {
class Registry;
}

namespace kiln::cache {

struct ProvidedPackage {
  LocatedPackage package;    // always in the node-local store, verified
  std::string provenance;    // "local", "shared" or "compiled"
  double fetch_seconds = 0;  // copying from the shared tier (and verifying the copy)
  double compile_seconds = 0;
  double wait_seconds = 0;   // waiting for another node's compile of this key
  std::string warning;       // e.g. a corrupt copy was quarantined on the way
  absl::Status local_disk_error;  // internal to the provider: local disk full during a fetch
  // Keeps the package from being evicted from local disk while this lives: hold it until the
  // package is loaded. Must not outlive the provider.
  std::shared_ptr<PackagePin> pin;
};

// One package, and what it takes to build it if no tier holds it. The compile options travel with
// the request (the pipeline that computed key.compile from them owns them), so a provider never
// holds a second copy that could disagree with the key.
struct PackageRequest {
  ArtifactKey key;
  std::string model_dir;  // diffusers-layout repository to compile from on a miss
  // Passed to the compiler (kiln-compile --compile-options); must be a JSON object, and
  // key.compile its CompileOptionsDigest (the compiler checks the whole key's digest).
  nlohmann::json compile_options = DefaultCompileOptions();
};

class PackageProvider {
 public:
  virtual ~PackageProvider() = default;
  virtual absl::StatusOr<ProvidedPackage> Get(const PackageRequest& request) = 0;
  // True if Get() may compile (a node advertises it).
  virtual bool can_compile() const = 0;
  // Takes a package that Get() returned out of service because it could not be used: it failed
  // to load ("unloadable") or its canary disagreed ("canary"). Its local copy (and the shared
  // tier's, so no other node loads it) is quarantined and counted under `reason_label`; the next
  // Get() for the key rebuilds or refetches it. `why` is logged. Errors only for I/O trouble.
  virtual absl::Status Quarantine(const ArtifactKey& key, const std::string& reason_label,
                                  const std::string& why) {
    (void)key;
    (void)reason_label;
    (void)why;
    return absl::OkStatus();
  }
};

struct TieredOptions {
  // Compile-lease holder name, shown to waiting nodes. "" = "<hostname>:<pid>".
  std::string node_id;
  int64_t lease_ttl_ms = 600'000;   // a compile lease lapses this long after its last renewal (ms)
  int64_t lease_renew_ms = 0;       // renewal interval while compiling (ms); 0 = lease_ttl_ms / 3
  // Longest wait for another node's compile before Get() gives up with DeadlineExceeded (ms).
  int64_t max_wait_ms = 1'800'000;
  int64_t poll_initial_ms = 100;    // first pause between polls of the shared store (ms); doubles
  int64_t poll_max_ms = 5'000;      // longest pause between polls (ms)
  // Measures the wait deadline (NowMs). Null: the system clock. Must outlive the provider.
  const Clock* clock = nullptr;
  // Package signatures (cache/package_signing.h). With a trust set, Get() returns only packages
  // signed by one of its keys and revoked by neither the shared store's list nor
  // `revocation_file`; others are refused, quarantined (locally and in the shared tier) and
  // counted, and the next tier is tried. Null: signatures are not checked (development only;
  // callers log it).
  std::shared_ptr<const TrustSet> trust;
  // Signs what this provider compiles, before it is verified and published. Null: compiled
  // packages stay unsigned (refused wherever a trust set is in force).
  std::shared_ptr<const SigningKey> signer;
  // More revocations, read on every Get() ("" = none); for kiln-run and clusters without a
  // shared tier.
  std::string revocation_file;

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;
};

class TieredPackageProvider : public PackageProvider {
 public:
  // `local` is required. `shared` may be null (no shared tier: no fetch, no publish, no lease).
  // `compiler` may be null: a miss in every tier is then NotFound. `registry` may be null (the
  // metrics are then kept but not exposed). InvalidArgument for bad options or a null `local`.
  static absl::StatusOr<std::unique_ptr<TieredPackageProvider>> Create(
      std::unique_ptr<LocalDiskStore> local, std::unique_ptr<ArtifactStore> shared,
      std::unique_ptr<PackageCompiler> compiler, TieredOptions options,
      prometheus::Registry* registry);
  ~TieredPackageProvider() override;

  // OK: the verified package in the local store (provenance says from where).
  // InvalidArgument: a bad key, or compile_options not a JSON object.
  // NotFound: no tier holds it and compiling is disabled. DeadlineExceeded: another node held the
  // compile lease for longer than max_wait_ms. Compiler errors as the compiler returns them
  // (InvalidArgument, FailedPrecondition, Internal). Local I/O errors as they come.
  // Shared-store trouble (unreachable, corrupt copies, a failed publish) is not an error: it is
  // counted, logged, put in `warning`, and the provider falls through to the next tier.
  absl::StatusOr<ProvidedPackage> Get(const PackageRequest& request) override;
  bool can_compile() const override { return compiler_ != nullptr; }
  absl::Status Quarantine(const ArtifactKey& key, const std::string& reason_label,
                          const std::string& why) override;
  LocalDiskStore& local() { return *local_; }
  ArtifactStore* shared() { return shared_.get(); }  // null if none

 private:
  struct Metrics;
  struct Flight {
    absl::Mutex mu;
    int users = 0;  // guarded by flights_mu_
  };
  TieredPackageProvider(std::unique_ptr<LocalDiskStore> local,
                        std::unique_ptr<ArtifactStore> shared,
                        std::unique_ptr<PackageCompiler> compiler, TieredOptions options,
                        prometheus::Registry* registry);

  // Fetches from the shared store into local disk. True if `out` now holds the package; false on
  // a miss or a handled failure (counted, logged, added to out->warning).
  bool FetchFromShared(const ArtifactKey& key, const Revocations& revoked, ProvidedPackage* out);
  // Compiles `req` under the shared store's lease, or waits for the lease holder's package.
  absl::StatusOr<ProvidedPackage> CompileOrWait(const PackageRequest& req,
                                                const Revocations& revoked, ProvidedPackage out);
  // Compiles into local disk (renewing `lease` if given), publishes to the shared store, then
  // releases `lease`.
  absl::StatusOr<ProvidedPackage> CompileAndPublish(const PackageRequest& req,
                                                    CompileLease* lease,
                                                    const Revocations& revoked,
                                                    ProvidedPackage out);
  std::shared_ptr<Flight> JoinFlight(const std::string& digest);
  // The revocations in force now: the shared store's and revocation_file's. If the shared store
  // cannot be read, the last list read from it (logged); Unavailable if none was ever read.
  absl::StatusOr<Revocations> CurrentRevocations();
  // With a trust set: OK if `package` may be loaded. Otherwise it has been quarantined (locally,
  // and in the shared tier if `in_shared`), counted and logged, and the status is
  // PermissionDenied saying why. Other codes: I/O errors.
  absl::Status CheckTrust(const LocatedPackage& package, const Revocations& revoked,
                          bool in_shared);
  void LeaveFlight(const std::string& digest);

  const std::unique_ptr<LocalDiskStore> local_;
  const std::unique_ptr<ArtifactStore> shared_;
  const std::unique_ptr<PackageCompiler> compiler_;
  const TieredOptions options_;
  const std::string node_id_;
  const Clock* clock_;
  std::unique_ptr<Clock> owned_clock_;
  std::unique_ptr<Metrics> metrics_;

  absl::Mutex revocations_mu_;
  std::optional<Revocations> last_shared_revocations_ ABSL_GUARDED_BY(revocations_mu_);

  absl::Mutex flights_mu_;
  std::map<std::string, std::shared_ptr<Flight>> flights_ ABSL_GUARDED_BY(flights_mu_);
};

// The tiers as kiln-run and a node build them: node-local disk, an optional shared directory,
// an optional kiln-compile.
struct TieredProviderConfig {
  LocalDiskStoreOptions local;  // root required
  std::string shared_root;      // "" = no shared tier; a directory, or redis://HOST:PORT/DB
  std::string shared_host;      // host written into compile leases ("" = gethostname())
  std::string compiler_path;    // kiln-compile executable; "" = never compile (a miss is NotFound)
  // Comma list of .pub files / directories (TrustSet::Load); "" = signatures not checked.
  std::string trusted_keys;
  std::string signing_key;      // signing key file (SigningKey::Read); "" = compiles unsigned
  TieredOptions tiered;         // its clock is the shared store's too
};

// Opens the stores and the compiler and makes the provider; errors as the stores report them.
absl::StatusOr<std::unique_ptr<TieredPackageProvider>> OpenTieredProvider(
    TieredProviderConfig config, prometheus::Registry* registry);

}  // namespace kiln::cache
