#include "pipeline/aoti_package.h"

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <exception>
#include <mutex>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "pipeline/torch_error.h"

namespace kiln::pipeline {
namespace {

const std::vector<std::pair<std::string, at::ScalarType>>& DtypeTable() {
  static const auto* table = new std::vector<std::pair<std::string, at::ScalarType>>{
      {"float32", at::kFloat},   {"bfloat16", at::kBFloat16},
      {"float16", at::kHalf},    {"float64", at::kDouble},
      {"int64", at::kLong},      {"int32", at::kInt},
      {"int16", at::kShort},     {"int8", at::kChar},
      {"uint8", at::kByte},      {"bool", at::kBool},
      {"float8_e4m3fn", at::kFloat8_e4m3fn}, {"float8_e5m2", at::kFloat8_e5m2},
  };
  return *table;
}

std::string ShapeStr(at::IntArrayRef s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

// The runtime's user-managed load keeps, for every constant, an at::Tensor of its own that it
// never deletes (MaybeOwningAtenTensorHandle(handle, user_managed=true) takes a handle from
// aoti_torch_new_tensor_handle and its destructor frees nothing; torch 2.11 and 2.13). Such a
// tensor shares the caller's TensorImpl, so a set kiln drops would stay in memory for the life of
// the process. This registry counts those references per TensorImpl; a tensor whose TensorImpl is
// held by nothing else, and whose storage no other TensorImpl shares, is garbage: its storage's
// memory is released (the leaked tensors keep an empty storage, which nothing reads: a buffer is
// always loaded again before it is used).
class LeakedReferences {
 public:
  static LeakedReferences& Get() {
    static auto* registry = new LeakedReferences();
    return *registry;
  }

  void Loaded(const std::unordered_map<std::string, at::Tensor>& set) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [fqn, t] : set) {
      auto it = entries_.find(t.unsafeGetTensorImpl());
      if (it == entries_.end() || it->second.impl.expired()) {
        it = entries_.insert_or_assign(t.unsafeGetTensorImpl(), Entry{Weak(t.getIntrusivePtr()), 0})
                 .first;
      }
      ++it->second.aliases;
    }
  }

  // Frees what only the runtime's leaked references hold; returns the bytes freed.
  uint64_t Sweep() {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t freed = 0;
    for (auto it = entries_.begin(); it != entries_.end();) {
      auto impl = it->second.impl.lock();
      if (!impl) {  // gone (nothing leaked it after all)
        it = entries_.erase(it);
        continue;
      }
      // `impl` itself is one strong reference.
      const bool garbage = static_cast<int64_t>(impl.use_count()) - 1 == it->second.aliases &&
                           impl->has_storage() &&
                           impl->storage().use_count() == 1;
      if (garbage) {
        freed += impl->storage().nbytes();
        impl->storage().unsafeGetStorageImpl()->reset();
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
    return freed;
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Weak impl;
    int64_t aliases = 0;
  };
  std::mutex mu_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
};

}  // namespace

uint64_t AotiPackage::FreeUnusedConstants() { return LeakedReferences::Get().Sweep(); }

absl::StatusOr<at::ScalarType> DtypeFromName(const std::string& name) {
  for (const auto& [n, t] : DtypeTable())
    if (n == name) return t;
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype '", name, "'"));
}

std::string DtypeName(at::ScalarType t) {
  for (const auto& [n, s] : DtypeTable())
    if (s == t) return n;
  return c10::toString(t);
}

const char* BuildTorchVersion() { return KILN_TORCH_VERSION; }
const char* BuildCudaVersion() { return KILN_CUDA_VERSION; }
const char* BuildTritonVersion() { return KILN_TRITON_VERSION; }

absl::Status CheckTensor(const std::string& what, const at::Tensor& t,
                         const std::vector<int64_t>& shape, const std::string& dtype,
                         const c10::Device& device) {
  if (!t.defined()) return absl::InvalidArgumentError(absl::StrCat(what, ": undefined tensor"));
  if (t.sizes() != at::IntArrayRef(shape)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": shape ", ShapeStr(t.sizes()),
                                                   ", expected ", ShapeStr(shape)));
  }
  if (DtypeName(t.scalar_type()) != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": dtype ", DtypeName(t.scalar_type()),
                                                   ", expected ", dtype));
  }
  if (t.device().type() != device.type() ||
      (device.has_index() && t.device().index() != device.index())) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": on ", t.device().str(),
                                                   ", expected ", device.str()));
  }
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not contiguous (strides ",
                                                   ShapeStr(t.strides()), ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckPackageMetadata(const std::string& path, const cache::PackageManifest& manifest,
                                  const c10::Device& device) {
  std::unordered_map<std::string, std::string> md;
  try {
    md = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
  } catch (const std::exception& e) {
    return absl::DataLossError(
        absl::StrCat("package ", path, ": cannot read metadata: ", ExceptionMessage(e)));
  }
  auto get = [&](const std::string& k) {
    auto it = md.find(k);
    return it == md.end() ? std::string() : it->second;
  };
  const std::string pkg_device = get("AOTI_DEVICE_KEY");
  const std::string want_device = device.is_cuda() ? "cuda" : device.is_cpu() ? "cpu" : device.str();
  if (pkg_device != want_device) {
    return absl::FailedPreconditionError(absl::StrCat("package ", path, " was built for device '",
                                                      pkg_device, "', this node runs '",
                                                      want_device, "'"));
  }
  const std::string pkg_torch = get("kiln.torch_version");
  if (pkg_torch != BuildTorchVersion()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "package ", path, " was built by torch '", pkg_torch.empty() ? "(unrecorded)" : pkg_torch,
        "', this runtime links torch ", BuildTorchVersion(), "; AOTI packages do not load across versions"));
  }
  if (device.is_cuda()) {
    const std::string cap = get("AOTI_COMPUTE_CAPABILITY");
    if (!cap.empty() && manifest.key.target != "cuda:sm_" + cap) {
      return absl::FailedPreconditionError(absl::StrCat("package ", path, " was built for sm_",
                                                        cap, ", key says ", manifest.key.target));
    }
  }
  if (get("kiln.digest") != manifest.digest) {
    return absl::FailedPreconditionError(absl::StrCat("package ", path, " carries key digest '",
                                                      get("kiln.digest"), "', manifest says ",
                                                      manifest.digest));
  }
  return absl::OkStatus();
}

AotiPackage::~AotiPackage() = default;

absl::StatusOr<std::unique_ptr<AotiPackage>> AotiPackage::Load(const cache::LocatedPackage& pkg,
                                                               const c10::Device& device) {
  if (auto s = CheckPackageMetadata(pkg.package_path, pkg.manifest, device); !s.ok()) return s;
  std::unique_ptr<AotiPackage> p(new AotiPackage());
  p->manifest_ = pkg.manifest;
  p->device_ = device;
  try {
    p->loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        pkg.package_path, "model", /*run_single_threaded=*/device.is_cuda(), /*num_runners=*/1,
        device.is_cuda() ? device.index() : static_cast<c10::DeviceIndex>(-1));
    p->fqns_ = p->loader_->get_constant_fqns();
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("loading package ", pkg.package_path, ": ", ExceptionMessage(e)));
  }
  for (const auto& fqn : p->fqns_) {
    if (!p->manifest_.constants.count(fqn)) {
      return absl::DataLossError(absl::StrCat("package ", pkg.package_path, " asks for constant '",
                                              fqn, "' that its manifest does not describe"));
    }
  }
  // A weight the graph uses but the package does not ask for was baked into its code at compile
  // time (Inductor inlines small constants): running it would ignore this model's value.
  std::vector<std::string> baked;
  const std::set<std::string> asked(p->fqns_.begin(), p->fqns_.end());
  for (const auto& [fqn, spec] : p->manifest_.constants) {
    if (spec.source == "checkpoint" && !asked.count(fqn)) baked.push_back(fqn);
  }
  if (!baked.empty()) {
    return absl::DataLossError(absl::StrCat("package ", pkg.package_path,
                                            " has weights baked into its code instead of taking "
                                            "them at run time: ",
                                            absl::StrJoin(baked, ", ")));
  }
  return p;
}

absl::StatusOr<std::unordered_map<std::string, at::Tensor>> AotiPackage::Choose(
    const std::unordered_map<std::string, at::Tensor>& constants) const {
  std::vector<std::string> missing;
  std::unordered_map<std::string, at::Tensor> chosen;
  for (const auto& fqn : fqns_) {
    auto it = constants.find(fqn);
    if (it == constants.end()) {
      missing.push_back(fqn);
      continue;
    }
    const auto& spec = manifest_.constants.at(fqn);
    if (auto s = CheckTensor(absl::StrCat(manifest_.key.component, " weight '", fqn, "'"),
                             it->second, spec.shape, spec.dtype, device_);
        !s.ok()) {
      return s;
    }
    chosen.emplace(fqn, it->second);
  }
  if (!missing.empty()) {
    return absl::NotFoundError(absl::StrCat(manifest_.key.component, ": ", missing.size(),
                                            " weight(s) missing: ", absl::StrJoin(missing, ", ")));
  }
  return chosen;
}

absl::Status AotiPackage::LoadActive(std::unordered_map<std::string, at::Tensor>& constants) {
  try {
    LeakedReferences::Get().Loaded(constants);  // a partial load may leak them too
    loader_->load_constants(constants, /*use_inactive=*/false, /*check_full_update=*/true,
                            /*user_managed=*/true);
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat(manifest_.key.component, ": load_constants: ", ExceptionMessage(e)));
  }
  return absl::OkStatus();
}

absl::Status AotiPackage::LoadConstants(
    const std::unordered_map<std::string, at::Tensor>& constants) {
  auto chosen = Choose(constants);
  if (!chosen.ok()) return chosen.status();
  if (auto s = LoadActive(*chosen); !s.ok()) {
    // The buffer may point at some of these tensors: keep them until a load succeeds.
    for (auto& [fqn, t] : *chosen) failed_load_.push_back(t);
    constants_loaded_ = false;  // Run refuses a half-loaded buffer
    return s;
  }
  constants_ = *std::move(chosen);
  base_constants_ = constants_;
  constants_loaded_ = true;
  prepared_ = false;
  pending_constants_.clear();
  failed_load_.clear();
  return absl::OkStatus();
}

void AotiPackage::ReleaseConstants() {
  constants_.clear();
  base_constants_.clear();
  pending_constants_.clear();
  failed_load_.clear();
  constants_loaded_ = false;
  prepared_ = false;
}

absl::Status AotiPackage::SwapConstants(
    const std::unordered_map<std::string, at::Tensor>& constants) {
  if (auto s = PrepareConstants(constants); !s.ok()) return s;
  return CommitConstants();
}

absl::Status AotiPackage::PrepareConstants(
    const std::unordered_map<std::string, at::Tensor>& constants) {
  if (!constants_loaded_) {
    return absl::FailedPreconditionError(
        absl::StrCat(manifest_.key.component, ": swapping constants before LoadConstants()"));
  }
  prepared_ = false;
  pending_constants_.clear();
  auto chosen = Choose(constants);
  if (!chosen.ok()) return chosen.status();
  // Kept, not yet given to the runtime: Run() goes on with the active set (see the header).
  pending_constants_ = *std::move(chosen);
  prepared_ = true;
  return absl::OkStatus();
}

absl::Status AotiPackage::CommitConstants() {
  if (!prepared_) {
    return absl::FailedPreconditionError(
        absl::StrCat(manifest_.key.component, ": committing constants with nothing prepared"));
  }
  prepared_ = false;
  std::unordered_map<std::string, at::Tensor> next = std::move(pending_constants_);
  pending_constants_.clear();
  if (auto s = LoadActive(next); !s.ok()) {
    // The active buffer may point at some of the new tensors and some of the old: load the old
    // set again (every pointer back); if even that fails, keep both and refuse to run.
    for (auto& [fqn, t] : next) failed_load_.push_back(t);
    if (auto r = LoadActive(constants_); r.ok()) {
      failed_load_.clear();
    } else {
      constants_loaded_ = false;
      return absl::InternalError(absl::StrCat(s.message(), "; restoring the previous set: ",
                                              r.message()));
    }
    return s;
  }
  // The set replaced is held by nothing of kiln's now, only by the runtime's leaked references
  // (FreeUnusedConstants frees it once nobody else holds it).
  constants_ = std::move(next);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<at::Tensor>> AotiPackage::Run(const std::vector<at::Tensor>& inputs) {
  return RunOn(inputs, nullptr);
}

absl::StatusOr<at::Tensor> AotiPackage::RunFirst(const std::vector<at::Tensor>& inputs) {
  auto outputs = Run(inputs);
  if (!outputs.ok()) return outputs.status();
  if (outputs->empty()) {
    return absl::InternalError(absl::StrCat(manifest_.key.component, ": package returned no outputs"));
  }
  return (*outputs)[0];
}

absl::StatusOr<std::vector<at::Tensor>> AotiPackage::RunOn(const std::vector<at::Tensor>& inputs,
                                                           void* cuda_stream) {
  if (!constants_loaded_) {
    return absl::FailedPreconditionError(
        absl::StrCat(manifest_.key.component, ": Run() before LoadConstants()"));
  }
  if (inputs.size() != manifest_.inputs.size()) {
    return absl::InvalidArgumentError(absl::StrCat(manifest_.key.component, ": ", inputs.size(),
                                                   " inputs, expected ", manifest_.inputs.size()));
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& spec = manifest_.inputs[i];
    if (auto s = CheckTensor(absl::StrCat(manifest_.key.component, " input '", spec.name, "'"),
                             inputs[i], spec.shape, spec.dtype, device_);
        !s.ok()) {
      return s;
    }
  }
  try {
    return loader_->run(inputs, cuda_stream);
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat(manifest_.key.component, ": run failed: ", ExceptionMessage(e)));
  }
}

}  // namespace kiln::pipeline
