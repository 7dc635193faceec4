// kiln-bench: the kiln side of the transformer benchmark (bench/gpu/run.sh). Loads the
// transformer package of one bucket exactly as the pipeline does (package from a provider over
// the local store that never compiles, weights from the repository, derived constants on the
// device; a regional set, compile option layout "regional", as RegionalTransformer), feeds it
// the inputs that bench/gpu/baselines.py wrote, and prints one JSON object:
//   - per-step ms (CUDA events around one call, median after warm-up) run plainly and replayed
//     as a CUDA graph, TFLOP/s from --flop;
//   - relative error ||out - ref|| / ||ref|| against each --reference (eager PyTorch outputs);
//   - weights read and derived (bytes, seconds), package load seconds, peak GPU memory;
//   - GPU time per kernel class of one plain call (LibTorch's Kineto profiler; kernels inside a
//     graph replay are not visible to it).
//
//   kiln-bench --model DIR --package_dir DIR --precision bf16|fp8 --inputs inputs.safetensors
//       [--reference a.safetensors,b.safetensors] [--width 1024 --height 1024] [--iters 20]
// Exit status: 0 ok, 2 bad input, 1 other failure.
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/torch.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cache/package_provider.h"
#include "common/exit.h"
#include "common/log_flags.h"
#include "common/status.h"
#include "common/stopwatch.h"
#include "nlohmann/json.hpp"
#include "common/flags.h"
#include "pipeline/aoti_package.h"
#include "pipeline/cuda_graph.h"
#include "pipeline/flux_pipeline.h"
#include "pipeline/regional.h"
#include "pipeline/safetensors.h"
#include "pipeline/weights.h"

ABSL_FLAG(std::string, model, "", "diffusers-layout model repository (required)");
ABSL_FLAG(std::string, package_dir, "", "local package directory holding the package (required)");
ABSL_FLAG(std::string, precision, "bf16", "bf16 or fp8");
ABSL_FLAG(std::string, compile_options, "", "JSON compile options of the package (default: kiln's)");
ABSL_FLAG(std::string, inputs, "", "safetensors with the transformer inputs (baselines.py)");
ABSL_FLAG(std::string, reference, "", "comma-separated safetensors, each with a 'sample' output");
ABSL_FLAG(int, width, 1024, "image width in pixels");
ABSL_FLAG(int, height, 1024, "image height in pixels");
ABSL_FLAG(int, iters, 20, "timed calls per variant");
ABSL_FLAG(double, flop, 0, "FLOP of one call (for TFLOP/s)");
ABSL_FLAG(bool, profile, true, "GPU time per kernel class of one plain call");

namespace {

using kiln::pipeline::AotiPackage;

absl::StatusOr<std::map<std::string, at::Tensor>> ReadTensors(const std::string& path) {
  auto file = kiln::pipeline::SafetensorsFile::Open(path);
  if (!file.ok()) return file.status();
  std::map<std::string, at::Tensor> out;
  for (const auto& view : (*file)->tensors()) {
    auto t = kiln::pipeline::TensorFromView(view);
    if (!t.ok()) return t.status();
    out[view.name] = t->clone();  // own the bytes: the file closes on return
  }
  return out;
}

// Median, min, max of `iters` timed calls of fn (CUDA events on the current stream).
template <typename Fn>
nlohmann::json TimeMs(Fn fn, int iters, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) fn();
  auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<std::pair<at::cuda::CUDAEvent, at::cuda::CUDAEvent>> ev(iters);
  for (int i = 0; i < iters; ++i) {
    ev[i].first = at::cuda::CUDAEvent(cudaEventDefault);
    ev[i].second = at::cuda::CUDAEvent(cudaEventDefault);
  }
  for (int i = 0; i < iters; ++i) {
    ev[i].first.record(stream);
    fn();
    ev[i].second.record(stream);
  }
  stream.synchronize();
  std::vector<double> ms;
  for (auto& [a, b] : ev) ms.push_back(a.elapsed_time(b));
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted.size() % 2 ? sorted[sorted.size() / 2]
                                          : (sorted[sorted.size() / 2 - 1] + sorted[sorted.size() / 2]) / 2;
  return {{"median", median}, {"min", sorted.front()}, {"max", sorted.back()}, {"n", iters}};
}

double RelErr(const at::Tensor& out, const at::Tensor& ref) {
  auto o = out.to(at::kDouble).cpu(), r = ref.to(at::kDouble).cpu();
  return (o - r).norm().item<double>() / r.norm().item<double>();
}

std::string KernelClass(const std::string& name) {
  std::string n = name;
  std::transform(n.begin(), n.end(), n.begin(), ::tolower);
  auto has = [&](const char* s) { return n.find(s) != std::string::npos; };
  // Inductor's kernels, and kiln's fused quantization kernels (kiln.models.fused_quant).
  if (n.rfind("triton", 0) == 0 || has("_quant_kernel"))
    return "fused elementwise/reduction (Triton)";
  if ((has("flash") || has("fmha") || has("cudnn") || has("attention") || has("sdpa")) && !has("gemm"))
    return "attention";
  if (has("gemm") || has("cutlass") || has("sm90_xmma") || has("nvjet") || has("matmul"))
    return "matmul";
  return "other";
}

template <typename Fn>
nlohmann::json Profile(Fn fn, int iters = 3) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  using torch::profiler::impl::ProfilerConfig;
  using torch::profiler::impl::ProfilerState;
  fn();
  c10::cuda::getCurrentCUDAStream().synchronize();
  const ProfilerConfig config(ProfilerState::KINETO);
  const std::set<ActivityType> activities{ActivityType::CUDA};
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  for (int i = 0; i < iters; ++i) fn();
  c10::cuda::getCurrentCUDAStream().synchronize();
  auto result = prof::disableProfiler();
  std::map<std::string, double> classes, kernels;
  for (const auto& e : result->events()) {
    if (e.deviceType() != c10::DeviceType::CUDA) continue;
    const double ms = e.durationNs() / 1e6 / iters;
    classes[KernelClass(e.name())] += ms;
    kernels[e.name().substr(0, 120)] += ms;
  }
  std::vector<std::pair<std::string, double>> top(kernels.begin(), kernels.end());
  std::sort(top.begin(), top.end(), [](auto& a, auto& b) { return a.second > b.second; });
  if (top.size() > 12) top.resize(12);
  return {{"ms_per_call_by_class", classes}, {"top_kernels_ms", top}};
}

}  // namespace

int main(int argc, char** argv) {
  kiln::ParseFlagsOrExit(argc, argv, "kiln-bench",
                         "kiln-bench --model DIR --package-dir DIR --inputs FILE [flags]");
  if (auto s = kiln::InitLoggingFromFlags("kiln-bench"); !s.ok()) return kiln::FailMain(s);
  const std::string model = absl::GetFlag(FLAGS_model);
  const std::string package_dir = absl::GetFlag(FLAGS_package_dir);
  if (model.empty() || package_dir.empty() || absl::GetFlag(FLAGS_inputs).empty()) {
    return kiln::FailMain(
        absl::InvalidArgumentError("--model, --package_dir and --inputs are required"));
  }
  if (!torch::cuda::is_available()) {
    return kiln::FailMain(absl::FailedPreconditionError("no CUDA device"));
  }
  const c10::Device device(c10::kCUDA, 0);
  const int width = absl::GetFlag(FLAGS_width), height = absl::GetFlag(FLAGS_height);

  // The package: the key the pipeline would use, from the local store (no compiling here).
  kiln::cache::TieredProviderConfig provider_config;
  provider_config.local.root = package_dir;
  auto provider = kiln::cache::OpenTieredProvider(std::move(provider_config), nullptr);
  if (!provider.ok()) return kiln::FailMain(provider.status());
  std::shared_ptr<kiln::cache::PackageProvider> packages = *std::move(provider);
  kiln::pipeline::PipelineOptions po;
  po.model_dir = model;
  po.device = "cuda";
  po.precision = absl::GetFlag(FLAGS_precision);
  po.resolutions = {{width, height}};
  if (const std::string co = absl::GetFlag(FLAGS_compile_options); !co.empty()) {
    auto parsed = kiln::pipeline::ParseCompileOptions(co);
    if (!parsed.ok()) return kiln::FailMain(parsed.status());
    po.compile_options = *std::move(parsed);
  }
  auto pipeline = kiln::pipeline::FluxPipeline::Create(po, packages);
  if (!pipeline.ok()) return kiln::FailMain(pipeline.status());
  const auto key = (*pipeline)->KeyFor("transformer", width, height);
  auto provided = packages->Get({key, model, po.compile_options});
  if (!provided.ok()) return kiln::FailMain(provided.status());
  const kiln::cache::LocatedPackage* found = &provided->package;

  nlohmann::json report = {{"precision", po.precision},
                           {"compile_options", po.compile_options},
                           {"digest", key.Digest()},
                           {"bucket", {width, height}}};
  try {
    torch::NoGradGuard no_grad;
    // A whole-graph package, or a regional set (compile option layout "regional") run as the
    // loop over layers; both through one run function, captured whole as one CUDA graph.
    const bool regional = found->manifest.layout == "regional";
    report["layout"] = regional ? "regional" : "whole";
    auto t = kiln::SteadyNow();
    std::unique_ptr<AotiPackage> pkg;
    std::unique_ptr<kiln::pipeline::RegionalTransformer> set;
    if (regional) {
      auto loaded = kiln::pipeline::RegionalTransformer::Load(*found, device);
      if (!loaded.ok()) return kiln::FailMain(loaded.status());
      set = *std::move(loaded);
    } else {
      auto loaded = AotiPackage::Load(*found, device);
      if (!loaded.ok()) return kiln::FailMain(loaded.status());
      pkg = *std::move(loaded);
    }
    report["package_load_s"] = kiln::SecondsSince(t);

    t = kiln::SteadyNow();
    auto weights = kiln::pipeline::ComponentWeights::Open(
        model + "/" + kiln::pipeline::ComponentWeights::FolderFor("transformer"),
        kiln::pipeline::ComponentWeights::StemFor("transformer"), device);
    if (!weights.ok()) return kiln::FailMain(weights.status());
    if (regional) {
      if (auto s = set->LoadWeights(**weights); !s.ok()) return kiln::FailMain(s);
    } else {
      auto constants = (*weights)->Gather(*pkg, found->extra_constants_path);
      if (!constants.ok()) return kiln::FailMain(constants.status());
      if (auto s = pkg->LoadConstants(*constants); !s.ok()) return kiln::FailMain(s);
    }
    c10::cuda::getCurrentCUDAStream().synchronize();
    report["weights"] = {{"seconds", kiln::SecondsSince(t)},
                         {"bytes_read", (*weights)->bytes_read()}};
    const kiln::pipeline::GraphRunFn run = [&](const std::vector<at::Tensor>& in, void* stream) {
      return regional ? set->RunOn(in, stream) : pkg->RunOn(in, stream);
    };

    auto host = ReadTensors(absl::GetFlag(FLAGS_inputs));
    if (!host.ok()) return kiln::FailMain(host.status());
    std::vector<at::Tensor> inputs;
    for (const auto& spec : found->manifest.inputs) {
      auto it = host->find(spec.name);
      if (it == host->end()) {
        return kiln::FailMain(
            absl::InvalidArgumentError(absl::StrCat("--inputs lacks '", spec.name, "'")));
      }
      inputs.push_back(it->second.to(device).contiguous());
    }
    at::Tensor out_plain;
    auto plain = [&] {
      auto o = run(inputs, nullptr);
      if (!o.ok()) throw std::runtime_error(std::string(o.status().message()));
      out_plain = (*o)[0];
    };
    const int iters = absl::GetFlag(FLAGS_iters);
    const double flop = absl::GetFlag(FLAGS_flop);
    auto add_tflops = [&](nlohmann::json j) {
      if (flop > 0) j["tflops"] = flop / (j["median"].get<double>() * 1e-3) / 1e12;
      return j;
    };
    report["step_ms_plain"] = add_tflops(TimeMs(plain, iters));
    at::Tensor ref_out = out_plain.clone();

    t = kiln::SteadyNow();
    auto graph = kiln::pipeline::PackageGraph::Capture(device, "transformer", run, inputs);
    if (!graph.ok()) return kiln::FailMain(graph.status());
    c10::cuda::getCurrentCUDAStream().synchronize();
    report["graph_capture_s"] = kiln::SecondsSince(t);
    at::Tensor out_graph;
    auto replay = [&] {
      auto o = (*graph)->Replay();
      if (!o.ok()) throw std::runtime_error(std::string(o.status().message()));
      out_graph = (*o)[0];
    };
    report["step_ms_graph"] = add_tflops(TimeMs(replay, iters));
    report["graph_equals_plain"] = at::equal(out_graph, ref_out);

    nlohmann::json errors = nlohmann::json::object();
    for (const auto& path : absl::StrSplit(absl::GetFlag(FLAGS_reference), ',', absl::SkipEmpty())) {
      auto ref = ReadTensors(std::string(path));
      if (!ref.ok()) return kiln::FailMain(ref.status());
      if (!ref->count("sample")) {
        return kiln::FailMain(absl::InvalidArgumentError(absl::StrCat(path, ": no 'sample'")));
      }
      errors[std::string(path)] = RelErr(out_graph, ref->at("sample"));
    }
    report["rel_err"] = errors;
    report["finite"] = at::isfinite(out_graph).all().item<bool>();
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
    report["peak_gpu_bytes"] = stats.allocated_bytes[0].peak;
    report["peak_gpu_reserved_bytes"] = stats.reserved_bytes[0].peak;
    if (absl::GetFlag(FLAGS_profile)) {
      try {
        report["profile_plain"] = Profile(plain);
      } catch (const std::exception& e) {
        report["profile_plain"] = {{"error", e.what()}};
      }
    }
  } catch (const std::exception& e) {
    return kiln::FailMain(absl::InternalError(e.what()));
  }
  std::cout << report.dump() << std::endl;
  return kiln::kExitOk;
}
