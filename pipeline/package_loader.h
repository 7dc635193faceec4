// PackageLoader: gets a pipeline's packages from its PackageProvider and keeps them loaded, with
// their weights. It knows nothing about where packages come from: it asks the provider for each
// key (with the compile options that key was computed from) and loads what comes back.
//
// Used by FluxPipeline on its Generate() thread; not thread-safe (one EnsureAll() at a time).
// Internally it asks for the missing packages of a job all at once, one thread each, so a cold
// start compiles its components in parallel; the provider is thread-safe.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/artifact_key.h"
#include "cache/package_provider.h"
#include "nlohmann/json.hpp"
#include "pipeline/aoti_package.h"
#include "pipeline/lora.h"
#include "pipeline/regional.h"
#include "pipeline/weights.h"

namespace kiln::pipeline {

// What one EnsureAll() did.
struct LoadReport {
  // Finding packages runs for all components at once; its wall time counts as compile if any
  // package was compiled, else as fetch if any was fetched from the shared tier.
  double fetch_seconds = 0;
  double compile_seconds = 0;
  double package_load_seconds = 0;  // verifying and loading packages (canaries included)
  double canary_seconds = 0;        // running the packages' canaries (pipeline/canary.h)
  double weights_seconds = 0;       // reading weights and moving them to the device
  uint64_t weight_bytes = 0;        // checkpoint bytes read
  // component → the wire's provenance: "local", "shared" or "compiled" (the provider's word for
  // where the package came from in this call), or "resident" (already loaded).
  std::map<std::string, std::string> packages;
  std::vector<std::string> warnings;  // the provider's (e.g. a corrupt copy quarantined)
};

// A loaded component: a whole-graph package, or for the transformer compiled with layout
// "regional" its regional set (exactly one of the two is set). Owned by the PackageLoader.
struct LoadedComponent {
  AotiPackage* package = nullptr;
  RegionalTransformer* regional = nullptr;
};

struct PackageLoaderOptions {
  // Run each package's canary (pipeline/canary.h) after loading it and before its weights; a
  // package whose output disagrees is quarantined and rebuilt once.
  bool canary = true;
};

class PackageLoader {
 public:
  // Packages are compiled from (and weights read from) `model_dir`, with `compile_options`, and
  // loaded on `device`.
  PackageLoader(std::shared_ptr<cache::PackageProvider> provider, std::string model_dir,
                nlohmann::json compile_options, c10::Device device,
                PackageLoaderOptions options = {});
  ~PackageLoader();

  // The loaded package (or regional set) of each component of `keys` (component → key): those
  // not loaded yet are fetched from the provider together, then loaded one by one with their
  // weights (read once per component, shared by every bucket). A package that fails to load or
  // whose canary disagrees is quarantined through the provider (PackageProvider::Quarantine) and
  // asked for once more (rebuilt or refetched). The first error is returned as the provider, the
  // package or the weights report it. `on_phase` (may be null) hears what it does, for a job's
  // progress: "fetching or compiling <components>" (the provider takes each from local disk, the
  // shared tier or a compile; which one shows in LoadReport::packages afterwards), then per
  // component "loading package <component>" and "loading weights <component>".
  // A regional set (manifest layout "regional") loads its four region packages and gathers the
  // weights of every layer (RegionalTransformer); it has no canary.
  absl::StatusOr<std::map<std::string, LoadedComponent>> EnsureAll(
      const std::map<std::string, cache::ArtifactKey>& keys, LoadReport* report,
      const std::function<void(const std::string& phase)>& on_phase = nullptr);

  // Digests of the packages loaded now.
  std::vector<std::string> LoadedDigests() const;

  // Merges the LoRA set `deltas` (null or empty: none, the base weights) into the transformer's
  // weights without recompiling: each loaded transformer package gets its merged weights
  // (ComponentWeights::Merge of its base_constants(), shared by every bucket), prepared
  // (AotiPackage::PrepareConstants) and committed (CommitConstants: loaded into the runtime's
  // active buffer; all packages or none), and a transformer package loaded later gets them
  // at load time. Back to none swaps in the base tensors themselves (kept by ComponentWeights), so
  // the base image comes back bit for bit. A package that already holds `deltas` prepared
  // (PrepareTransformerLoras with this very object, nothing prepared or loaded since) is only
  // committed; `*prepared_ahead` (may be null) is set to the number of such packages.
  // Every package's weights are computed and loaded before any is swapped: on an error no package's
  // active weights change. A regional set gets the same (RegionalTransformer::PrepareLoras and
  // CommitLoras: every layer's weight inputs merged, then the lists it runs with swapped),
  // prepared ahead and counted in `*prepared_ahead` like a package.
  absl::Status SetTransformerLoras(std::shared_ptr<const LoraDeltas> deltas,
                                   int* prepared_ahead = nullptr);
  // The first half of SetTransformerLoras, ahead of it: merges `deltas` (null or empty: the base
  // weights) for every loaded transformer package and keeps the result prepared for the swap
  // (nothing in the runtime changes). The active weights are untouched, so this may run while
  // another thread denoises with them (nothing else of the loader may). Drops what an earlier call
  // prepared. Regional sets as in SetTransformerLoras.
  absl::Status PrepareTransformerLoras(std::shared_ptr<const LoraDeltas> deltas);

  // The component's checkpoint, opened once (or the weights UseWeights gave it).
  absl::StatusOr<ComponentWeights*> WeightsOf(const std::string& component);
  // `component`'s weights from `weights` (e.g. ComponentWeights::FromTensors of tensors another
  // rank broadcast) instead of its checkpoint under model_dir, which is then never opened.
  // FailedPrecondition once the component's weights are open.
  absl::Status UseWeights(const std::string& component,
                          std::unique_ptr<ComponentWeights> weights);

 private:
  // Loads one provided package, runs its canary and hands it its weights. On an error that is
  // the package's fault, sets `*fault` to "unloadable" or "canary".
  absl::StatusOr<LoadedComponent> Load(const std::string& component, const std::string& digest,
                                    cache::ProvidedPackage provided, LoadReport* report,
                                    const std::function<void(const std::string&)>& on_phase,
                                    std::string* fault);

  // A regional transformer set (RegionalTransformer): its region packages and every layer's
  // weights. `fault` as Load's.
  absl::StatusOr<LoadedComponent> LoadRegional(
      const std::string& component, const std::string& digest,
      const cache::ProvidedPackage& provided, LoadReport* report,
      const std::function<void(const std::string&)>& on_phase, std::string* fault);
  const std::shared_ptr<cache::PackageProvider> provider_;
  const std::string model_dir_;
  const nlohmann::json compile_options_;
  const c10::Device device_;
  const PackageLoaderOptions options_;
  std::map<std::string, std::unique_ptr<ComponentWeights>> weights_;  // by component
  std::map<std::string, std::unique_ptr<AotiPackage>> loaded_;        // by key digest
  std::map<std::string, std::unique_ptr<RegionalTransformer>> regional_;  // by key digest
  std::shared_ptr<const LoraDeltas> loras_;                   // the set merged now (null: none)
  std::unordered_map<std::string, at::Tensor> lora_memo_;     // its merged constants by FQN
  // The set PrepareTransformerLoras prepared (valid while has_prepared_;
  // null: the base weights) and its merged constants by FQN.
  bool has_prepared_ = false;
  std::shared_ptr<const LoraDeltas> prepared_;
  std::unordered_map<std::string, at::Tensor> prepared_memo_;
  // Merges `deltas` (null: the base) for `packages` and `sets` and prepares each
  // (PrepareConstants, RegionalTransformer::PrepareLoras).
  absl::Status PrepareEach(const std::vector<AotiPackage*>& packages,
                           const std::vector<RegionalTransformer*>& sets,
                           const std::shared_ptr<const LoraDeltas>& deltas,
                           std::unordered_map<std::string, at::Tensor>* memo);
  std::vector<AotiPackage*> TransformerPackages() const;
  std::vector<RegionalTransformer*> RegionalSets() const;
};

// Waits for queued device work so that phase timings are honest. Only at phase boundaries, never
// inside the denoise loop.
void SyncDevice(const c10::Device& device);

}  // namespace kiln::pipeline
