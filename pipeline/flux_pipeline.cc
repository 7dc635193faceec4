#include "pipeline/flux_pipeline.h"

#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/job_spec.h"
#include "pipeline/aoti_package.h"
#include "pipeline/cuda_graph.h"
#include "pipeline/scheduler.h"
#include "pipeline/tokenizer_clip.h"
#include "pipeline/tokenizer_t5.h"
#include "pipeline/weights.h"

#ifdef KILN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace kiln::pipeline {
namespace fs = std::filesystem;
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

absl::StatusOr<nlohmann::json> ReadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  return j;
}

absl::StatusOr<int> IntField(const nlohmann::json& j, const std::string& name,
                             const std::string& where) {
  if (!j.contains(name) || !j[name].is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": integer field '", name, "' missing"));
  }
  return j[name].get<int>();
}

std::string ExecutableDir() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : p.parent_path().string();
}

// Waits for queued device work so that phase timings are honest. Only at phase boundaries, never
// inside the denoise loop.
void SyncDevice(const c10::Device& d) {
#ifdef KILN_WITH_CUDA
  if (d.is_cuda()) at::cuda::getCurrentCUDAStream(d.index()).synchronize();
#else
  (void)d;
#endif
}

// [B, C, h, w] latents → [B, (h/2)(w/2), 4C] packed 2×2 patches (Flux's _pack_latents).
at::Tensor Pack(const at::Tensor& x) {
  const auto b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  return x.view({b, c, h / 2, 2, w / 2, 2}).permute({0, 2, 4, 1, 3, 5}).reshape({b, (h / 2) * (w / 2), c * 4});
}

at::Tensor Unpack(const at::Tensor& x, int64_t c, int64_t h, int64_t w) {
  const auto b = x.size(0);
  return x.view({b, h / 2, w / 2, c, 2, 2}).permute({0, 3, 1, 4, 2, 5}).reshape({b, c, h, w});
}

}  // namespace

std::vector<Resolution> DefaultResolutions() {
  return {{256, 256},  {512, 512},   {768, 768},   {1024, 1024}, {1024, 768},
          {768, 1024}, {1152, 896},  {896, 1152},  {1344, 768},  {768, 1344}};
}

absl::StatusOr<std::vector<Resolution>> ParseResolutions(const std::string& text) {
  std::vector<Resolution> out;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    std::vector<std::string> wh = absl::StrSplit(item, 'x');
    Resolution r;
    if (wh.size() != 2 || !absl::SimpleAtoi(wh[0], &r.width) ||
        !absl::SimpleAtoi(wh[1], &r.height) || r.width <= 0 || r.height <= 0 || r.width % 16 ||
        r.height % 16) {
      return absl::InvalidArgumentError(absl::StrCat(
          "resolution '", item, "': expected WIDTHxHEIGHT, positive multiples of 16"));
    }
    out.push_back(r);
  }
  if (out.empty()) return absl::InvalidArgumentError("no resolutions given");
  return out;
}

std::string FormatResolutions(const std::vector<Resolution>& list) {
  return absl::StrJoin(list, ", ", [](std::string* out, const Resolution& r) {
    absl::StrAppend(out, r.width, "x", r.height);
  });
}

absl::StatusOr<nlohmann::json> ParseCompileOptions(const std::string& text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return absl::InvalidArgumentError("--compile_options: not a JSON object");
  return j;
}

absl::Status PipelineOptions::Validate() const {
  if (model_dir.empty()) return absl::InvalidArgumentError("model_dir: required");
  if (package_dir.empty()) return absl::InvalidArgumentError("package_dir: required");
  if (device != "cpu" && device != "cuda" && device.rfind("cuda:", 0) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("device '", device, "': expected cpu, cuda or cuda:N"));
  }
  if (precision != "fp32" && precision != "bf16" && precision != "fp8") {
    return absl::InvalidArgumentError(absl::StrCat("precision '", precision, "': expected fp32, bf16 or fp8"));
  }
  if (precision == "fp8" && device == "cpu") {
    return absl::InvalidArgumentError("precision fp8: needs a cuda device");
  }
  if (resolutions.empty()) return absl::InvalidArgumentError("resolutions: empty");
  if (max_sequence_length < 1 || max_sequence_length > 4096) {
    return absl::InvalidArgumentError("max_sequence_length: must be in [1, 4096]");
  }
  if (!compile_options.is_object()) return absl::InvalidArgumentError("compile_options: not an object");
  return absl::OkStatus();
}

// The same field checks as a JobSpec's (common/job_spec.h), named by this struct's fields. The
// prompt is not checked here: the tokenizers take any bytes, truncating what is too long.
absl::Status GenerateRequest::Validate() const {
  if (auto s = ValidateImageSide("width", width); !s.ok()) return s;
  if (auto s = ValidateImageSide("height", height); !s.ok()) return s;
  if (auto s = ValidateSteps("steps", steps); !s.ok()) return s;
  return ValidateGuidance("guidance", guidance);
}

class FluxPipeline::Impl {
 public:
  PipelineOptions options;
  c10::Device device = c10::kCPU;
  std::string target;
  std::map<std::string, nlohmann::json> configs;  // by component
  SchedulerConfig scheduler;
  std::unique_ptr<ClipTokenizer> clip_tokenizer;
  std::unique_ptr<T5Tokenizer> t5_tokenizer;
  int clip_len = 77;
  int text_len = 512;
  int latent_channels = 16;
  int vae_scale = 8;
  std::shared_ptr<cache::PackageProvider> provider;
  std::map<std::string, std::unique_ptr<ComponentWeights>> weights;  // by component
  std::map<std::string, std::unique_ptr<AotiPackage>> loaded;        // by key digest
  std::map<std::string, std::unique_ptr<PackageGraph>> graphs;       // by key digest; null: capture failed

  cache::ArtifactKey KeyFor(const std::string& component, const cache::Bucket& b) const {
    cache::ArtifactKey k;
    k.architecture = cache::ArchitectureDigest(configs.at(component));
    k.component = component;
    // fp8 means fp8 linears in the transformer; the other components run bf16 math, so they
    // share the bf16 packages instead of compiling identical ones under fp8 keys.
    k.precision = (options.precision == "fp8" && component != "transformer") ? "bf16" : options.precision;
    k.bucket = b;
    k.compile = cache::CompileOptionsDigest(options.compile_options);
    k.target = target;
    k.toolchain.torch = BuildTorchVersion();
    if (target != "cpu") {
      k.toolchain.cuda = BuildCudaVersion();
      k.toolchain.triton = BuildTritonVersion();
    }
    return k;
  }

  // Bucket fields each component's package depends on; must match component_bucket() in
  // pipeline/python/kiln/compile.py.
  cache::Bucket BucketFor(const std::string& component, int width, int height) const {
    if (component == "text_encoder") return {1, 0, 0, clip_len};
    if (component == "text_encoder_2") return {1, 0, 0, text_len};
    if (component == "transformer") return {1, height, width, text_len};
    return {1, height, width, 0};
  }

  // Finds the packages of `components` that are not loaded yet, all at once (each on its own
  // thread: compiles of different components run in parallel), then loads them one by one with
  // their weights. Fills `out` with every component's package.
  absl::Status EnsureAll(const std::vector<std::string>& components, int width, int height,
                         GenerateResult* r, std::map<std::string, AotiPackage*>* out) {
    std::map<std::string, std::future<absl::StatusOr<cache::ProvidedPackage>>> pending;
    std::map<std::string, std::string> digests;
    const auto t = Clock::now();
    for (const auto& c : components) {
      const cache::ArtifactKey key = KeyFor(c, BucketFor(c, width, height));
      if (auto it = loaded.find(key.Digest()); it != loaded.end()) {
        r->packages[c] = "resident";
        (*out)[c] = it->second.get();
        continue;
      }
      digests[c] = key.Digest();
      pending[c] = std::async(std::launch::async, [this, key] {
        return provider->Get(key, options.model_dir);
      });
    }
    std::map<std::string, absl::StatusOr<cache::ProvidedPackage>> provided;
    for (auto& [c, f] : pending) provided.emplace(c, f.get());  // every thread joins first
    const double wall = Since(t);
    bool compiled = false, fetched = false;
    for (auto& [c, p] : provided) {
      if (!p.ok()) return p.status();
      compiled |= p->provenance == "compiled";
      fetched |= p->provenance == "shared";
    }
    if (compiled) r->seconds.compile += wall;
    else if (fetched) r->seconds.fetch += wall;
    for (auto& [c, p] : provided) {
      auto pkg = Ensure(c, digests[c], *std::move(p), r);
      if (!pkg.ok()) return pkg.status();
      (*out)[c] = *pkg;
    }
    return absl::OkStatus();
  }

  // Loads one found package and hands it its weights (read once per component).
  absl::StatusOr<AotiPackage*> Ensure(const std::string& component, const std::string& digest,
                                      absl::StatusOr<cache::ProvidedPackage> provided,
                                      GenerateResult* r) {
    if (!provided.ok()) return provided.status();
    if (!provided->warning.empty()) r->warnings.push_back(provided->warning);
    const std::string provenance = provided->provenance == "local" ? "found" : provided->provenance;
    const cache::LocatedPackage* found = &provided->package;
    auto t = Clock::now();
    auto pkg = AotiPackage::Load(*found, device);
    if (!pkg.ok()) return pkg.status();
    r->seconds.package_load += Since(t);

    t = Clock::now();
    auto& cw = weights[component];
    if (!cw) {
      auto opened = ComponentWeights::Open(
          options.model_dir + "/" + ComponentWeights::FolderFor(component),
          ComponentWeights::StemFor(component), device);
      if (!opened.ok()) return opened.status();
      cw = *std::move(opened);
    }
    const uint64_t read_before = cw->bytes_read();
    auto constants = cw->Gather(**pkg, found->extra_constants_path);
    if (!constants.ok()) return constants.status();
    if (auto s = (*pkg)->LoadConstants(*constants); !s.ok()) return s;
    SyncDevice(device);
    r->seconds.weights += Since(t);
    r->weight_bytes += cw->bytes_read() - read_before;
    r->packages[component] = provenance;
    AotiPackage* raw = pkg->get();
    loaded[digest] = *std::move(pkg);
    return raw;
  }

  absl::StatusOr<at::Tensor> RunOne(AotiPackage* p, const std::vector<at::Tensor>& in) {
    auto out = p->Run(in);
    if (!out.ok()) return out.status();
    if (out->empty()) return absl::InternalError("package returned no outputs");
    return (*out)[0];
  }
};

FluxPipeline::FluxPipeline(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FluxPipeline::~FluxPipeline() = default;

absl::StatusOr<std::unique_ptr<FluxPipeline>> FluxPipeline::Create(const PipelineOptions& options) {
  if (auto s = options.Validate(); !s.ok()) return s;
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  const std::string& dir = options.model_dir;
  if (!fs::exists(dir + "/model_index.json")) {
    return absl::NotFoundError(absl::StrCat(dir, " is not a diffusers model repository (no model_index.json)"));
  }
  for (const auto& [component, path] :
       std::vector<std::pair<std::string, std::string>>{{"transformer", "transformer/config.json"},
                                                        {"vae_decoder", "vae/config.json"},
                                                        {"text_encoder", "text_encoder/config.json"},
                                                        {"text_encoder_2", "text_encoder_2/config.json"}}) {
    auto j = ReadJson(dir + "/" + path);
    if (!j.ok()) return j.status();
    impl->configs[component] = *std::move(j);
  }
  auto sched = SchedulerConfig::FromJsonFile(dir + "/scheduler/scheduler_config.json");
  if (!sched.ok()) return sched.status();
  impl->scheduler = *sched;
  auto clip = ClipTokenizer::Load(dir + "/tokenizer");
  if (!clip.ok()) return clip.status();
  impl->clip_tokenizer = *std::move(clip);
  auto t5 = T5Tokenizer::Load(dir + "/tokenizer_2");
  if (!t5.ok()) return t5.status();
  impl->t5_tokenizer = *std::move(t5);

  auto clip_len = IntField(impl->configs["text_encoder"], "max_position_embeddings", "text_encoder/config.json");
  if (!clip_len.ok()) return clip_len.status();
  impl->clip_len = *clip_len;
  int t5_max = options.max_sequence_length;
  if (auto tc = ReadJson(dir + "/tokenizer_2/tokenizer_config.json"); tc.ok() && tc->contains("model_max_length") &&
                                                                      (*tc)["model_max_length"].is_number_integer()) {
    t5_max = std::min<int64_t>(t5_max, (*tc)["model_max_length"].get<int64_t>());
  }
  impl->text_len = t5_max;
  auto in_ch = IntField(impl->configs["transformer"], "in_channels", "transformer/config.json");
  if (!in_ch.ok()) return in_ch.status();
  impl->latent_channels = *in_ch / 4;
  const auto& vae = impl->configs["vae_decoder"];
  if (!vae.contains("block_out_channels") || !vae["block_out_channels"].is_array()) {
    return absl::InvalidArgumentError("vae/config.json: block_out_channels missing");
  }
  impl->vae_scale = 1 << (vae["block_out_channels"].size() - 1);
  if (vae.value("latent_channels", 0) != impl->latent_channels) {
    return absl::InvalidArgumentError(absl::StrCat("vae/config.json: latent_channels ", vae.value("latent_channels", 0),
                                                   " does not match transformer in_channels/4 = ", impl->latent_channels));
  }

  try {
    impl->device = c10::Device(options.device);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("device '", options.device, "': ", e.what()));
  }
  if (impl->device.is_cpu()) {
    impl->target = "cpu";
  } else {
#ifdef KILN_WITH_CUDA
    if (!torch::cuda::is_available()) return absl::FailedPreconditionError("device cuda: no CUDA device visible");
    if (!impl->device.has_index()) impl->device = c10::Device(c10::kCUDA, 0);
    auto* props = at::cuda::getDeviceProperties(impl->device.index());
    impl->target = absl::StrCat("cuda:sm_", props->major, props->minor);
#else
    return absl::FailedPreconditionError("device cuda: this kiln build links a CPU-only LibTorch");
#endif
  }
  impl->provider = options.provider;
  if (!impl->provider) {
    std::error_code ec;
    fs::create_directories(options.package_dir, ec);
    if (ec) return absl::PermissionDeniedError(absl::StrCat("package_dir ", options.package_dir, ": ", ec.message()));
    cache::TieredProviderConfig config;
    config.local.root = options.package_dir;
    config.shared_root = options.shared_dir;
    if (options.allow_compile) {
      config.compiler_path =
          options.compiler_path.empty() ? ExecutableDir() + "/kiln-compile" : options.compiler_path;
    }
    config.tiered.compile_options = options.compile_options;
    auto provider = cache::OpenTieredProvider(std::move(config), /*registry=*/nullptr);
    if (!provider.ok()) return provider.status();
    impl->provider = *std::move(provider);
  }
  return std::unique_ptr<FluxPipeline>(new FluxPipeline(std::move(impl)));
}

cache::ArtifactKey FluxPipeline::KeyFor(const std::string& component, int width, int height) const {
  return impl_->KeyFor(component, impl_->BucketFor(component, width, height));
}

int FluxPipeline::text_len() const { return impl_->text_len; }

const PipelineOptions& FluxPipeline::options() const { return impl_->options; }

std::vector<std::string> FluxPipeline::DigestsFor(int width, int height) const {
  std::vector<std::string> out;
  for (const char* c : {"text_encoder", "text_encoder_2", "transformer", "vae_decoder"}) {
    out.push_back(KeyFor(c, width, height).Digest());
  }
  return out;
}

std::vector<std::string> FluxPipeline::LoadedDigests() const {
  std::vector<std::string> out;
  for (const auto& [digest, pkg] : impl_->loaded) out.push_back(digest);
  return out;
}

absl::StatusOr<GenerateResult> FluxPipeline::Generate(const GenerateRequest& req,
                                                      const ProgressFn& progress) {
  auto report = [&](const char* phase, int step) {
    if (progress) progress(phase, step, req.steps);
  };
  if (auto s = req.Validate(); !s.ok()) return s;
  Impl& m = *impl_;
  bool allowed = false;
  for (const auto& r : m.options.resolutions) allowed |= (r.width == req.width && r.height == req.height);
  if (!allowed) {
    return absl::InvalidArgumentError(absl::StrCat("resolution ", req.width, "x", req.height,
                                                   " is not one of the compiled buckets: ",
                                                   FormatResolutions(m.options.resolutions)));
  }
  if (req.width % (m.vae_scale * 2) || req.height % (m.vae_scale * 2)) {
    return absl::InvalidArgumentError(absl::StrCat("resolution ", req.width, "x", req.height,
                                                   ": must be a multiple of ", m.vae_scale * 2));
  }
  const auto t_total = Clock::now();
  GenerateResult r;
  r.width = req.width;
  r.height = req.height;

  // Tokenize first: bad prompts fail before any heavy work.
  auto clip_ids = m.clip_tokenizer->Encode(req.prompt, m.clip_len);
  if (!clip_ids.ok()) return absl::InvalidArgumentError(absl::StrCat("prompt: ", clip_ids.status().message()));
  auto t5_ids = m.t5_tokenizer->Encode(req.prompt, m.text_len);
  if (!t5_ids.ok()) return absl::InvalidArgumentError(absl::StrCat("prompt: ", t5_ids.status().message()));
  if (clip_ids->truncated) {
    r.warnings.push_back(absl::StrCat("prompt truncated to ", m.clip_len, " CLIP tokens (",
                                      clip_ids->dropped, " dropped), as the reference pipeline does"));
  }
  if (t5_ids->truncated) {
    r.warnings.push_back(absl::StrCat("prompt truncated to ", m.text_len, " T5 tokens (",
                                      t5_ids->dropped, " dropped), as the reference pipeline does"));
  }

  report("preparing", 0);
  std::map<std::string, AotiPackage*> pkgs;
  if (auto s = m.EnsureAll({"text_encoder", "text_encoder_2", "transformer", "vae_decoder"},
                           req.width, req.height, &r, &pkgs);
      !s.ok()) {
    return s;
  }

  try {
    torch::NoGradGuard no_grad;
    const at::ScalarType act = m.options.precision == "fp32" ? at::kFloat : at::kBFloat16;
    const auto ids_opts = torch::TensorOptions().dtype(at::kLong);

    report("text_encoding", 0);
    auto t = Clock::now();
    at::Tensor clip_in = torch::tensor(clip_ids->ids, ids_opts).view({1, -1}).to(m.device);
    at::Tensor t5_in = torch::tensor(t5_ids->ids, ids_opts).view({1, -1}).to(m.device);
    auto pooled = m.RunOne(pkgs["text_encoder"], {clip_in});
    if (!pooled.ok()) return pooled.status();
    auto txt = m.RunOne(pkgs["text_encoder_2"], {t5_in});
    if (!txt.ok()) return txt.status();
    SyncDevice(m.device);
    r.seconds.text_encoding = Since(t);

    // Denoise. Noise comes from a CPU generator so a seed gives the same image on every device.
    t = Clock::now();
    const int64_t lh = req.height / m.vae_scale, lw = req.width / m.vae_scale;
    const int64_t seq = (lh / 2) * (lw / 2);
    auto schedule = MakeFluxSchedule(m.scheduler, req.steps, static_cast<int>(seq));
    if (!schedule.ok()) return schedule.status();
    const auto& sigmas = schedule->sigmas;
    auto gen = at::detail::createCPUGenerator(req.seed);
    at::Tensor noise = at::randn({1, m.latent_channels, lh, lw}, gen, torch::TensorOptions().dtype(at::kFloat));
    at::Tensor latents = Pack(noise).to(m.device);  // float32 state
    // All per-step inputs are made before the loop: one host→device copy, no syncs inside.
    // One row of 4 floats per step: each step's [1] timestep view then starts 16-byte aligned,
    // as AOTI's kernels assume (a misaligned input costs a copy per call).
    std::vector<float> t_host(req.steps * 4, 0.0f);
    for (int i = 0; i < req.steps; ++i) t_host[i * 4] = FluxModelTimestep(*schedule, i);
    at::Tensor t_dev = torch::tensor(t_host, torch::TensorOptions().dtype(at::kFloat))
                           .view({req.steps, 4}).to(m.device);
    at::Tensor guidance = torch::full({1}, static_cast<float>(req.guidance), torch::TensorOptions().dtype(at::kFloat)).to(m.device);
    at::Tensor txt_act = txt->to(act), pooled_act = pooled->to(act);
    auto step_inputs = [&](int i) -> std::vector<at::Tensor> {
      return {latents.to(act), txt_act, pooled_act, t_dev.select(0, i).narrow(0, 0, 1), guidance};
    };
    // The transformer step as a CUDA graph: captured once per bucket, its static inputs refilled
    // here (this request's text embeddings) and before every replay (latents, timestep).
    PackageGraph* graph = nullptr;
    if (m.device.is_cuda() && m.options.cuda_graphs && CudaGraphsSupported()) {
      // A null entry: capture failed for this bucket once; it runs plainly from then on.
      auto [slot, fresh] = m.graphs.try_emplace(pkgs["transformer"]->manifest().digest);
      if (fresh) {
        SyncDevice(m.device);
        const auto tc = Clock::now();
        auto captured = PackageGraph::Capture(pkgs["transformer"], step_inputs(0));
        if (captured.ok()) {
          slot->second = *std::move(captured);
        } else {
          r.warnings.push_back(absl::StrCat(captured.status().message(),
                                            "; denoising this bucket without a CUDA graph"));
        }
        SyncDevice(m.device);
        r.seconds.graph_capture = Since(tc);
      }
      graph = slot->second.get();
    }
    if (graph) {
      graph->inputs()[1].copy_(txt_act);
      graph->inputs()[2].copy_(pooled_act);
      graph->inputs()[4].copy_(guidance);
    }
    r.denoise_profile.cuda_graph = graph != nullptr;
    report("denoising", 0);
    t = Clock::now();
    {
      std::unique_ptr<StepProfiler> profiler;
      if (m.options.profile_steps) profiler = std::make_unique<StepProfiler>(m.device);
      for (int i = 0; i < req.steps; ++i) {
        if (profiler) profiler->BeginStep();
        absl::StatusOr<at::Tensor> v;
        if (graph) {
          graph->inputs()[0].copy_(latents);
          graph->inputs()[3].copy_(t_dev.select(0, i).narrow(0, 0, 1));
          auto outs = graph->Replay();
          if (!outs.ok()) return outs.status();
          v = (*outs)[0];
        } else {
          v = m.RunOne(pkgs["transformer"], step_inputs(i));
        }
        if (!v.ok()) return v.status();
        latents.add_(v->to(at::kFloat), sigmas[i + 1] - sigmas[i]);
        if (profiler) profiler->EndStep();
        report("denoising", i + 1);  // host-side count: the device may still be working
      }
      if (profiler) {
        profiler->Disarm();
        SyncDevice(m.device);
        auto p = profiler->Finish();
        r.denoise_profile.sync_checked = p.sync_checked;
        r.denoise_profile.step_ms = std::move(p.step_ms);
        r.denoise_profile.span_ms = p.span_ms;
        r.denoise_profile.idle_fraction = p.idle_fraction;
      }
    }
    SyncDevice(m.device);
    r.seconds.denoise = Since(t);

    report("decoding", req.steps);
    t = Clock::now();
    at::Tensor z = Unpack(latents, m.latent_channels, lh, lw).to(act).contiguous();
    auto image = m.RunOne(pkgs["vae_decoder"], {z});
    if (!image.ok()) return image.status();
    at::Tensor bytes = ((*image).to(at::kFloat).div(2).add(0.5).clamp(0, 1).mul(255).round().to(at::kByte))
                           .permute({0, 2, 3, 1}).contiguous().cpu();
    r.rgb.assign(bytes.data_ptr<uint8_t>(), bytes.data_ptr<uint8_t>() + bytes.numel());
    r.seconds.decode = Since(t);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("generate: ", e.what()));
  }
  r.seconds.total = Since(t_total);
  return r;
}

}  // namespace kiln::pipeline
