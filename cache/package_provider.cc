#include "cache/package_provider.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cache/lease_heartbeat.h"
#include "cache/package_dir.h"
#include "cache/redis_artifact_store.h"
#include "cache/shared_fs_store.h"
#include "common/stopwatch.h"
#include "metrics/metrics_server.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "common/log.h"

namespace kiln::cache {
namespace {

std::string DefaultNodeId() {
  return absl::StrCat(HostName(), ":", ::getpid());
}

void AddWarning(ProvidedPackage* out, const std::string& w) {
  out->warning = out->warning.empty() ? w : absl::StrCat(out->warning, "; ", w);
}

}  // namespace

// The cache component's metrics, created from the registry it was given.
struct TieredPackageProvider::Metrics {
  explicit Metrics(prometheus::Registry* registry) {
    if (registry == nullptr) {
      owned = std::make_shared<prometheus::Registry>();
      registry = owned.get();
    }
    requests = &prometheus::BuildCounter()
                    .Name("kiln_artifact_requests_total")
                    .Help("Package lookups per cache tier (local, shared, compile) and result "
                          "(hit, miss, corrupt, error). For tier=compile, hit = compiled.")
                    .Register(*registry);
    for (const char* tier : {"local", "shared", "compile"}) {
      for (const char* result : {"hit", "miss", "corrupt", "error"}) Request(tier, result);
    }
    auto& compiles = prometheus::BuildCounter()
                         .Name("kiln_artifact_compiles_total")
                         .Help("Package compiles run by this process, by result")
                         .Register(*registry);
    compiles_ok = &compiles.Add({{"result", "ok"}});
    compiles_error = &compiles.Add({{"result", "error"}});
    compile_seconds = &prometheus::BuildHistogram()
                           .Name("kiln_artifact_compile_seconds")
                           .Help("Wall time of successful package compiles")
                           .Register(*registry)
                           .Add({}, metrics::DurationBuckets());
    fetch_bytes = &prometheus::BuildCounter()
                       .Name("kiln_artifact_fetch_bytes_total")
                       .Help("Bytes copied from the shared tier to node-local disk")
                       .Register(*registry)
                       .Add({});
    fetch_seconds = &prometheus::BuildHistogram()
                         .Name("kiln_artifact_fetch_seconds")
                         .Help("Wall time of package fetches from the shared tier (copy + verify)")
                         .Register(*registry)
                         .Add({}, metrics::DurationBuckets());
    lease_waits = &prometheus::BuildCounter()
                       .Name("kiln_artifact_lease_waits_total")
                       .Help("Lookups that waited for another node's compile of the same key")
                       .Register(*registry)
                       .Add({});
    lease_takeovers = &prometheus::BuildCounter()
                           .Name("kiln_artifact_lease_takeovers_total")
                           .Help("Expired compile leases (crashed or hung holder) taken over")
                           .Register(*registry)
                           .Add({});
    auto& publishes = prometheus::BuildCounter()
                          .Name("kiln_artifact_publishes_total")
                          .Help("Compiled packages published to the shared tier, by result")
                          .Register(*registry);
    publishes_ok = &publishes.Add({{"result", "ok"}});
    publishes_error = &publishes.Add({{"result", "error"}});
    refused = &prometheus::BuildCounter()
                   .Name("kiln_artifact_refused_total")
                   .Help("Packages refused and quarantined, by reason: unsigned, bad_signature, "
                         "untrusted, revoked_key, revoked_package (signature checks), "
                         "unloadable (verified but failed to load), canary (wrong output)")
                   .Register(*registry);
    for (const char* r : {"unsigned", "bad_signature", "untrusted", "revoked_key",
                          "revoked_package", "unloadable", "canary"}) {
      refused->Add({{"reason", r}});
    }
    canary_failures = &prometheus::BuildCounter()
                           .Name("kiln_artifact_canary_failures_total")
                           .Help("Loaded packages whose canary output disagreed with the one "
                                 "recorded at compile time (quarantined)")
                           .Register(*registry)
                           .Add({});
  }

  prometheus::Counter& Request(const std::string& tier, const std::string& result) {
    return requests->Add({{"tier", tier}, {"result", result}});
  }

  std::shared_ptr<prometheus::Registry> owned;  // only when no registry was passed in
  prometheus::Family<prometheus::Counter>* requests;
  prometheus::Counter* compiles_ok;
  prometheus::Counter* compiles_error;
  prometheus::Histogram* compile_seconds;
  prometheus::Counter* fetch_bytes;
  prometheus::Histogram* fetch_seconds;
  prometheus::Counter* lease_waits;
  prometheus::Counter* lease_takeovers;
  prometheus::Counter* publishes_ok;
  prometheus::Counter* publishes_error;
  prometheus::Family<prometheus::Counter>* refused;
  prometheus::Counter* canary_failures;
};

absl::Status TieredOptions::Validate() const {
  if (lease_ttl_ms <= 0) {
    return absl::InvalidArgumentError("tiered provider: lease_ttl_ms must be > 0");
  }
  if (lease_renew_ms < 0 || lease_renew_ms >= lease_ttl_ms) {
    return absl::InvalidArgumentError(
        "tiered provider: lease_renew_ms must be >= 0 (0 = ttl/3) and < lease_ttl_ms");
  }
  if (max_wait_ms < 0) return absl::InvalidArgumentError("tiered provider: max_wait_ms must be >= 0");
  if (poll_initial_ms <= 0) {
    return absl::InvalidArgumentError("tiered provider: poll_initial_ms must be > 0");
  }
  if (poll_max_ms < poll_initial_ms) {
    return absl::InvalidArgumentError("tiered provider: poll_max_ms must be >= poll_initial_ms");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TieredPackageProvider>> TieredPackageProvider::Create(
    std::unique_ptr<LocalDiskStore> local, std::unique_ptr<ArtifactStore> shared,
    std::unique_ptr<PackageCompiler> compiler, TieredOptions options,
    prometheus::Registry* registry) {
  if (local == nullptr) return absl::InvalidArgumentError("tiered provider: local store is null");
  if (auto s = options.Validate(); !s.ok()) return s;
  return std::unique_ptr<TieredPackageProvider>(new TieredPackageProvider(
      std::move(local), std::move(shared), std::move(compiler), std::move(options), registry));
}

TieredPackageProvider::TieredPackageProvider(std::unique_ptr<LocalDiskStore> local,
                                             std::unique_ptr<ArtifactStore> shared,
                                             std::unique_ptr<PackageCompiler> compiler,
                                             TieredOptions options,
                                             prometheus::Registry* registry)
    : local_(std::move(local)),
      shared_(std::move(shared)),
      compiler_(std::move(compiler)),
      options_(std::move(options)),
      node_id_(options_.node_id.empty() ? DefaultNodeId() : options_.node_id),
      clock_(options_.clock),
      metrics_(std::make_unique<Metrics>(registry)) {
  if (clock_ == nullptr) {
    owned_clock_ = std::make_unique<SystemClock>();
    clock_ = owned_clock_.get();
  }
}

TieredPackageProvider::~TieredPackageProvider() = default;

std::shared_ptr<TieredPackageProvider::Flight> TieredPackageProvider::JoinFlight(
    const std::string& digest) {
  absl::MutexLock l(&flights_mu_);
  auto& f = flights_[digest];
  if (f == nullptr) f = std::make_shared<Flight>();
  ++f->users;
  return f;
}

void TieredPackageProvider::LeaveFlight(const std::string& digest) {
  absl::MutexLock l(&flights_mu_);
  auto it = flights_.find(digest);
  if (it != flights_.end() && --it->second->users == 0) flights_.erase(it);
}

absl::StatusOr<ProvidedPackage> TieredPackageProvider::Get(const PackageRequest& request) {
  const ArtifactKey& key = request.key;
  if (auto s = key.Validate(); !s.ok()) return s;
  if (!request.compile_options.is_object()) {
    return absl::InvalidArgumentError("package request: compile_options must be a JSON object");
  }
  const std::string digest = key.Digest();
  // Same digest, same process: one lookup at a time; the next one finds the result locally.
  std::shared_ptr<Flight> flight = JoinFlight(digest);
  absl::MutexLock flight_lock(&flight->mu);
  struct Leave {
    TieredPackageProvider* p;
    const std::string& d;
    ~Leave() { p->LeaveFlight(d); }
  } leave{this, digest};

  ProvidedPackage out;
  out.pin = local_->Pin(digest);
  Revocations revoked;
  if (options_.trust != nullptr) {
    auto current = CurrentRevocations();
    if (!current.ok()) return current.status();
    revoked = *std::move(current);
  }
  auto found = local_->Find(key);
  if (found.ok()) {
    auto trusted = CheckTrust(*found, revoked, /*in_shared=*/false);
    if (trusted.ok()) {
      metrics_->Request("local", "hit").Increment();
      out.package = *std::move(found);
      out.provenance = "local";
      return out;
    }
    if (!absl::IsPermissionDenied(trusted)) return trusted;
    AddWarning(&out, std::string(trusted.message()));
  } else if (absl::IsNotFound(found.status())) {
    metrics_->Request("local", "miss").Increment();
  } else if (absl::IsDataLoss(found.status())) {
    metrics_->Request("local", "corrupt").Increment();
    AddWarning(&out, std::string(found.status().message()));
  } else {
    metrics_->Request("local", "error").Increment();
    return found.status();
  }
  if (shared_ != nullptr) {
    if (FetchFromShared(key, revoked, &out)) return out;
    // A full local disk fails the copy and would fail a compile too: say so now.
    if (!out.local_disk_error.ok()) return out.local_disk_error;
  }
  return CompileOrWait(request, revoked, std::move(out));
}

absl::StatusOr<Revocations> TieredPackageProvider::CurrentRevocations() {
  Revocations out;
  if (!options_.revocation_file.empty()) {
    std::string text;
    if (FILE* f = std::fopen(options_.revocation_file.c_str(), "r")) {
      char buf[4096];
      size_t n;
      while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, n);
      std::fclose(f);
    } else if (errno != ENOENT) {
      return absl::UnavailableError(absl::StrCat("cannot read revocations ",
                                                 options_.revocation_file, ": ",
                                                 std::strerror(errno)));
    }
    auto parsed = Revocations::Parse(text);
    if (!parsed.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat(options_.revocation_file, ": ", parsed.status().message()));
    }
    out.Merge(*parsed);
  }
  if (shared_ == nullptr) return out;
  auto shared = shared_->ReadRevocations();
  absl::MutexLock l(&revocations_mu_);
  if (shared.ok()) {
    last_shared_revocations_ = *shared;
    out.Merge(*shared);
    return out;
  }
  if (!last_shared_revocations_) {
    return absl::UnavailableError(absl::StrCat(
        "cannot read the revocation list of ", shared_->Describe(), " (",
        shared.status().message(), "); refusing to load packages until it can be checked"));
  }
  kiln::LogWarning("cache", absl::StrCat("revocation list of ", shared_->Describe(),
                                         " unreadable, using the last one read: ",
                                         shared.status().ToString()));
  out.Merge(*last_shared_revocations_);
  return out;
}

absl::Status TieredPackageProvider::CheckTrust(const LocatedPackage& package,
                                               const Revocations& revoked, bool in_shared) {
  if (options_.trust == nullptr) return absl::OkStatus();
  const std::string& digest = package.manifest.digest;
  auto check = VerifyPackageSignature(package.dir, digest, package.manifest.package_sha256,
                                      *options_.trust, revoked);
  if (!check.ok()) return check.status();
  if (check->ok()) return absl::OkStatus();
  metrics_->refused->Add({{"reason", RefusalLabel(check->refusal)}}).Increment();
  const std::string why =
      absl::StrCat("refused package ", digest.substr(0, 12), " (", package.manifest.key.component,
                   "): ", check->reason);
  auto q = QuarantinePackageDir(local_->root(), digest, why);
  std::string where = q.ok() ? absl::StrCat("quarantined to ", *q) : "already gone";
  if (in_shared && shared_ != nullptr) {
    if (auto s = shared_->Quarantine(digest, why); s.ok()) {
      absl::StrAppend(&where, " and in ", shared_->Describe());
    } else if (!absl::IsNotFound(s)) {
      kiln::LogWarning("cache", absl::StrCat("quarantining ", digest.substr(0, 12), " in ",
                                             shared_->Describe(), ": ", s.ToString()));
    }
  }
  kiln::LogWarning("cache", absl::StrCat(why, "; ", where, "; rebuilding it"));
  return absl::PermissionDeniedError(why);
}

absl::Status TieredPackageProvider::Quarantine(const ArtifactKey& key,
                                               const std::string& reason_label,
                                               const std::string& why) {
  const std::string digest = key.Digest();
  metrics_->refused->Add({{"reason", reason_label}}).Increment();
  if (reason_label == "canary") metrics_->canary_failures->Increment();
  const std::string reason = absl::StrCat(reason_label, ": ", why);
  // QuarantinePackageDir logs each copy it moves; a copy already gone is someone else's work.
  auto q = QuarantinePackageDir(local_->root(), digest, reason);
  if (!q.ok() && !absl::IsNotFound(q.status())) return q.status();
  if (shared_ != nullptr) {
    if (auto s = shared_->Quarantine(digest, reason); !s.ok() && !absl::IsNotFound(s) &&
                                                       !absl::IsUnimplemented(s)) {
      kiln::LogWarning("cache", absl::StrCat("quarantining ", digest.substr(0, 12), " in ",
                                             shared_->Describe(), ": ", s.ToString()));
    }
  }
  return absl::OkStatus();
}

bool TieredPackageProvider::FetchFromShared(const ArtifactKey& key, const Revocations& revoked,
                                            ProvidedPackage* out) {
  const auto t = SteadyNow();
  auto fetched = shared_->Fetch(key, *local_);
  if (fetched.ok()) {
    if (auto trusted = CheckTrust(fetched->package, revoked, /*in_shared=*/true); !trusted.ok()) {
      metrics_->Request("shared", absl::IsPermissionDenied(trusted) ? "corrupt" : "error")
          .Increment();
      AddWarning(out, std::string(trusted.message()));
      return false;
    }
    const double secs = SecondsSince(t);
    metrics_->Request("shared", "hit").Increment();
    metrics_->fetch_bytes->Increment(static_cast<double>(fetched->bytes));
    metrics_->fetch_seconds->Observe(secs);
    out->package = std::move(fetched->package);
    out->provenance = "shared";
    out->fetch_seconds += secs;
    return true;
  }
  if (absl::IsNotFound(fetched.status())) {
    metrics_->Request("shared", "miss").Increment();
  } else if (absl::IsResourceExhausted(fetched.status())) {
    // Only writing can run out of space: the node-local copy, not the shared store.
    metrics_->Request("local", "error").Increment();
    out->local_disk_error = fetched.status();
  } else if (absl::IsDataLoss(fetched.status())) {
    metrics_->Request("shared", "corrupt").Increment();
    kiln::LogWarning("cache", absl::StrCat(fetched.status().message(), "; rebuilding it"));
    AddWarning(out, std::string(fetched.status().message()));
  } else {
    metrics_->Request("shared", "error").Increment();
    kiln::LogWarning("cache", absl::StrCat("fetching ", key.Digest().substr(0, 12), " from ",
                                           shared_->Describe(), ": ", fetched.status().ToString()));
    AddWarning(out, absl::StrCat(shared_->Describe(), " unavailable: ", fetched.status().message()));
  }
  return false;
}

absl::StatusOr<ProvidedPackage> TieredPackageProvider::CompileOrWait(const PackageRequest& req,
                                                                     const Revocations& revoked,
                                                                     ProvidedPackage out) {
  const ArtifactKey& key = req.key;
  const std::string digest = key.Digest();
  if (compiler_ == nullptr) {
    return absl::NotFoundError(absl::StrCat(
        "no package for ", key.component, " (", digest, ") on local disk",
        shared_ != nullptr ? absl::StrCat(" or in ", shared_->Describe()) : std::string(),
        ", and compiling is disabled"));
  }
  if (shared_ == nullptr) return CompileAndPublish(req, nullptr, revoked, std::move(out));

  const LeaseRequest request{node_id_, options_.lease_ttl_ms};
  const int64_t deadline_ms = clock_->NowMs() + options_.max_wait_ms;
  int64_t pause_ms = options_.poll_initial_ms;
  std::optional<SteadyTime> wait_start;
  auto finish_wait = [&] {
    if (wait_start) out.wait_seconds = SecondsSince(*wait_start);
  };
  while (true) {
    auto lease = shared_->TryAcquireLease(digest, request);
    if (lease.ok()) {
      if ((*lease)->took_over()) {
        metrics_->lease_takeovers->Increment();
        AddWarning(&out, "took over an expired compile lease (its holder crashed or hung)");
      }
      finish_wait();
      // The holder we waited for may have published and released between our last look and the
      // acquisition; then there is nothing to compile.
      auto has = shared_->Has(digest);
      if (has.ok() && *has && FetchFromShared(key, revoked, &out)) return out;  // lease released on return
      return CompileAndPublish(req, lease->get(), revoked, std::move(out));
    }
    if (absl::IsUnimplemented(lease.status())) {
      return CompileAndPublish(req, nullptr, revoked, std::move(out));
    }
    if (!absl::IsAlreadyExists(lease.status())) {
      // No single-flight without the lease directory, but compiling is still safe: publishing
      // is atomic, so the worst case is the same package compiled on two nodes.
      metrics_->Request("shared", "error").Increment();
      kiln::LogWarning("cache", absl::StrCat("compile lease for ", digest.substr(0, 12),
                                             " unavailable, compiling without it: ",
                                             lease.status().ToString()));
      AddWarning(&out, absl::StrCat("compile lease unavailable: ", lease.status().message()));
      finish_wait();
      return CompileAndPublish(req, nullptr, revoked, std::move(out));
    }
    if (!wait_start) {
      wait_start = SteadyNow();
      metrics_->lease_waits->Increment();
      kiln::LogInfo("cache", absl::StrCat("waiting for another node to compile ", key.component,
                                          " (", digest.substr(0, 12), "): ",
                                          lease.status().message()));
    }
    const int64_t left_ms = deadline_ms - clock_->NowMs();
    if (left_ms <= 0) {
      metrics_->Request("compile", "error").Increment();
      return absl::DeadlineExceededError(absl::StrCat(
          "waited ", options_.max_wait_ms, " ms for another node's compile of ", key.component,
          " (", digest, "): ", lease.status().message()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min(pause_ms, left_ms)));
    pause_ms = std::min(pause_ms * 2, options_.poll_max_ms);
    auto has = shared_->Has(digest);
    if (has.ok() && *has && FetchFromShared(key, revoked, &out)) {
      finish_wait();
      return out;
    }
    // Not there yet, or the holder published a corrupt copy (quarantined by the fetch): go round;
    // once the holder releases or its lease lapses, this node compiles.
  }
}

absl::StatusOr<ProvidedPackage> TieredPackageProvider::CompileAndPublish(
    const PackageRequest& req, CompileLease* lease, const Revocations& revoked,
    ProvidedPackage out) {
  const ArtifactKey& key = req.key;
  const std::string digest = key.Digest();
  auto release = [&] {
    if (lease == nullptr) return;
    if (auto s = lease->Release(); !s.ok()) {
      kiln::LogWarning("cache", absl::StrCat("releasing compile lease for ", digest.substr(0, 12),
                                             ": ", s.ToString()));
    }
  };
  kiln::LogInfo("cache", absl::StrCat("compiling ", key.component, " package (",
                                      digest.substr(0, 12),
                                      ") with kiln-compile; this happens once per key",
                                      (shared_ != nullptr ? " in the cluster" : "")));
  const auto t = SteadyNow();
  absl::Status compiled;
  absl::Status heartbeat = absl::OkStatus();
  {
    std::optional<LeaseHeartbeat> renewer;
    if (lease != nullptr) {
      const int64_t every =
          options_.lease_renew_ms > 0 ? options_.lease_renew_ms : options_.lease_ttl_ms / 3;
      renewer.emplace(*lease, std::chrono::milliseconds(std::max<int64_t>(every, 1)));
    }
    compiled = compiler_->Compile({req.model_dir, key, req.compile_options, local_->root()});
    if (renewer) heartbeat = renewer->Stop();
  }
  const double secs = SecondsSince(t);
  if (!compiled.ok()) {
    metrics_->compiles_error->Increment();
    metrics_->Request("compile", "error").Increment();
    release();
    return compiled;
  }
  if (options_.signer != nullptr) {
    // The compiler wrote LOCAL/<digest>; sign it where it lies, before anyone can fetch it.
    if (auto s = SignPackageDir(absl::StrCat(local_->root(), "/", digest), digest,
                                *options_.signer);
        !s.ok()) {
      metrics_->compiles_error->Increment();
      metrics_->Request("compile", "error").Increment();
      release();
      return s;
    }
  }
  auto found = local_->Find(key);
  if (!found.ok()) {
    metrics_->compiles_error->Increment();
    release();
    if (absl::IsDataLoss(found.status())) {
      metrics_->Request("compile", "corrupt").Increment();
      return absl::DataLossError(
          absl::StrCat("the compiler's package failed verification: ", found.status().message()));
    }
    metrics_->Request("compile", "error").Increment();
    if (absl::IsNotFound(found.status())) {
      return absl::InternalError(absl::StrCat("the compiler reported success but left no package: ",
                                              found.status().message()));
    }
    return found.status();
  }
  if (auto trusted = CheckTrust(*found, revoked, /*in_shared=*/false); !trusted.ok()) {
    metrics_->compiles_error->Increment();
    metrics_->Request("compile", "corrupt").Increment();
    release();
    if (!absl::IsPermissionDenied(trusted)) return trusted;
    return absl::FailedPreconditionError(absl::StrCat(
        "this node compiled ", key.component, " but may not load what it compiled: ",
        trusted.message(),
        options_.signer == nullptr
            ? "; give it a signing key (--signing_key) whose .pub is in the trust set"
            : "; make it a new signing key (kiln signing-key new) and add its .pub to the trust "
              "set"));
  }
  metrics_->compiles_ok->Increment();
  metrics_->compile_seconds->Observe(secs);
  metrics_->Request("compile", "hit").Increment();
  local_->Admit(digest);
  out.package = *std::move(found);
  out.provenance = "compiled";
  out.compile_seconds = secs;
  if (absl::IsAborted(heartbeat)) {
    AddWarning(&out, absl::StrCat("compile lease lost during the compile (", heartbeat.message(),
                                  "); another node may have compiled it too"));
  }
  if (shared_ != nullptr) {
    // Publish before releasing: a waiter that finds the lease gone must find the package.
    if (auto s = shared_->Publish(out.package); s.ok()) {
      metrics_->publishes_ok->Increment();
    } else {
      metrics_->publishes_error->Increment();
      kiln::LogWarning("cache", absl::StrCat("publishing ", digest.substr(0, 12), " to ",
                                             shared_->Describe(), ": ", s.ToString()));
      AddWarning(&out, absl::StrCat("could not publish to ", shared_->Describe(), ": ",
                                    s.message()));
    }
  }
  release();
  return out;
}

absl::StatusOr<std::unique_ptr<TieredPackageProvider>> OpenTieredProvider(
    TieredProviderConfig config, prometheus::Registry* registry) {
  auto local = LocalDiskStore::Open(config.local, registry);
  if (!local.ok()) return local.status();
  std::unique_ptr<ArtifactStore> shared;
  if (redis::IsRedisUrl(config.shared_root)) {
    RedisArtifactStoreOptions shared_options;
    shared_options.url = config.shared_root;
    shared_options.host = config.shared_host;
    shared_options.clock = config.tiered.clock;
    auto store = RedisArtifactStore::Open(shared_options, registry);
    if (!store.ok()) return store.status();
    shared = *std::move(store);
  } else if (!config.shared_root.empty()) {
    SharedFsStoreOptions shared_options;
    shared_options.root = config.shared_root;
    shared_options.host = config.shared_host;
    shared_options.clock = config.tiered.clock;
    auto store = SharedFsStore::Open(shared_options);
    if (!store.ok()) return store.status();
    shared = *std::move(store);
  }
  if (!config.trusted_keys.empty()) {
    auto trust = TrustSet::Load(config.trusted_keys);
    if (!trust.ok()) return trust.status();
    config.tiered.trust = std::make_shared<const TrustSet>(*std::move(trust));
  }
  if (!config.signing_key.empty()) {
    auto key = SigningKey::Read(config.signing_key);
    if (!key.ok()) return key.status();
    config.tiered.signer = std::make_shared<const SigningKey>(*std::move(key));
  }
  std::unique_ptr<PackageCompiler> compiler;
  if (!config.compiler_path.empty()) {
    compiler = std::make_unique<SubprocessCompiler>(config.compiler_path);
  }
  return TieredPackageProvider::Create(*std::move(local), std::move(shared), std::move(compiler),
                                       std::move(config.tiered), registry);
}

}  // namespace kiln::cache
