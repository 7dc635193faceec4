#include "pipeline/package_loader.h"

#include <future>
#include <string>
#include <vector>

#ifdef KILN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/stopwatch.h"
#include "pipeline/canary.h"
#include "pipeline/key_policy.h"

namespace kiln::pipeline {
void SyncDevice(const c10::Device& d) {
#ifdef KILN_WITH_CUDA
  if (d.is_cuda()) at::cuda::getCurrentCUDAStream(d.index()).synchronize();
#else
  (void)d;
#endif
}

PackageLoader::PackageLoader(std::shared_ptr<cache::PackageProvider> provider,
                             std::string model_dir, nlohmann::json compile_options,
                             c10::Device device, PackageLoaderOptions options)
    : provider_(std::move(provider)),
      model_dir_(std::move(model_dir)),
      compile_options_(std::move(compile_options)),
      device_(device),
      options_(options) {}

PackageLoader::~PackageLoader() = default;

absl::StatusOr<std::map<std::string, LoadedComponent>> PackageLoader::EnsureAll(
    const std::map<std::string, cache::ArtifactKey>& keys, LoadReport* report,
    const std::function<void(const std::string&)>& on_phase) {
  std::map<std::string, LoadedComponent> out;
  std::map<std::string, std::future<absl::StatusOr<cache::ProvidedPackage>>> pending;
  std::map<std::string, std::string> digests;
  const auto t = SteadyNow();
  for (const auto& [component, key] : keys) {
    const std::string digest = key.Digest();
    if (auto it = loaded_.find(digest); it != loaded_.end()) {
      report->packages[component] = "resident";
      out[component].package = it->second.get();
      continue;
    }
    if (auto it = regional_.find(digest); it != regional_.end()) {
      report->packages[component] = "resident";
      out[component].regional = it->second.get();
      continue;
    }
    digests[component] = digest;
    cache::PackageRequest request{key, model_dir_,
                                  ComponentCompileOptions(compile_options_, component)};
    pending[component] = std::async(std::launch::async, [this, request = std::move(request)] {
      return provider_->Get(request);
    });
  }
  if (on_phase && !pending.empty()) {
    std::vector<std::string> names;
    for (const auto& [c, f] : pending) names.push_back(c);
    on_phase(absl::StrCat("fetching or compiling ", absl::StrJoin(names, ", ")));
  }
  std::map<std::string, absl::StatusOr<cache::ProvidedPackage>> provided;
  for (auto& [c, f] : pending) provided.emplace(c, f.get());  // every thread joins first
  const double wall = SecondsSince(t);
  bool compiled = false, fetched = false;
  for (auto& [c, p] : provided) {
    if (!p.ok()) return p.status();
    compiled |= p->provenance == "compiled";
    fetched |= p->provenance == "shared";
  }
  if (compiled) {
    report->compile_seconds += wall;
  } else if (fetched) {
    report->fetch_seconds += wall;
  }
  for (auto& [c, p] : provided) {
    const cache::ArtifactKey& key = keys.at(c);
    std::string fault;  // "unloadable" / "canary" when the package itself is at fault
    auto pkg = Load(c, digests[c], *std::move(p), report, on_phase, &fault);
    if (!pkg.ok() && !fault.empty()) {
      // A package that verified but cannot be used would fail every job of this model and size,
      // here and on every node that fetches it: take it out of every tier and get it once more
      // (rebuilt or refetched).
      const std::string why(pkg.status().message());
      if (auto s = provider_->Quarantine(key, fault, why); !s.ok()) return s;
      report->warnings.push_back(absl::StrCat("quarantined the ", c, " package (", fault,
                                              ": ", why, "); rebuilt it"));
      auto again = provider_->Get(cache::PackageRequest{
          key, model_dir_, ComponentCompileOptions(compile_options_, c)});
      if (!again.ok()) return again.status();
      std::string second_fault;
      pkg = Load(c, digests[c], *std::move(again), report, on_phase, &second_fault);
      if (!pkg.ok() && !second_fault.empty()) {
        (void)provider_->Quarantine(key, second_fault, std::string(pkg.status().message()));
      }
    }
    if (!pkg.ok()) return pkg.status();
    out[c] = *pkg;
  }
  return out;
}

absl::StatusOr<LoadedComponent> PackageLoader::Load(const std::string& component,
                                                 const std::string& digest,
                                                 cache::ProvidedPackage provided,
                                                 LoadReport* report,
                                                 const std::function<void(const std::string&)>& on_phase,
                                                 std::string* fault) {
  // `provided.pin` keeps the package on local disk until this returns.
  if (!provided.warning.empty()) report->warnings.push_back(provided.warning);
  const cache::LocatedPackage& found = provided.package;
  if (on_phase) on_phase(absl::StrCat("loading package ", component));
  auto t = SteadyNow();
  if (found.manifest.layout == "regional") {
    if (component != "transformer") {
      *fault = "unloadable";
      return absl::DataLossError(absl::StrCat("package ", found.dir, ": a regional set for ",
                                              component, " (only the transformer has regions)"));
    }
    return LoadRegional(component, digest, provided, report, on_phase, fault);
  }
  auto pkg = AotiPackage::Load(found, device_);
  if (!pkg.ok()) {
    // Out of memory or a device gone says nothing about the package; anything else does.
    if (!absl::IsResourceExhausted(pkg.status()) && !absl::IsUnavailable(pkg.status())) {
      *fault = "unloadable";
    }
    return pkg.status();
  }
  if (options_.canary) {
    auto canary = RunCanary(**pkg, found);
    if (!canary.ok()) {
      *fault = absl::IsDataLoss(canary.status()) ? "canary" : "unloadable";
      return canary.status();
    }
    report->canary_seconds += canary->seconds;
    (*pkg)->ReleaseConstants();  // free the synthetic constants before the weights arrive
    SyncDevice(device_);
    AotiPackage::FreeUnusedConstants();  // the runtime's own references kept them (aoti_package.h)
  }
  report->package_load_seconds += SecondsSince(t);

  if (on_phase) on_phase(absl::StrCat("loading weights ", component));
  t = SteadyNow();
  auto weights = WeightsOf(component);
  if (!weights.ok()) return weights.status();
  ComponentWeights* cw = *weights;
  const uint64_t read_before = cw->bytes_read();
  auto constants = cw->Gather(**pkg, found.extra_constants_path);
  if (!constants.ok()) return constants.status();
  if (auto s = (*pkg)->LoadConstants(*constants); !s.ok()) return s;
  if (component == "transformer" && loras_ != nullptr) {  // the LoRA set merged now
    auto merged = cw->Merge(*constants, (*pkg)->manifest(), *loras_, &lora_memo_);
    if (!merged.ok()) return merged.status();
    if (auto s = (*pkg)->SwapConstants(*merged); !s.ok()) return s;
  }
  SyncDevice(device_);
  report->weights_seconds += SecondsSince(t);
  report->weight_bytes += cw->bytes_read() - read_before;
  report->packages[component] = provided.provenance;
  LoadedComponent loaded;
  loaded.package = pkg->get();
  loaded_[digest] = *std::move(pkg);
  return loaded;
}

absl::StatusOr<ComponentWeights*> PackageLoader::WeightsOf(const std::string& component) {
  auto& cw = weights_[component];
  if (!cw) {
    auto opened =
        ComponentWeights::Open(model_dir_ + "/" + ComponentWeights::FolderFor(component),
                               ComponentWeights::StemFor(component), device_);
    if (!opened.ok()) return opened.status();
    cw = *std::move(opened);
  }
  return cw.get();
}

absl::Status PackageLoader::UseWeights(const std::string& component,
                                       std::unique_ptr<ComponentWeights> weights) {
  auto& cw = weights_[component];
  if (cw) {
    return absl::FailedPreconditionError(
        absl::StrCat("the ", component, " weights are open already; UseWeights comes first"));
  }
  cw = std::move(weights);
  return absl::OkStatus();
}

absl::StatusOr<LoadedComponent> PackageLoader::LoadRegional(
    const std::string& component, const std::string& digest,
    const cache::ProvidedPackage& provided, LoadReport* report,
    const std::function<void(const std::string&)>& on_phase, std::string* fault) {
  auto t = SteadyNow();
  auto set = RegionalTransformer::Load(provided.package, device_);
  if (!set.ok()) {
    if (!absl::IsResourceExhausted(set.status()) && !absl::IsUnavailable(set.status())) {
      *fault = "unloadable";
    }
    return set.status();
  }
  report->package_load_seconds += SecondsSince(t);
  if (on_phase) on_phase(absl::StrCat("loading weights ", component));
  t = SteadyNow();
  auto weights = WeightsOf(component);
  if (!weights.ok()) return weights.status();
  const uint64_t read_before = (*weights)->bytes_read();
  if (auto s = (*set)->LoadWeights(**weights); !s.ok()) return s;
  if (loras_ != nullptr) {  // the LoRA set merged now
    if (auto s = (*set)->PrepareLoras(**weights, loras_.get(), &lora_memo_); !s.ok()) return s;
    if (auto s = (*set)->CommitLoras(); !s.ok()) return s;
  }
  SyncDevice(device_);
  report->weights_seconds += SecondsSince(t);
  report->weight_bytes += (*weights)->bytes_read() - read_before;
  report->packages[component] = provided.provenance;
  LoadedComponent loaded;
  loaded.regional = set->get();
  regional_[digest] = *std::move(set);
  return loaded;
}

std::vector<std::string> PackageLoader::LoadedDigests() const {
  std::vector<std::string> out;
  for (const auto& [digest, pkg] : loaded_) out.push_back(digest);
  for (const auto& [digest, set] : regional_) out.push_back(digest);
  return out;
}

std::vector<AotiPackage*> PackageLoader::TransformerPackages() const {
  std::vector<AotiPackage*> out;
  for (const auto& [digest, pkg] : loaded_) {
    if (pkg->manifest().key.component == "transformer") out.push_back(pkg.get());
  }
  return out;
}

std::vector<RegionalTransformer*> PackageLoader::RegionalSets() const {
  std::vector<RegionalTransformer*> out;
  for (const auto& [digest, set] : regional_) out.push_back(set.get());
  return out;
}

absl::Status PackageLoader::PrepareEach(const std::vector<AotiPackage*>& packages,
                                        const std::vector<RegionalTransformer*>& sets,
                                        const std::shared_ptr<const LoraDeltas>& deltas,
                                        std::unordered_map<std::string, at::Tensor>* memo) {
  std::vector<std::pair<AotiPackage*, std::unordered_map<std::string, at::Tensor>>> loads;
  for (AotiPackage* pkg : packages) {
    if (deltas == nullptr) {
      loads.emplace_back(pkg, pkg->base_constants());
      continue;
    }
    auto weights = WeightsOf("transformer");
    if (!weights.ok()) return weights.status();
    auto merged = (*weights)->Merge(pkg->base_constants(), pkg->manifest(), *deltas, memo);
    if (!merged.ok()) return merged.status();
    loads.emplace_back(pkg, *std::move(merged));
  }
  for (auto& [pkg, constants] : loads) {
    if (auto s = pkg->PrepareConstants(constants); !s.ok()) return s;
  }
  if (!sets.empty()) {
    auto weights = WeightsOf("transformer");
    if (!weights.ok()) return weights.status();
    for (RegionalTransformer* set : sets) {
      if (auto s = set->PrepareLoras(**weights, deltas.get(), memo); !s.ok()) return s;
    }
  }
  SyncDevice(device_);  // the merged weights are complete before another stream swaps them in
  return absl::OkStatus();
}

absl::Status PackageLoader::PrepareTransformerLoras(std::shared_ptr<const LoraDeltas> deltas) {
  if (deltas != nullptr && deltas->empty()) deltas = nullptr;
  has_prepared_ = false;
  prepared_ = nullptr;
  prepared_memo_.clear();
  std::unordered_map<std::string, at::Tensor> memo;
  if (auto s = PrepareEach(TransformerPackages(), RegionalSets(), deltas, &memo); !s.ok()) {
    return s;
  }
  has_prepared_ = true;
  prepared_ = std::move(deltas);
  prepared_memo_ = std::move(memo);
  return absl::OkStatus();
}

absl::Status PackageLoader::SetTransformerLoras(std::shared_ptr<const LoraDeltas> deltas,
                                                int* prepared_ahead) {
  if (deltas != nullptr && deltas->empty()) deltas = nullptr;
  if (prepared_ahead != nullptr) *prepared_ahead = 0;
  const bool same = has_prepared_ && prepared_ == deltas;
  std::unordered_map<std::string, at::Tensor> memo;
  if (same) memo = prepared_memo_;
  const std::vector<AotiPackage*> all = TransformerPackages();
  const std::vector<RegionalTransformer*> all_sets = RegionalSets();
  std::vector<AotiPackage*> todo;  // packages with `deltas` not prepared ahead
  for (AotiPackage* pkg : all) {
    if (!same || !pkg->prepared()) todo.push_back(pkg);
  }
  std::vector<RegionalTransformer*> todo_sets;  // regional sets likewise
  for (RegionalTransformer* set : all_sets) {
    if (!same || !set->prepared()) todo_sets.push_back(set);
  }
  has_prepared_ = false;  // whatever happens below, what was prepared is used or dropped
  prepared_ = nullptr;
  prepared_memo_.clear();
  if (auto s = PrepareEach(todo, todo_sets, deltas, &memo); !s.ok()) return s;
  // All or none: a package whose commit fails keeps its set (CommitConstants), and the ones
  // committed before it go back to theirs, so every package runs the same LoRA set. A regional
  // set's commit moves tensor handles and cannot fail once prepared (every one is, above).
  std::vector<std::unordered_map<std::string, at::Tensor>> before;
  for (size_t i = 0; i < all.size(); ++i) {
    before.push_back(all[i]->constants());
    if (auto s = all[i]->CommitConstants(); !s.ok()) {
      for (size_t j = 0; j < i; ++j) {
        if (auto r = all[j]->SwapConstants(before[j]); !r.ok()) {
          return absl::Status(s.code(),
                              absl::StrCat(s.message(), "; restoring the previous set of ",
                                           all[j]->manifest().key.component, ": ", r.message()));
        }
      }
      return s;
    }
  }
  before.clear();  // else the sets switched away from stay held past FreeUnusedConstants below
  for (RegionalTransformer* set : all_sets) {
    if (auto s = set->CommitLoras(); !s.ok()) return s;
  }
  loras_ = std::move(deltas);
  lora_memo_ = std::move(memo);
  // The set switched away from is held by nothing of kiln's now, only by the runtime's own
  // references (aoti_package.h): free it before the next set is merged beside it.
  SyncDevice(device_);
  AotiPackage::FreeUnusedConstants();
  if (prepared_ahead != nullptr) {
    *prepared_ahead = static_cast<int>(all.size() - todo.size() + all_sets.size() -
                                       todo_sets.size());
  }
  return absl::OkStatus();
}

}  // namespace kiln::pipeline
