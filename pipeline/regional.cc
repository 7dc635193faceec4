#include "pipeline/regional.h"

#include <exception>

#include "absl/strings/str_cat.h"
#include "pipeline/lora.h"
#include "pipeline/torch_error.h"

namespace kiln::pipeline {
namespace {

constexpr const char* kRegions[] = {"head", "double", "single", "tail"};

absl::StatusOr<std::vector<cache::TensorSpec>> Specs(const nlohmann::json& list) {
  std::vector<cache::TensorSpec> out;
  for (const auto& e : list) {
    out.push_back({e.at("name").get<std::string>(), e.at("shape").get<std::vector<int64_t>>(),
                   e.at("dtype").get<std::string>()});
  }
  return out;
}

absl::Status Named(const absl::Status& s, const std::string& where) {
  return absl::Status(s.code(), absl::StrCat(where, ": ", s.message()));
}

}  // namespace

RegionalTransformer::~RegionalTransformer() = default;

int RegionalTransformer::layers(const std::string& region) const {
  auto it = regions_.find(region);
  return it == regions_.end() ? 0 : static_cast<int>(it->second.prefixes.size());
}

absl::StatusOr<std::unique_ptr<RegionalTransformer>> RegionalTransformer::Load(
    const cache::LocatedPackage& set, const c10::Device& device) {
  const cache::PackageManifest& m = set.manifest;
  auto bad = [&](const std::string& why) {
    return absl::DataLossError(absl::StrCat("regional package set ", set.dir, ": ", why));
  };
  if (m.layout != "regional") return bad("its manifest's layout is not \"regional\"");
  std::unique_ptr<RegionalTransformer> t(new RegionalTransformer());
  t->manifest_ = m;
  t->device_ = device;
  if (auto o = m.raw.find("compile_options");
      o != m.raw.end() && o->is_object() && o->contains("sequence_parallel")) {
    const nlohmann::json& p = o->at("sequence_parallel");
    if (!p.is_number_integer() || p.get<int64_t>() < 1 || p.get<int64_t>() > 1024) {
      return bad(absl::StrCat("compile option sequence_parallel ", p.dump(),
                              " is not a rank count"));
    }
    t->sequence_parallel_ = p.get<int>();
  }
  if (t->sequence_parallel_ > 1) {
    auto g = m.raw.find("process_group");
    if (g == m.raw.end() || !g->is_string() || g->get<std::string>().empty()) {
      return bad("a sequence-parallel set without the process_group its all-to-alls resolve");
    }
    t->process_group_ = g->get<std::string>();
  }
  const nlohmann::json& table = m.raw.contains("regions") ? m.raw["regions"] : nlohmann::json();
  for (const char* name : kRegions) {
    if (!table.is_object() || !table.contains(name)) {
      // A model without double (or single) blocks has no such region; head and tail it must have.
      if (std::string(name) == "head" || std::string(name) == "tail") {
        return bad(absl::StrCat("no ", name, " region"));
      }
      continue;
    }
    const nlohmann::json& entry = table[name];
    Region r;
    r.name = name;
    cache::LocatedPackage located;
    located.dir = set.dir;
    located.manifest.key = m.key;
    located.manifest.digest = m.digest;
    try {
      auto acts = Specs(entry.at("inputs"));
      auto outs = Specs(entry.at("outputs"));
      if (!acts.ok()) return acts.status();
      if (!outs.ok()) return outs.status();
      r.activations = static_cast<int>(acts->size());
      located.manifest.inputs = *acts;
      located.manifest.outputs = *outs;
      r.prefixes = entry.at("layers").get<std::vector<std::string>>();
      r.weights.key = m.key;
      r.weights.digest = m.digest;
      for (const auto& w : entry.at("weights")) {
        const std::string wname = w.at("name").get<std::string>();
        cache::ConstantSpec spec{w.at("shape").get<std::vector<int64_t>>(),
                                 w.at("dtype").get<std::string>(), "checkpoint", {}};
        if (auto d = w.find("derive"); d != w.end()) {
          spec.derive.op = d->at("op").get<std::string>();
          spec.derive.sources = d->at("from").get<std::vector<std::string>>();
        }
        located.manifest.inputs.push_back({absl::StrCat("weight ", wname), spec.shape, spec.dtype});
        r.weight_names.push_back(wname);
        r.weights.constants[wname] = std::move(spec);
      }
      const auto& pkg = entry.at("package");
      located.manifest.package_file = pkg.at("file").get<std::string>();
      located.manifest.package_sha256 = pkg.at("sha256").get<std::string>();
      located.manifest.package_bytes = pkg.at("bytes").get<int64_t>();
    } catch (const nlohmann::json::exception& e) {
      return bad(absl::StrCat("region ", name, ": ", ExceptionMessage(e)));
    }
    if (r.prefixes.empty()) return bad(absl::StrCat("region ", name, " has no layers"));
    if (r.weights.constants.size() != r.weight_names.size()) {
      return bad(absl::StrCat("region ", name, " names a weight twice"));
    }
    located.package_path = absl::StrCat(set.dir, "/", located.manifest.package_file);
    auto pkg = AotiPackage::Load(located, device);
    if (!pkg.ok()) return Named(pkg.status(), absl::StrCat("region ", name));
    // Every weight is an input: the region package takes no constants (Load refuses one that asks
    // for any, since the table describes none); this only marks it ready to run.
    if (auto s = (*pkg)->LoadConstants({}); !s.ok()) return Named(s, absl::StrCat("region ", name));
    r.package = *std::move(pkg);
    t->regions_.emplace(name, std::move(r));
  }
  return t;
}

absl::Status RegionalTransformer::SetSequenceParallelRank(int rank) {
  if (rank < 0 || rank >= sequence_parallel_) {
    return absl::InvalidArgumentError(absl::StrCat("regional transformer: rank ", rank,
                                                   " is not one of the set's ",
                                                   sequence_parallel_, " sequence-parallel ranks"));
  }
  rank_ = rank;
  return absl::OkStatus();
}

cache::PackageManifest RegionalTransformer::LayerManifest(const Region& r, int layer,
                                                         std::vector<std::string>* fqns) {
  const std::string& prefix = r.prefixes[layer];
  cache::PackageManifest m;
  m.key = r.weights.key;
  m.digest = r.weights.digest;
  fqns->clear();
  for (const auto& n : r.weight_names) {
    cache::ConstantSpec spec = r.weights.constants.at(n);
    for (auto& s : spec.derive.sources) s = prefix + s;
    fqns->push_back(prefix + n);
    m.constants[fqns->back()] = std::move(spec);
  }
  return m;
}

absl::Status RegionalTransformer::LoadWeights(ComponentWeights& weights) {
  uint64_t bytes = 0;
  for (auto& [name, r] : regions_) {
    r.base.clear();
    r.prepared.clear();
    for (size_t i = 0; i < r.prefixes.size(); ++i) {
      std::vector<std::string> fqns;
      const cache::PackageManifest layer = LayerManifest(r, static_cast<int>(i), &fqns);
      auto got = weights.Gather(fqns, layer, /*extra_constants_path=*/"");
      if (!got.ok()) return Named(got.status(), absl::StrCat("region ", name, " layer ", i));
      std::vector<at::Tensor> tensors;
      for (const auto& f : fqns) {
        tensors.push_back(got->at(f));
        bytes += tensors.back().nbytes();
      }
      r.base.push_back(std::move(tensors));
    }
    r.layers = r.base;
  }
  weight_bytes_ = bytes;
  weights_loaded_ = true;
  prepared_ = false;
  return absl::OkStatus();
}

absl::Status RegionalTransformer::PrepareLoras(ComponentWeights& weights,
                                               const LoraDeltas* deltas,
                                               std::unordered_map<std::string, at::Tensor>* memo) {
  if (!weights_loaded_) {
    return absl::FailedPreconditionError(
        "regional transformer: LoRAs merged before its weights were loaded");
  }
  prepared_ = false;
  for (auto& [name, r] : regions_) r.prepared.clear();
  std::map<std::string, std::vector<std::vector<at::Tensor>>> prepared;
  for (auto& [name, r] : regions_) {
    auto& layers = prepared[name];
    if (deltas == nullptr) {
      layers = r.base;
      continue;
    }
    // One layer at a time: Merge computes each changed weight in float32 and keeps only the
    // result in the weight's dtype.
    for (size_t i = 0; i < r.prefixes.size(); ++i) {
      std::vector<std::string> fqns;
      const cache::PackageManifest layer = LayerManifest(r, static_cast<int>(i), &fqns);
      std::unordered_map<std::string, at::Tensor> base;
      for (size_t j = 0; j < fqns.size(); ++j) base[fqns[j]] = r.base[i][j];
      auto merged = weights.Merge(base, layer, *deltas, memo);
      if (!merged.ok()) return Named(merged.status(), absl::StrCat("region ", name, " layer ", i));
      std::vector<at::Tensor> tensors;
      for (const auto& f : fqns) tensors.push_back(merged->at(f));
      layers.push_back(std::move(tensors));
    }
  }
  for (auto& [name, r] : regions_) r.prepared = std::move(prepared[name]);
  prepared_ = true;
  return absl::OkStatus();
}

absl::Status RegionalTransformer::CommitLoras() {
  if (!prepared_) {
    return absl::FailedPreconditionError("regional transformer: no LoRA set prepared to commit");
  }
  for (auto& [name, r] : regions_) {
    r.layers = std::move(r.prepared);
    r.prepared.clear();
  }
  prepared_ = false;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<at::Tensor>> RegionalTransformer::RunLayer(
    Region& r, int layer, std::vector<at::Tensor> args, void* cuda_stream) {
  for (auto& a : args) {
    if (a.defined() && !a.is_contiguous()) a = a.contiguous();
  }
  const auto& w = r.layers[layer];
  args.insert(args.end(), w.begin(), w.end());
  auto out = r.package->RunOn(args, cuda_stream);
  if (!out.ok()) return Named(out.status(), absl::StrCat("region ", r.name, " layer ", layer));
  if (out->size() != r.package->manifest().outputs.size()) {
    return absl::InternalError(absl::StrCat("region ", r.name, " returned ", out->size(),
                                            " outputs, its manifest says ",
                                            r.package->manifest().outputs.size()));
  }
  return out;
}

absl::StatusOr<std::vector<at::Tensor>> RegionalTransformer::RunOn(
    const std::vector<at::Tensor>& inputs, void* cuda_stream) {
  if (!weights_loaded_) {
    return absl::FailedPreconditionError(
        "regional transformer: run before its weights were loaded");
  }
  if (sequence_parallel_ > 1 && rank_ < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("regional transformer: a set for ", sequence_parallel_,
                     " sequence-parallel ranks run before its rank was set"));
  }
  if (inputs.size() != manifest_.inputs.size()) {
    return absl::InvalidArgumentError(absl::StrCat("transformer: ", inputs.size(),
                                                   " inputs, expected ", manifest_.inputs.size()));
  }
  try {
    auto head = RunLayer(regions_.at("head"), 0, inputs, cuda_stream);
    if (!head.ok()) return head.status();
    if (head->size() != 5) return absl::InternalError("region head: expected 5 outputs");
    at::Tensor img = (*head)[0], txt = (*head)[1];
    const at::Tensor temb = (*head)[2];
    at::Tensor cos = (*head)[3], sin = (*head)[4];
    if (sequence_parallel_ > 1) {
      // The head's tables cover the whole image, text rows first: this rank's rows are its text
      // shard's and its image shard's (kiln.sequence_parallel.shard_rope).
      const int64_t p = sequence_parallel_, l = txt.size(1), s = img.size(1);
      if (cos.size(0) != p * (l + s) || sin.size(0) != p * (l + s)) {
        return absl::InternalError(absl::StrCat("region head: RoPE tables of ", cos.size(0),
                                                " rows, expected ", p * (l + s), " (", p,
                                                " ranks of ", l, " text + ", s, " image tokens)"));
      }
      auto rows = [&](const at::Tensor& t) {
        return at::cat({t.narrow(0, rank_ * l, l), t.narrow(0, p * l + rank_ * s, s)}, 0);
      };
      cos = rows(cos);
      sin = rows(sin);
    }
    if (auto it = regions_.find("double"); it != regions_.end()) {
      for (int i = 0; i < static_cast<int>(it->second.prefixes.size()); ++i) {
        auto out = RunLayer(it->second, i, {img, txt, temb, cos, sin}, cuda_stream);
        if (!out.ok()) return out.status();
        if (out->size() != 2) return absl::InternalError("region double: expected 2 outputs");
        img = (*out)[0];
        txt = (*out)[1];
      }
    }
    at::Tensor x = at::cat({txt, img}, 1);
    if (auto it = regions_.find("single"); it != regions_.end()) {
      for (int i = 0; i < static_cast<int>(it->second.prefixes.size()); ++i) {
        auto out = RunLayer(it->second, i, {x, temb, cos, sin}, cuda_stream);
        if (!out.ok()) return out.status();
        x = (*out)[0];
      }
    }
    return RunLayer(regions_.at("tail"), 0, {x, temb}, cuda_stream);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("regional transformer: ", ExceptionMessage(e)));
  }
}

}  // namespace kiln::pipeline
