#include "pipeline/weights.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/files.h"
#include "nlohmann/json.hpp"
#include "pipeline/lora.h"
#include "pipeline/torch_error.h"

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

absl::StatusOr<DType> SafetensorsType(at::ScalarType t) {
  for (DType d : {DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kI64, DType::kI32,
                  DType::kI16, DType::kI8, DType::kU8, DType::kBool, DType::kF8E4M3,
                  DType::kF8E5M2}) {
    auto torch_type = TorchType(d);
    if (torch_type.ok() && *torch_type == t) return d;
  }
  return absl::UnimplementedError(absl::StrCat("dtype ", c10::toString(t),
                                               " has no safetensors name here"));
}

// Names under which a checkpoint may store a tensor that a package asks for by `fqn`.
std::vector<std::string> Aliases(const std::string& fqn) {
  if (fqn == "shared.weight") return {fqn, "encoder.embed_tokens.weight"};  // T5 tied embedding
  if (fqn == "encoder.embed_tokens.weight") return {fqn, "shared.weight"};
  return {fqn};
}

constexpr double kFp8Max = 448.0;     // largest finite float8_e4m3fn
constexpr double kScaleEps = 1e-12;   // amax floor: an all-zero row gets a tiny scale, not 0 / 0

// Row-wise e4m3 quantization of the dim-0 concatenation of `sources` (2-D, on the device), in
// float32: {q float8_e4m3fn [out, in], scale float32 [1, out]}. Division by a tensor, not by a
// scalar: CUDA computes `x / scalar` as `x * (1 / scalar)`, which would differ from the CPU and
// from kiln.models.quant by an ulp.
std::pair<at::Tensor, at::Tensor> Fp8Rowwise(const std::vector<at::Tensor>& sources) {
  std::vector<at::Tensor> f32;
  for (const auto& s : sources) f32.push_back(s.to(at::kFloat));
  at::Tensor w = at::cat(f32, 0);
  at::Tensor amax = w.abs().amax({1}, /*keepdim=*/true).clamp_min(kScaleEps);
  at::Tensor scale = amax.div(at::full_like(amax, kFp8Max));
  at::Tensor q = w.div(scale).clamp(-kFp8Max, kFp8Max).to(at::kFloat8_e4m3fn);
  return {q.contiguous(), scale.reshape({1, -1}).contiguous()};
}

std::string DerivationKey(const std::string& op, const std::vector<std::string>& sources,
                          const std::string& dtype) {
  return absl::StrCat(op, "(", absl::StrJoin(sources, ", "), ") -> ", dtype);
}

}  // namespace

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  std::vector<at::Tensor> host;
  size_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    auto dtype = SafetensorsType(tensor.scalar_type());
    if (!dtype.ok()) return absl::Status(dtype.status().code(), absl::StrCat(name, ": ", dtype.status().message()));
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const size_t bytes = t.numel() * t.element_size();
    header[name] = {{"dtype", DTypeName(*dtype)}, {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    host.push_back(std::move(t));
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);  // little-endian
  out += json;
  out.reserve(out.size() + offset);
  for (const auto& t : host) {
    out.append(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  }
  return WriteFileAtomically(path, out);
}

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
  // Device loads read every tensor right away: prefetch the files at the disk's sequential rate.
  SafetensorsOptions options;
  options.prefetch = device.is_cuda();
  auto set = WeightSet::OpenDir(dir, stem, options);
  if (!set.ok()) return set.status();
  std::unique_ptr<ComponentWeights> w(new ComponentWeights());
  w->dir_ = dir;
  w->device_ = device;
  w->set_ = *std::move(set);
  return w;
}

absl::StatusOr<std::unique_ptr<ComponentWeights>> ComponentWeights::FromTensors(
    std::vector<std::pair<std::string, at::Tensor>> tensors, const c10::Device& device,
    std::string origin) {
  std::unique_ptr<ComponentWeights> w(new ComponentWeights());
  w->dir_ = std::move(origin);
  w->device_ = device;
  w->in_memory_ = true;
  std::vector<TensorView> views;  // names, dtypes and shapes (checkpoint(): LoRAs check them)
  for (auto& [name, tensor] : tensors) {
    auto dtype = SafetensorsType(tensor.scalar_type());
    if (!dtype.ok()) {
      return absl::Status(dtype.status().code(),
                          absl::StrCat(name, ": ", dtype.status().message()));
    }
    TensorView v;
    v.name = name;
    v.dtype = *dtype;
    v.shape = tensor.sizes().vec();
    v.nbytes = tensor.nbytes();
    v.data = tensor.is_cpu() && v.nbytes > 0 ? tensor.data_ptr() : nullptr;
    views.push_back(std::move(v));
    w->memory_[name] = std::move(tensor);
  }
  auto set = WeightSet::Describe(std::move(views), w->dir_);
  if (!set.ok()) return set.status();
  w->set_ = *std::move(set);
  return w;
}

absl::StatusOr<at::Tensor> ComponentWeights::Source(const std::string& name) const {
  if (in_memory_) {
    auto it = memory_.find(name);
    return it == memory_.end() ? at::Tensor() : it->second;
  }
  const TensorView* view = set_->Find(name);
  if (view == nullptr) return at::Tensor();
  return TensorFromView(*view);
}

absl::StatusOr<std::unordered_map<std::string, at::Tensor>> ComponentWeights::Gather(
    const AotiPackage& package, const std::string& extra_constants_path) {
  return Gather(package.constant_fqns(), package.manifest(), extra_constants_path);
}

absl::StatusOr<at::Tensor> ComponentWeights::Derive(const std::string& component,
                                                    const std::string& fqn,
                                                    const cache::ConstantSpec& spec,
                                                    at::ScalarType dtype,
                                                    std::vector<std::string>* missing) {
  const auto& d = spec.derive;
  const std::string what = absl::StrCat(component, " weight '", fqn, "' = ", d.op, "(",
                                        absl::StrJoin(d.sources, ", "), ")");
  auto check_shape = [&](const at::Tensor& t) -> absl::StatusOr<at::Tensor> {
    if (t.sizes() != at::IntArrayRef(spec.shape)) {
      return absl::InvalidArgumentError(absl::StrCat(what, " from ", dir_, ": shape ",
                                                     ShapeString(t.sizes().vec()),
                                                     ", the package expects ",
                                                     ShapeString(spec.shape)));
    }
    return t;
  };
  if (auto it = derived_.find(DerivationKey(d.op, d.sources, spec.dtype)); it != derived_.end()) {
    return check_shape(it->second);
  }
  const bool fp8 = d.op == "fp8_rowwise" || d.op == "fp8_rowwise_scale";
  if (!fp8 && d.op != "concat0") {
    return absl::UnimplementedError(absl::StrCat(what, ": unknown derivation op '", d.op,
                                                 "' (this build knows concat0, fp8_rowwise, "
                                                 "fp8_rowwise_scale)"));
  }
  const at::ScalarType want = d.op == "fp8_rowwise" ? at::kFloat8_e4m3fn : at::kFloat;
  if (fp8 && dtype != want) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", d.op, " makes ", DtypeName(want),
                                                   ", the manifest says ", spec.dtype));
  }
  std::vector<at::Tensor> found;  // each source as the checkpoint holds it
  std::vector<std::string> names;  // and the name it was found under
  bool complete = true;
  for (const auto& source : d.sources) {
    at::Tensor t;
    for (const auto& name : Aliases(source)) {
      auto got = Source(name);
      if (!got.ok()) return got.status();
      if ((t = *got).defined()) {
        names.push_back(name);
        break;
      }
    }
    if (!t.defined()) {
      missing->push_back(absl::StrCat(source, " (for ", fqn, ")"));
      complete = false;
      names.emplace_back();
    }
    found.push_back(t);
  }
  if (!complete) return at::Tensor();
  // Sources concatenate on dim 0: same rank, same trailing sizes; fp8 ops take matrices.
  for (size_t i = 0; i < found.size(); ++i) {
    const auto shape = found[i].sizes();
    const auto first = found.front().sizes();
    const bool fits = !shape.empty() && shape.size() == first.size() &&
                      std::equal(shape.begin() + 1, shape.end(), first.begin() + 1) &&
                      (!fp8 || shape.size() == 2);
    if (!fits) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " in ", dir_, ": source '", names[i], "' has shape ", ShapeString(shape.vec()),
          ", '", names.front(), "' ", ShapeString(first.vec()), "; ", d.op, " needs ",
          fp8 ? "matrices" : "tensors", " with equal sizes after dim 0"));
    }
  }
  at::Tensor result;
  try {
    std::vector<at::Tensor> sources;
    for (const at::Tensor& t : found) {
      // To the device as stored (no conversion on the host); the op runs there. On the CPU this
      // is the mmap'd view itself, which the ops below only read.
      sources.push_back(t.to(device_, t.scalar_type()));
      if (!in_memory_) bytes_read_ += t.nbytes();
    }
    if (d.op == "concat0") {
      for (auto& t : sources) t = t.to(dtype);
      result = at::cat(sources, 0).contiguous();
      derived_[DerivationKey(d.op, d.sources, spec.dtype)] = result;
    } else {
      auto [q, scale] = Fp8Rowwise(sources);
      derived_[DerivationKey("fp8_rowwise", d.sources, "float8_e4m3fn")] = q;
      derived_[DerivationKey("fp8_rowwise_scale", d.sources, "float32")] = scale;
      result = d.op == "fp8_rowwise" ? q : scale;
    }
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, ": ", ExceptionMessage(e)));
  }
  return check_shape(result);
}

absl::StatusOr<std::unordered_map<std::string, at::Tensor>> ComponentWeights::Gather(
    const std::vector<std::string>& fqns, const cache::PackageManifest& manifest,
    const std::string& extra_constants_path) {
  std::unique_ptr<SafetensorsFile> extra;
  if (!extra_constants_path.empty()) {
    auto f = SafetensorsFile::Open(extra_constants_path);
    if (!f.ok()) return f.status();
    extra = *std::move(f);
  }
  const std::string& component = manifest.key.component;
  std::unordered_map<std::string, at::Tensor> out;
  std::vector<std::string> missing;
  for (const auto& fqn : fqns) {
    auto spec_it = manifest.constants.find(fqn);
    if (spec_it == manifest.constants.end()) {
      return absl::DataLossError(absl::StrCat(component, ": constant '", fqn,
                                              "' is not described by the package manifest"));
    }
    const auto& spec = spec_it->second;
    auto dtype = DtypeFromName(spec.dtype);
    if (!dtype.ok()) return dtype.status();
    if (spec.source == "checkpoint" && !spec.derive.op.empty()) {
      auto t = Derive(component, fqn, spec, *dtype, &missing);
      if (!t.ok()) return t.status();
      if (t->defined()) out[fqn] = *t;
      continue;
    }
    auto key = std::make_pair(fqn, spec.dtype);
    if (auto it = cache_.find(key); it != cache_.end() && spec.source == "checkpoint") {
      out[fqn] = it->second;
      continue;
    }
    at::Tensor host;  // a view of a file's mapping, or the in-memory tensor (from_memory)
    bool from_memory = false;
    std::string origin;
    if (spec.source == "package") {
      const TensorView* view = extra ? extra->Find(fqn) : nullptr;
      if (view != nullptr) {
        auto t = TensorFromView(*view);
        if (!t.ok()) return t.status();
        host = *t;
      }
      origin = extra_constants_path;
    } else {
      for (const auto& name : Aliases(fqn)) {
        auto t = Source(name);
        if (!t.ok()) return t.status();
        if ((host = *t).defined()) break;
      }
      from_memory = in_memory_;
      origin = dir_;
    }
    if (!host.defined()) {
      missing.push_back(fqn);
      continue;
    }
    if (host.sizes() != at::IntArrayRef(spec.shape)) {
      return absl::InvalidArgumentError(absl::StrCat(
          component, " weight '", fqn, "' in ", origin, ": shape ",
          ShapeString(host.sizes().vec()), ", the package expects ", ShapeString(spec.shape)));
    }
    at::Tensor t;
    try {
      // A mapping is read-only and goes away with the file: copied. An in-memory tensor of the
      // right dtype on the device is the constant itself.
      t = host.to(device_, *dtype, /*non_blocking=*/false, /*copy=*/!from_memory).contiguous();
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("weight '", fqn, "': ", ExceptionMessage(e)));
    }
    if (!from_memory) bytes_read_ += host.nbytes();
    if (spec.source == "checkpoint") cache_[key] = t;
    out[fqn] = t;
  }
  if (!missing.empty()) {
    return absl::NotFoundError(absl::StrCat(component, ": ", missing.size(),
                                            " weight(s) missing from ", dir_, ": ",
                                            absl::StrJoin(missing, ", ")));
  }
  return out;
}

absl::StatusOr<std::unordered_map<std::string, at::Tensor>> ComponentWeights::Merge(
    const std::unordered_map<std::string, at::Tensor>& base,
    const cache::PackageManifest& manifest, const LoraDeltas& deltas,
    std::unordered_map<std::string, at::Tensor>* memo) {
  std::unordered_map<std::string, at::Tensor> constants = base;
  const std::string& component = manifest.key.component;
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> fp8;  // by sources: {q, scale}
  for (auto& [fqn, tensor] : constants) {
    auto spec_it = manifest.constants.find(fqn);
    if (spec_it == manifest.constants.end()) continue;  // AotiPackage checked every FQN it takes
    const auto& spec = spec_it->second;
    if (spec.source != "checkpoint") continue;
    const std::string& op = spec.derive.op;
    const std::vector<std::string> sources = op.empty() ? std::vector<std::string>{fqn}
                                                        : spec.derive.sources;
    if (std::none_of(sources.begin(), sources.end(),
                     [&](const std::string& s) { return deltas.Touches(s); })) {
      continue;
    }
    if (memo != nullptr) {
      if (auto it = memo->find(fqn); it != memo->end()) {
        tensor = it->second;
        continue;
      }
    }
    at::Tensor merged;
    try {
      if (op == "fp8_rowwise" || op == "fp8_rowwise_scale") {
        const std::string key = absl::StrJoin(sources, ", ");
        auto it = fp8.find(key);
        if (it == fp8.end()) {
          std::vector<at::Tensor> merged_sources;
          for (const auto& source : sources) {
            auto host = Source(source);
            if (!host.ok()) return host.status();
            if (!host->defined()) {
              return absl::NotFoundError(absl::StrCat(component, ": weight '", source, "' (for ",
                                                      fqn, ") missing from ", dir_));
            }
            at::Tensor w = host->to(device_, host->scalar_type()).to(at::kFloat);
            if (!in_memory_) bytes_read_ += host->nbytes();
            if (at::Tensor d = deltas.DeltaFor(source); d.defined()) w = w.add(d);
            merged_sources.push_back(w);
          }
          it = fp8.emplace(key, Fp8Rowwise(merged_sources)).first;
        }
        merged = op == "fp8_rowwise" ? it->second.first : it->second.second;
      } else {
        std::vector<at::Tensor> parts;
        for (const auto& source : sources) {
          at::Tensor d = deltas.DeltaFor(source);
          if (!d.defined()) {
            const TensorView* view = set_->Find(source);
            if (view == nullptr) {
              return absl::NotFoundError(absl::StrCat(component, ": weight '", source, "' (for ",
                                                      fqn, ") missing from ", dir_));
            }
            d = at::zeros(view->shape, at::TensorOptions().dtype(at::kFloat).device(device_));
          }
          parts.push_back(d);
        }
        const at::Tensor delta = parts.size() == 1 ? parts.front() : at::cat(parts, 0);
        if (delta.sizes() != tensor.sizes()) {
          return absl::InvalidArgumentError(absl::StrCat(
              component, " weight '", fqn, "': the LoRA delta has shape ",
              ShapeString(delta.sizes().vec()), ", the weight ", ShapeString(tensor.sizes().vec())));
        }
        merged = tensor.to(at::kFloat).add(delta).to(tensor.scalar_type()).contiguous();
      }
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat(component, " weight '", fqn, "': merging LoRAs: ",
                                              ExceptionMessage(e)));
    }
    if (memo != nullptr) (*memo)[fqn] = merged;
    tensor = merged;
  }
  return constants;
}

}  // namespace kiln::pipeline
