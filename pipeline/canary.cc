#include "pipeline/canary.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/stopwatch.h"
#include "pipeline/safetensors.h"
#include "pipeline/weights.h"

namespace kiln::pipeline {
namespace {

constexpr char kRecipe[] = "sin-index-v1";
// Keep equal to kiln/canary.py.
constexpr double kElementStep = 0.7548776662466927;
constexpr double kConstantStep = 0.5698402909980532;

}  // namespace

at::Tensor SyntheticConstant(int64_t index, const std::vector<int64_t>& shape,
                             at::ScalarType dtype, const c10::Device& device) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  at::Tensor t = torch::arange(n, torch::TensorOptions().dtype(torch::kFloat32).device(device));
  // The same ops in the same order as the Python twin: mul, add, sin, mul, reshape, cast.
  at::Tensor v = torch::sin(t * kElementStep + static_cast<double>(index) * kConstantStep);
  const double scale = shape.size() >= 2 && shape.back() > 0
                           ? 1.0 / std::sqrt(static_cast<double>(shape.back()))
                           : 0.5;
  return (v * scale).reshape(shape).to(dtype);
}

absl::StatusOr<std::unordered_map<std::string, at::Tensor>> SyntheticConstants(
    const cache::PackageManifest& manifest, const c10::Device& device) {
  // By sorted FQN: std::map order, as the Python twin's sorted().
  std::unordered_map<std::string, at::Tensor> constants;
  int64_t index = 0;
  for (const auto& [fqn, spec] : manifest.constants) {
    auto dtype = DtypeFromName(spec.dtype);
    if (!dtype.ok()) return dtype.status();
    constants.emplace(fqn, SyntheticConstant(index++, spec.shape, *dtype, device));
  }
  return constants;
}

absl::StatusOr<CanaryResult> RunCanary(AotiPackage& package, const cache::LocatedPackage& found) {
  CanaryResult result;
  const nlohmann::json& raw = found.manifest.raw;
  if (!raw.contains("canary") || raw["canary"].is_null()) return result;
  const auto t = SteadyNow();
  const std::string component = found.manifest.key.component;
  auto bad = [&](const std::string& why) {
    return absl::DataLossError(absl::StrCat(component, " canary: ", why));
  };
  const nlohmann::json& c = raw["canary"];
  if (!c.is_object() || !c.contains("file") || !c["file"].is_string() ||
      !c.contains("tolerance") || !c["tolerance"].is_number() ||
      c.value("constants", "") != kRecipe || !c.contains("inputs") ||
      !c["inputs"].is_number_integer() || !c.contains("outputs") ||
      !c["outputs"].is_number_integer()) {
    return bad("manifest record is malformed or uses an unknown recipe");
  }
  const std::string file = c["file"].get<std::string>();
  if (file.find('/') != std::string::npos || file.empty() || file[0] == '.') {
    return bad("file name '" + file + "' is not a plain name");
  }
  result.tolerance = c["tolerance"].get<double>();
  auto record = SafetensorsFile::Open(absl::StrCat(found.dir, "/", file));
  if (!record.ok()) return bad(std::string(record.status().message()));
  const c10::Device device = package.device();

  auto constants = SyntheticConstants(found.manifest, device);
  if (!constants.ok()) return constants.status();
  if (auto s = package.LoadConstants(*constants); !s.ok()) return s;

  std::vector<at::Tensor> inputs;
  for (int64_t i = 0; i < c["inputs"].get<int64_t>(); ++i) {
    const TensorView* view = (*record)->Find(absl::StrCat("input.", i));
    if (view == nullptr) return bad(absl::StrCat("input.", i, " missing from ", file));
    auto host = TensorFromView(*view);
    if (!host.ok()) return host.status();
    inputs.push_back(host->to(device).contiguous());
  }
  auto outputs = package.Run(inputs);
  if (!outputs.ok()) return outputs.status();
  const int64_t want = c["outputs"].get<int64_t>();
  if (static_cast<int64_t>(outputs->size()) != want) {
    return bad(absl::StrCat(outputs->size(), " outputs, the record has ", want));
  }
  for (int64_t i = 0; i < want; ++i) {
    const TensorView* view = (*record)->Find(absl::StrCat("output.", i));
    if (view == nullptr) return bad(absl::StrCat("output.", i, " missing from ", file));
    auto expected_host = TensorFromView(*view);
    if (!expected_host.ok()) return expected_host.status();
    at::Tensor got = (*outputs)[i].detach().to(torch::kCPU).to(torch::kFloat64);
    at::Tensor expected = expected_host->to(torch::kFloat64);
    if (got.sizes() != expected.sizes()) {
      return bad(absl::StrCat("output ", i, " has shape ", ShapeString(got.sizes().vec()),
                              ", the record ", ShapeString(expected.sizes().vec())));
    }
    // Non-finite values must sit where the record has them; the rest is compared in L2.
    at::Tensor finite = torch::isfinite(expected);
    if (!torch::equal(finite, torch::isfinite(got)) ||
        !torch::equal(torch::isnan(expected), torch::isnan(got))) {
      return bad(absl::StrCat("output ", i, " has NaN/Inf where the record has none, or not "
                              "where it has"));
    }
    at::Tensor e = torch::where(finite, expected, torch::zeros_like(expected));
    at::Tensor g = torch::where(finite, got, torch::zeros_like(got));
    const double denom = e.norm().item<double>();
    const double diff = (g - e).norm().item<double>();
    const double err = denom > 0 ? diff / denom : diff;
    result.worst_error = std::max(result.worst_error, err);
    if (!(err <= result.tolerance)) {
      return bad(absl::StrCat("output ", i, " differs from the output recorded at compile time: "
                              "relative L2 error ", err, " > tolerance ", result.tolerance));
    }
  }
  result.ran = true;
  result.seconds = SecondsSince(t);
  return result;
}

absl::StatusOr<int> RecordCanary(const std::string& manifest_path, const std::string& package_path,
                                 const std::string& inputs_path, const c10::Device& device,
                                 const std::string& out_path) {
  auto manifest = cache::PackageManifest::FromFile(manifest_path);
  if (!manifest.ok()) return manifest.status();
  cache::LocatedPackage located;
  located.manifest = *manifest;
  located.package_path = package_path;
  auto package = AotiPackage::Load(located, device);
  if (!package.ok()) return package.status();
  auto constants = SyntheticConstants(*manifest, device);
  if (!constants.ok()) return constants.status();
  if (auto s = (*package)->LoadConstants(*constants); !s.ok()) return s;
  auto record = SafetensorsFile::Open(inputs_path);
  if (!record.ok()) return record.status();
  std::vector<at::Tensor> inputs;
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (size_t i = 0;; ++i) {
    const TensorView* view = (*record)->Find(absl::StrCat("input.", i));
    if (view == nullptr) break;
    auto host = TensorFromView(*view);
    if (!host.ok()) return host.status();
    inputs.push_back(host->to(device).contiguous());
    tensors.emplace_back(absl::StrCat("input.", i), host->clone());
  }
  auto outputs = (*package)->Run(inputs);
  if (!outputs.ok()) return outputs.status();
  for (size_t i = 0; i < outputs->size(); ++i) {
    tensors.emplace_back(absl::StrCat("output.", i), (*outputs)[i]);
  }
  if (auto s = WriteSafetensors(out_path, tensors); !s.ok()) return s;
  return static_cast<int>(outputs->size());
}

}  // namespace kiln::pipeline
