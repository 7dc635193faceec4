#include "pipeline/weights.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kiln::pipeline {
namespace {

absl::StatusOr<at::ScalarType> TorchType(DType d) {
  switch (d) {
    case DType::kF64: return at::kDouble;
    case DType::kF32: return at::kFloat;
    case DType::kF16: return at::kHalf;
    case DType::kBF16: return at::kBFloat16;
    case DType::kI64: return at::kLong;
    case DType::kI32: return at::kInt;
    case DType::kI16: return at::kShort;
    case DType::kI8: return at::kChar;
    case DType::kU8: return at::kByte;
    case DType::kBool: return at::kBool;
    case DType::kF8E4M3: return at::kFloat8_e4m3fn;
    case DType::kF8E5M2: return at::kFloat8_e5m2;
    default: return absl::UnimplementedError(absl::StrCat("dtype ", DTypeName(d), " has no torch equivalent here"));
  }
}

// Names under which a checkpoint may store a tensor that a package asks for by `fqn`.
std::vector<std::string> Aliases(const std::string& fqn) {
  if (fqn == "shared.weight") return {fqn, "encoder.embed_tokens.weight"};  // T5 tied embedding
  if (fqn == "encoder.embed_tokens.weight") return {fqn, "shared.weight"};
  return {fqn};
}

}  // namespace

absl::StatusOr<at::Tensor> TensorFromView(const TensorView& view) {
  auto type = TorchType(view.dtype);
  if (!type.ok()) return absl::Status(type.status().code(), absl::StrCat("tensor '", view.name, "': ", type.status().message()));
  if (view.nbytes == 0) return torch::empty(view.shape, torch::TensorOptions().dtype(*type));
  return torch::from_blob(const_cast<void*>(view.data), view.shape, torch::TensorOptions().dtype(*type));
}

std::string ComponentWeights::FolderFor(const std::string& component) {
  return component == "vae_decoder" ? "vae" : component;
}

std::string ComponentWeights::StemFor(const std::string& component) {
  return component == "transformer" || component == "vae_decoder" ? "diffusion_pytorch_model"
                                                                  : "model";
}

absl::StatusOr<std::unique_ptr<ComponentWeights>> ComponentWeights::Open(const std::string& dir,
                                                                         const std::string& stem,
                                                                         const c10::Device& device) {
  SafetensorsOptions opts;
  opts.sequential = true;
  auto set = WeightSet::OpenDir(dir, stem, opts);
  if (!set.ok()) return set.status();
  std::unique_ptr<ComponentWeights> w(new ComponentWeights());
  w->dir_ = dir;
  w->device_ = device;
  w->set_ = *std::move(set);
  return w;
}

absl::StatusOr<std::unordered_map<std::string, at::Tensor>> ComponentWeights::Gather(
    const AotiPackage& package, const std::string& extra_constants_path) {
  std::unique_ptr<SafetensorsFile> extra;
  if (!extra_constants_path.empty()) {
    auto f = SafetensorsFile::Open(extra_constants_path);
    if (!f.ok()) return f.status();
    extra = *std::move(f);
  }
  std::unordered_map<std::string, at::Tensor> out;
  std::vector<std::string> missing;
  const auto& manifest = package.manifest();
  for (const auto& fqn : package.constant_fqns()) {
    const auto& spec = manifest.constants.at(fqn);
    auto dtype = DtypeFromName(spec.dtype);
    if (!dtype.ok()) return dtype.status();
    auto key = std::make_pair(fqn, spec.dtype);
    if (auto it = cache_.find(key); it != cache_.end() && spec.source == "checkpoint") {
      out[fqn] = it->second;
      continue;
    }
    const TensorView* view = nullptr;
    std::string origin;
    if (spec.source == "package") {
      view = extra ? extra->Find(fqn) : nullptr;
      origin = extra_constants_path;
    } else {
      for (const auto& name : Aliases(fqn)) {
        if ((view = set_->Find(name)) != nullptr) break;
      }
      origin = dir_;
    }
    if (view == nullptr) {
      missing.push_back(fqn);
      continue;
    }
    if (view->shape != spec.shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          manifest.key.component, " weight '", fqn, "' in ", origin, ": shape ", ShapeString(view->shape),
          ", the package expects ", ShapeString(spec.shape)));
    }
    auto host = TensorFromView(*view);
    if (!host.ok()) return host.status();
    at::Tensor t;
    try {
      t = host->to(device_, *dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("weight '", fqn, "': ", e.what()));
    }
    bytes_read_ += view->nbytes;
    if (spec.source == "checkpoint") cache_[key] = t;
    out[fqn] = t;
  }
  if (!missing.empty()) {
    return absl::NotFoundError(absl::StrCat(manifest.key.component, ": ", missing.size(),
                                            " weight(s) missing from ", dir_, ": ",
                                            absl::StrJoin(missing, ", ")));
  }
  return out;
}

}  // namespace kiln::pipeline
