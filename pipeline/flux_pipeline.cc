#include "pipeline/flux_pipeline.h"

#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <mutex>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/job_spec.h"
#include "common/stopwatch.h"
#include "pipeline/denoiser.h"
#include "pipeline/json_file.h"
#include "pipeline/lora.h"
#include "pipeline/package_loader.h"
#include "pipeline/scheduler.h"
#include "pipeline/tokenizer_clip.h"
#include "pipeline/tokenizer_t5.h"
#include "pipeline/torch_error.h"

#ifdef KILN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace kiln::pipeline {
namespace fs = std::filesystem;
namespace {

absl::StatusOr<int> IntField(const nlohmann::json& j, const std::string& name,
                             const std::string& where) {
  if (!j.contains(name) || !j[name].is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": integer field '", name, "' missing"));
  }
  return j[name].get<int>();
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

absl::StatusOr<nlohmann::json> ParseCompileOptions(const std::string& text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return absl::InvalidArgumentError("--compile_options: not a JSON object");
  nlohmann::json merged = cache::DefaultCompileOptions();
  merged.update(j);
  return merged;
}

absl::Status PipelineOptions::Validate() const {
  if (model_dir.empty()) return absl::InvalidArgumentError("model_dir: required");
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
  // The transformer layout (pipeline/README.md "Regional layout"): one whole-graph package, or a
  // regional set run as the loop over layers (pipeline/regional.h).
  if (auto it = compile_options.find("layout"); it != compile_options.end()) {
    if (*it != "whole" && *it != "regional") {
      return absl::InvalidArgumentError(
          "compile_options layout: expected \"whole\" or \"regional\"");
    }
  }
  // A sequence-parallel set is one rank's of P: its blocks need the other ranks and a registered
  // process group, which only a denoise_loop brings (parallel::SequenceParallelPipeline,
  // docs/multi_gpu.md). Run by the pipeline's own loop it would fail inside the first block;
  // refused up front instead.
  if (auto it = compile_options.find("sequence_parallel");
      it != compile_options.end() && *it != 1) {
    if (!it->is_number_integer() || it->get<int64_t>() < 1) {
      return absl::InvalidArgumentError(absl::StrCat("compile_options sequence_parallel: ",
                                                     it->dump(), " (a rank count, at least 1)"));
    }
    if (!denoise_loop) {
      return absl::InvalidArgumentError(absl::StrCat(
          "compile_options sequence_parallel: ", it->dump(), " ranks; this pipeline runs one (a ",
          "sequence-parallel set runs through parallel::SequenceParallelPipeline)"));
    }
    if (compile_options.value("layout", "") != "regional") {
      return absl::InvalidArgumentError(absl::StrCat("compile_options sequence_parallel: ",
                                                     it->dump(), " ranks need layout regional"));
    }
  }
  if (auto it = compile_options.find("process_group"); it != compile_options.end()) {
    if (auto s = CheckProcessGroupName(*it); !s.ok()) return s;
    if (compile_options.value("sequence_parallel", nlohmann::json(1)) == 1 && *it != "0") {
      return absl::InvalidArgumentError(absl::StrCat(
          "compile_options process_group: ", it->dump(), " names the all-to-alls' group of a "
          "sequence-parallel set; there is none without sequence_parallel > 1"));
    }
  }
  return absl::OkStatus();
}

// The same field checks as a JobSpec's (common/job_spec.h), named by this struct's fields. The
// prompt is not checked here: the tokenizers take any bytes, truncating what is too long.
absl::Status GenerateRequest::Validate() const {
  if (auto s = ValidateImageSide("width", width); !s.ok()) return s;
  if (auto s = ValidateImageSide("height", height); !s.ok()) return s;
  if (auto s = ValidateSteps("steps", steps); !s.ok()) return s;
  if (auto s = ValidateGuidance("guidance", guidance); !s.ok()) return s;
  if (loras.size() > kMaxLoras) {
    return absl::InvalidArgumentError(absl::StrCat("loras: ", loras.size(), " LoRAs, more than ", kMaxLoras));
  }
  for (size_t i = 0; i < loras.size(); ++i) {
    const std::string field = absl::StrCat("loras[", i, "]");
    if (auto s = ValidateLoraName(field + ".name", loras[i].name); !s.ok()) return s;
    if (!std::isfinite(loras[i].scale) || std::abs(loras[i].scale) > kMaxLoraScale) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".scale: ", loras[i].scale,
                                                     " is not in -", kMaxLoraScale, "..", kMaxLoraScale));
    }
    for (size_t j = 0; j < i; ++j) {
      if (loras[j].name == loras[i].name) {
        return absl::InvalidArgumentError(absl::StrCat(field, ".name: '", loras[i].name, "' is named twice"));
      }
    }
  }
  return absl::OkStatus();
}

class FluxPipeline::Impl {
 public:
  PipelineOptions options;
  c10::Device device = c10::kCPU;
  SchedulerConfig scheduler;
  std::unique_ptr<ClipTokenizer> clip_tokenizer;
  std::unique_ptr<T5Tokenizer> t5_tokenizer;
  int latent_channels = 16;
  std::unique_ptr<KeyPolicy> keys;
  std::unique_ptr<PackageLoader> packages;
  // By transformer key digest; null: capture failed for that bucket once, it runs plainly from
  // then on.
  std::map<std::string, std::unique_ptr<CudaGraphDenoiser>> graphs;  // DenoiseDecode's thread
  // Held by EncodePrompt for its whole run (one at a time; it owns the PackageLoader) and by
  // DenoiseDecode while it switches LoRAs or captures a CUDA graph.
  std::mutex encode_mu;
#ifdef KILN_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> encode_stream;  // EncodePrompt's device work
#endif
  mutable std::mutex digests_mu;
  std::vector<std::string> loaded_digests;  // the loader's, after the last EnsureAll
  // LoRAs: where they are found, the files read so far (by name; read again when the recorded
  // digest, size or modification time changes), and the set merged now. Under encode_mu (they
  // use the PackageLoader); applied_loras is written under digests_mu too (read by any thread).
  std::unique_ptr<LoraLibrary> loras;
  struct CachedLora {
    LocatedLora located;
    uintmax_t size = 0;
    fs::file_time_type mtime;
    std::shared_ptr<const LoraWeights> weights;
  };
  std::map<std::string, CachedLora> lora_files;
  std::string applied_loras;

  // The LoRA `name`, from the cache or read, verified and checked against the checkpoint.
  absl::StatusOr<std::shared_ptr<const LoraWeights>> LoraNamed(const std::string& name);
  // Reads `wanted`'s files (LoraNamed) ahead of the switch; adds the time to lora_load.
  absl::Status ReadLoras(const std::vector<LoraChoice>& wanted, PhaseSeconds* seconds);
  // The LoraDeltas of `wanted` (null: none) and the files it is made of (LoraNamed).
  absl::StatusOr<std::shared_ptr<const LoraDeltas>> DeltasFor(
      const std::vector<LoraChoice>& wanted,
      std::vector<std::shared_ptr<const LoraWeights>>* files);
  // The set prepared (merged, PrepareLoras) and not committed yet: its key,
  // the files it was made of (a file read again since makes it stale) and its deltas (the
  // object the PackageLoader recognizes). Under encode_mu.
  bool prepared = false;
  std::string prepared_key;
  std::vector<std::shared_ptr<const LoraWeights>> prepared_files;
  std::shared_ptr<const LoraDeltas> prepared_deltas;
  // EncodePrompt's thread, under encode_mu: prepares `wanted` ahead (see EncodePrompt) when it
  // is not merged now, nothing else is pending and the memory budget allows; adds the time to
  // lora_prepare. A failure leaves the switch to DenoiseDecode (a warning, not the job's error).
  void PrepareLoras(const std::vector<LoraChoice>& wanted, GenerateResult* r);
  // True if merging `deltas` ahead fits PipelineOptions::lora_prepare_reserve_bytes (always on
  // the CPU).
  bool PrepareFits(const LoraDeltas* deltas);
  // Makes `wanted` the merged set; adds the switch's timings to `r->seconds`. DenoiseDecode's
  // thread, under encode_mu: the job denoising before it is done with the weights.
  absl::Status SwitchLoras(const std::vector<LoraChoice>& wanted, GenerateResult* r);
  // The schedule of `steps` steps over `seq` image tokens for a batch of `n`, on the device:
  // all per-step inputs made before the loop (one host→device copy, no syncs inside). Row i
  // holds step i's model timestep n times (the package's timestep [n]), padded to a multiple of
  // 4 floats so each step's view starts 16-byte aligned, as AOTI's kernels assume.
  absl::StatusOr<DenoiseSchedule> ScheduleFor(int steps, int64_t seq, int64_t n) const;
};

absl::StatusOr<DenoiseSchedule> FluxPipeline::Impl::ScheduleFor(int steps, int64_t seq,
                                                                 int64_t n) const {
  auto flux_schedule = MakeFluxSchedule(scheduler, steps, static_cast<int>(seq));
  if (!flux_schedule.ok()) return flux_schedule.status();
  DenoiseSchedule schedule;
  schedule.sigmas = flux_schedule->sigmas;
  const int64_t row = (n + 3) / 4 * 4;
  std::vector<float> t_host(steps * row, 0.0f);
  for (int i = 0; i < steps; ++i) {
    std::fill_n(t_host.begin() + i * row, n, FluxModelTimestep(*flux_schedule, i));
  }
  schedule.timesteps = torch::tensor(t_host, torch::TensorOptions().dtype(at::kFloat))
                           .view({steps, row}).to(device);
  return schedule;
}

absl::StatusOr<std::shared_ptr<const LoraWeights>> FluxPipeline::Impl::LoraNamed(
    const std::string& name) {
  auto found = loras->Find(name);
  if (!found.ok()) return found.status();
  std::error_code ec;
  const uintmax_t size = fs::file_size(found->path, ec);
  const fs::file_time_type mtime = fs::last_write_time(found->path, ec);
  if (auto it = lora_files.find(name); it != lora_files.end()) {
    const CachedLora& c = it->second;
    if (c.located.path == found->path && c.located.sha256 == found->sha256 && c.size == size &&
        c.mtime == mtime) {
      return c.weights;
    }
  }
  if (auto s = LoraLibrary::Verify(*found); !s.ok()) return s;
  auto checkpoint = packages->WeightsOf("transformer");
  if (!checkpoint.ok()) return checkpoint.status();
  auto weights = LoraWeights::Load(found->path, (*checkpoint)->checkpoint(), device);
  if (!weights.ok()) return weights.status();
  std::shared_ptr<const LoraWeights> shared = *std::move(weights);
  lora_files[name] = CachedLora{*found, size, mtime, shared};
  return shared;
}

absl::Status FluxPipeline::Impl::ReadLoras(const std::vector<LoraChoice>& wanted,
                                           PhaseSeconds* seconds) {
  const auto t = SteadyNow();
  for (const auto& l : wanted) {
    if (auto w = LoraNamed(l.name); !w.ok()) return w.status();
  }
  seconds->lora_load += SecondsSince(t);
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const LoraDeltas>> FluxPipeline::Impl::DeltasFor(
    const std::vector<LoraChoice>& wanted,
    std::vector<std::shared_ptr<const LoraWeights>>* files) {
  if (wanted.empty()) return std::shared_ptr<const LoraDeltas>();
  auto deltas = std::make_shared<LoraDeltas>();
  for (const auto& l : wanted) {
    auto w = LoraNamed(l.name);
    if (!w.ok()) return w.status();
    files->push_back(*w);
    deltas->Add(*w, l.scale);
  }
  return std::shared_ptr<const LoraDeltas>(std::move(deltas));
}

bool FluxPipeline::Impl::PrepareFits(const LoraDeltas* deltas) {
#ifdef KILN_WITH_CUDA
  if (device.is_cuda() && deltas != nullptr) {
    auto checkpoint = packages->WeightsOf("transformer");
    if (!checkpoint.ok()) return false;
    uint64_t need = options.lora_prepare_reserve_bytes;
    for (const auto& target : deltas->Targets()) {
      if (const TensorView* v = (*checkpoint)->checkpoint().Find(target)) {
        need += static_cast<uint64_t>(v->numel()) * sizeof(float);
      }
    }
    size_t free = 0, total = 0;
    c10::cuda::CUDAGuard guard(device);
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) return false;
    return free >= need;
  }
#else
  (void)deltas;
#endif
  return true;
}

void FluxPipeline::Impl::PrepareLoras(const std::vector<LoraChoice>& wanted, GenerateResult* r) {
  const std::string key = LoraSetKey(wanted);
  // A set prepared and not swapped in yet stays: it is this job's, or the job's before, which
  // needs it sooner (the switch takes it only if it is still its set).
  if (!options.lora_prepare_ahead || key == applied_loras || prepared) return;
  const auto t = SteadyNow();
  std::vector<std::shared_ptr<const LoraWeights>> files;
  auto deltas = DeltasFor(wanted, &files);
  if (!deltas.ok()) return;  // ReadLoras checked the files; the switch reports anything new
  if (!PrepareFits(deltas->get())) return;
  absl::Status s;
  try {
    s = packages->PrepareTransformerLoras(*deltas);
  } catch (const std::exception& e) {
    s = absl::InternalError(ExceptionMessage(e));
  }
  if (!s.ok()) {
    r->warnings.push_back(absl::StrCat("merging the LoRA set ahead failed (", s.message(),
                                       "); it is merged at the switch"));
    return;
  }
  prepared = true;
  prepared_key = key;
  prepared_files = std::move(files);
  prepared_deltas = *std::move(deltas);
  r->seconds.lora_prepare += SecondsSince(t);
}

absl::Status FluxPipeline::Impl::SwitchLoras(const std::vector<LoraChoice>& wanted,
                                             GenerateResult* r) {
  PhaseSeconds* seconds = &r->seconds;
  auto t = SteadyNow();
  std::vector<std::shared_ptr<const LoraWeights>> files;
  auto deltas = DeltasFor(wanted, &files);
  if (!deltas.ok()) return deltas.status();
  // What was prepared is used only if it is still this set made of the same files.
  const bool usable = prepared && prepared_key == LoraSetKey(wanted) && prepared_files == files;
  std::shared_ptr<const LoraDeltas> set = usable ? prepared_deltas : *std::move(deltas);
  prepared = false;
  prepared_key.clear();
  prepared_files.clear();
  prepared_deltas = nullptr;
  SyncDevice(device);
  seconds->lora_load += SecondsSince(t);
  t = SteadyNow();
  int prepared_ahead = 0;
  if (auto s = packages->SetTransformerLoras(set, &prepared_ahead); !s.ok()) return s;
  graphs.clear();  // captured graphs hold the swapped-out weights' addresses
  {
    std::lock_guard<std::mutex> lock(digests_mu);
    applied_loras = LoraSetKey(wanted);
  }
  r->lora_prepared = prepared_ahead > 0;
  seconds->lora_switch += SecondsSince(t);
  return absl::OkStatus();
}

FluxPipeline::FluxPipeline(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FluxPipeline::~FluxPipeline() = default;

absl::StatusOr<std::unique_ptr<FluxPipeline>> FluxPipeline::Create(
    const PipelineOptions& options, std::shared_ptr<cache::PackageProvider> provider) {
  if (auto s = options.Validate(); !s.ok()) return s;
  if (provider == nullptr) return absl::InvalidArgumentError("provider: required");
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  const std::string& dir = options.model_dir;
  if (!fs::is_directory(dir)) {
    return absl::NotFoundError(absl::StrCat("model directory ", dir, " does not exist"));
  }
  if (!fs::exists(dir + "/model_index.json")) {
    return absl::NotFoundError(absl::StrCat(dir, " is not a diffusers model repository (no model_index.json)"));
  }
  KeyPolicyOptions key_options;
  for (const auto& [component, path] :
       std::vector<std::pair<std::string, std::string>>{{"transformer", "transformer/config.json"},
                                                        {"vae_decoder", "vae/config.json"},
                                                        {"text_encoder", "text_encoder/config.json"},
                                                        {"text_encoder_2", "text_encoder_2/config.json"}}) {
    auto j = ReadJsonObject(dir + "/" + path);
    if (!j.ok()) return j.status();
    key_options.configs[component] = *std::move(j);
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

  auto clip_len = IntField(key_options.configs["text_encoder"], "max_position_embeddings", "text_encoder/config.json");
  if (!clip_len.ok()) return clip_len.status();
  key_options.clip_len = *clip_len;
  int t5_max = options.max_sequence_length;
  if (auto tc = ReadJsonObject(dir + "/tokenizer_2/tokenizer_config.json");
      tc.ok() && tc->contains("model_max_length") && (*tc)["model_max_length"].is_number_integer()) {
    t5_max = std::min<int64_t>(t5_max, (*tc)["model_max_length"].get<int64_t>());
  }
  key_options.text_len = t5_max;
  auto in_ch = IntField(key_options.configs["transformer"], "in_channels", "transformer/config.json");
  if (!in_ch.ok()) return in_ch.status();
  impl->latent_channels = *in_ch / 4;
  const auto& vae = key_options.configs["vae_decoder"];
  if (!vae.contains("block_out_channels") || !vae["block_out_channels"].is_array()) {
    return absl::InvalidArgumentError("vae/config.json: block_out_channels missing");
  }
  key_options.vae_scale = 1 << (vae["block_out_channels"].size() - 1);
  if (vae.value("latent_channels", 0) != impl->latent_channels) {
    return absl::InvalidArgumentError(absl::StrCat("vae/config.json: latent_channels ", vae.value("latent_channels", 0),
                                                   " does not match transformer in_channels/4 = ", impl->latent_channels));
  }

  try {
    impl->device = c10::Device(options.device);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("device '", options.device, "': ", ExceptionMessage(e)));
  }
  if (impl->device.is_cpu()) {
    key_options.target = "cpu";
  } else {
#ifdef KILN_WITH_CUDA
    if (!torch::cuda::is_available()) return absl::FailedPreconditionError("device cuda: no CUDA device visible");
    if (!impl->device.has_index()) impl->device = c10::Device(c10::kCUDA, 0);
    auto* props = at::cuda::getDeviceProperties(impl->device.index());
    key_options.target = absl::StrCat("cuda:sm_", props->major, props->minor);
#else
    return absl::FailedPreconditionError("device cuda: this kiln build links a CPU-only LibTorch");
#endif
  }
  key_options.precision = options.precision;
  key_options.compile_options = options.compile_options;
  key_options.resolutions = options.resolutions;
  impl->keys = std::make_unique<KeyPolicy>(std::move(key_options));
  impl->loras = std::make_unique<LoraLibrary>(options.lora_dirs);
  impl->packages = std::make_unique<PackageLoader>(std::move(provider), options.model_dir,
                                                   options.compile_options, impl->device,
                                                   PackageLoaderOptions{options.canary});
  return std::unique_ptr<FluxPipeline>(new FluxPipeline(std::move(impl)));
}

cache::ArtifactKey FluxPipeline::KeyFor(const std::string& component, int width, int height) const {
  return impl_->keys->KeyFor(component, width, height);
}

int FluxPipeline::text_len() const { return impl_->keys->options().text_len; }

const PipelineOptions& FluxPipeline::options() const { return impl_->options; }

std::vector<std::string> FluxPipeline::DigestsFor(int width, int height) const {
  return impl_->keys->DigestsFor(width, height);
}

std::string FluxPipeline::applied_loras() const {
  std::lock_guard<std::mutex> lock(impl_->digests_mu);
  return impl_->applied_loras;
}

std::vector<std::string> FluxPipeline::AvailableLoras() const { return impl_->loras->Names(); }

std::vector<std::string> FluxPipeline::LoadedDigests() const {
  std::lock_guard<std::mutex> lock(impl_->digests_mu);
  return impl_->loaded_digests;
}

struct EncodedPrompt::State {
  const FluxPipeline* owner = nullptr;
  at::Tensor txt;     // T5 embeddings, as the text encoder left them
  at::Tensor pooled;  // CLIP pooled embedding
  std::map<std::string, LoadedComponent> packages;  // the bucket's, owned by the PackageLoader
};

absl::StatusOr<GenerateResult> FluxPipeline::Generate(const GenerateRequest& req,
                                                      const ProgressFn& progress) {
  auto encoded = EncodePrompt(req, progress);
  if (!encoded.ok()) return encoded.status();
  return DenoiseDecode(*std::move(encoded), progress);
}

absl::StatusOr<EncodedPrompt> FluxPipeline::EncodePrompt(const GenerateRequest& req,
                                                         const ProgressFn& progress) {
  auto report = [&](const std::string& phase, int step) {
    if (progress) progress(phase, step, req.steps);
  };
  auto cancelled = [&] { return req.cancel != nullptr && req.cancel->cancelled(); };
  if (auto s = req.Validate(); !s.ok()) return s;
  Impl& m = *impl_;
  if (auto s = m.keys->CheckResolution(req.width, req.height); !s.ok()) return s;
  const int clip_len = m.keys->options().clip_len, text_len = m.keys->options().text_len;
  const auto t_total = SteadyNow();
  EncodedPrompt out;
  out.request = req;
  GenerateResult& r = out.partial;
  r.width = req.width;
  r.height = req.height;

  // Tokenize first: bad prompts fail before any heavy work.
  auto clip_ids = m.clip_tokenizer->Encode(req.prompt, clip_len);
  if (!clip_ids.ok()) return absl::InvalidArgumentError(absl::StrCat("prompt: ", clip_ids.status().message()));
  auto t5_ids = m.t5_tokenizer->Encode(req.prompt, text_len);
  if (!t5_ids.ok()) return absl::InvalidArgumentError(absl::StrCat("prompt: ", t5_ids.status().message()));
  if (clip_ids->truncated) {
    r.warnings.push_back(absl::StrCat("prompt truncated to ", clip_len, " CLIP tokens (",
                                      clip_ids->dropped, " dropped), as the reference pipeline does"));
  }
  if (t5_ids->truncated) {
    r.warnings.push_back(absl::StrCat("prompt truncated to ", text_len, " T5 tokens (",
                                      t5_ids->dropped, " dropped), as the reference pipeline does"));
  }

  // Everything this stage does on the device: on CUDA, on the pipeline's encode stream, so that
  // it overlaps a denoise on another thread's stream; never during a CUDA graph capture.
  std::lock_guard<std::mutex> device_lock(m.encode_mu);
#ifdef KILN_WITH_CUDA
  std::optional<c10::cuda::CUDAStreamGuard> stream_guard;
  if (m.device.is_cuda()) {
    if (!m.encode_stream) {
      m.encode_stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, m.device.index());
    }
    stream_guard.emplace(*m.encode_stream);
  }
#endif
  report("preparing", 0);
  // The job's LoRA files are read and checked here (a bad one fails before any heavy work); the
  // merge goes into new weight tensors at the end of this stage (PrepareLoras) and the commit
  // waits for DenoiseDecode: the job denoising now still runs on the loaded weights.
  if (auto s = m.ReadLoras(req.loras, &r.seconds); !s.ok()) return s;
  std::map<std::string, cache::ArtifactKey> keys;
  for (const auto& c : FluxComponents()) keys[c] = m.keys->KeyFor(c, req.width, req.height);
  LoadReport loaded;
  auto pkgs = m.packages->EnsureAll(keys, &loaded,
                                    [&](const std::string& phase) { report(phase, 0); });
  {
    std::lock_guard<std::mutex> lock(m.digests_mu);
    m.loaded_digests = m.packages->LoadedDigests();
  }
  r.warnings.insert(r.warnings.end(), loaded.warnings.begin(), loaded.warnings.end());
  if (!pkgs.ok()) return pkgs.status();
  r.seconds.fetch = loaded.fetch_seconds;
  r.seconds.compile = loaded.compile_seconds;
  r.seconds.package_load = loaded.package_load_seconds;
  r.seconds.weights = loaded.weights_seconds;
  r.weight_bytes = loaded.weight_bytes;
  r.packages = std::move(loaded.packages);
  auto state = std::make_shared<EncodedPrompt::State>();
  state->owner = this;
  state->packages = *std::move(pkgs);

  try {
    torch::NoGradGuard no_grad;
    const auto ids_opts = torch::TensorOptions().dtype(at::kLong);
    if (cancelled()) return CancelledAfterStep(0, req.steps);
    report("text_encoding", 0);
    auto t = SteadyNow();
    at::Tensor clip_in = torch::tensor(clip_ids->ids, ids_opts).view({1, -1}).to(m.device);
    at::Tensor t5_in = torch::tensor(t5_ids->ids, ids_opts).view({1, -1}).to(m.device);
    auto pooled = state->packages["text_encoder"].package->RunFirst({clip_in});
    if (!pooled.ok()) return pooled.status();
    auto txt = state->packages["text_encoder_2"].package->RunFirst({t5_in});
    if (!txt.ok()) return txt.status();
    // The embeddings are complete before another stream (the denoise's) reads them.
    SyncDevice(m.device);
    r.seconds.text_encoding = SecondsSince(t);
    state->pooled = *std::move(pooled);
    state->txt = *std::move(txt);
    // The job's LoRA set merged into new weight tensors, beside the denoise of the job before
    // (which uses the loaded ones); its DenoiseDecode loads them.
    m.PrepareLoras(req.loras, &r);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("generate: ", ExceptionMessage(e)));
  }
  r.seconds.total = SecondsSince(t_total);
  out.state = std::move(state);
  return out;
}

absl::Status FluxPipeline::UseWeights(const std::string& component,
                                      std::unique_ptr<ComponentWeights> weights) {
  std::lock_guard<std::mutex> device_lock(impl_->encode_mu);  // it owns the PackageLoader
  return impl_->packages->UseWeights(component, std::move(weights));
}

absl::Status FluxPipeline::FollowDenoise(int width, int height, int steps,
                                         const std::vector<LoraChoice>& loras) {
  Impl& m = *impl_;
  if (!m.options.denoise_loop) {
    return absl::FailedPreconditionError("FollowDenoise: the pipeline has no denoise_loop");
  }
  GenerateRequest shape;
  shape.width = width;
  shape.height = height;
  shape.steps = steps;
  shape.loras = loras;
  if (auto s = shape.Validate(); !s.ok()) return s;
  if (auto s = m.keys->CheckResolution(width, height); !s.ok()) return s;
  std::lock_guard<std::mutex> device_lock(m.encode_mu);  // it owns the PackageLoader
  GenerateResult switched;  // the LoRA switch's timings, which a follower reports to no one
  if (auto s = m.ReadLoras(loras, &switched.seconds); !s.ok()) return s;
  LoadReport loaded;
  auto pkgs = m.packages->EnsureAll({{"transformer", m.keys->KeyFor("transformer", width, height)}},
                                    &loaded);
  {
    std::lock_guard<std::mutex> lock(m.digests_mu);
    m.loaded_digests = m.packages->LoadedDigests();
  }
  if (!pkgs.ok()) return pkgs.status();
  DenoiseJob job;
  job.transformer = (*pkgs)["transformer"].regional;
  if (job.transformer == nullptr) {
    return absl::FailedPreconditionError(
        "a pipeline with a denoise_loop (sequence parallel) needs the regional layout");
  }
  if (LoraSetKey(loras) != m.applied_loras) {
    if (auto s = m.SwitchLoras(loras, &switched); !s.ok()) return s;
  }
  try {
    torch::NoGradGuard no_grad;
    const int vae_scale = m.keys->options().vae_scale;
    const int64_t seq = (height / vae_scale / 2) * (width / vae_scale / 2);
    auto schedule = m.ScheduleFor(steps, seq, 1);
    if (!schedule.ok()) return schedule.status();
    job.schedule = *std::move(schedule);
    job.act = m.options.precision == "fp32" ? at::kFloat : at::kBFloat16;
    return m.options.denoise_loop(job);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("follow: ", ExceptionMessage(e)));
  }
}

absl::StatusOr<GenerateResult> FluxPipeline::DenoiseDecode(EncodedPrompt encoded,
                                                           const ProgressFn& progress) {
  std::vector<EncodedPrompt> one;
  one.push_back(std::move(encoded));
  return std::move(DenoiseDecodeBatch(std::move(one), {progress})[0]);
}

std::vector<absl::StatusOr<GenerateResult>> FluxPipeline::DenoiseDecodeBatch(
    std::vector<EncodedPrompt> batch, const std::vector<ProgressFn>& progress) {
  const size_t n = batch.size();
  auto all_fail = [n](const absl::Status& s) {
    return std::vector<absl::StatusOr<GenerateResult>>(n, s);
  };
  if (n == 0) return {};
  if (!progress.empty() && progress.size() != n) {
    return all_fail(absl::InvalidArgumentError(
        absl::StrCat("progress: ", progress.size(), " functions for a batch of ", n)));
  }
  for (size_t i = 0; i < n; ++i) {
    if (batch[i].state == nullptr || batch[i].state->owner != this) {
      return all_fail(absl::InvalidArgumentError(absl::StrCat(
          "encoded prompt ", i, ": not made by this pipeline's EncodePrompt")));
    }
    if (!BatchCompatible(batch[0].request, batch[i].request)) {
      return all_fail(absl::InvalidArgumentError(absl::StrCat(
          "encoded prompt ", i, ": size, steps or LoRA set differ from prompt 0's (",
          batch[i].request.width, "x", batch[i].request.height, ", ", batch[i].request.steps,
          " steps, loras '", LoraSetKey(batch[i].request.loras), "' against ",
          batch[0].request.width, "x", batch[0].request.height, ", ", batch[0].request.steps,
          " steps, loras '", LoraSetKey(batch[0].request.loras), "'): not one batch")));
    }
  }
  Impl& m = *impl_;
  if (m.options.denoise_loop && n > 1) {
    return all_fail(absl::InvalidArgumentError(absl::StrCat(
        "a batch of ", n, ": a pipeline with a denoise_loop (sequence parallel) denoises one job "
        "at a time")));
  }
  const GenerateRequest& head = batch[0].request;
  const int steps = head.steps;
  // Per job: the step after which its token was seen set (-1: still running). A cancelled job
  // drops out of the reports; the batch runs on while one job is left.
  std::vector<int> stopped(n, -1);
  auto check_cancels = [&](int step) {
    bool all = true;
    for (size_t i = 0; i < n; ++i) {
      const CancelToken* c = batch[i].request.cancel;
      if (stopped[i] < 0 && c != nullptr && c->cancelled()) stopped[i] = step;
      all = all && stopped[i] >= 0;
    }
    return all;
  };
  auto report = [&](const std::string& phase, int step) {
    for (size_t i = 0; i < n; ++i) {
      if (stopped[i] < 0 && !progress.empty() && progress[i]) progress[i](phase, step, steps);
    }
  };
  auto results = [&](std::vector<GenerateResult>& done) {
    std::vector<absl::StatusOr<GenerateResult>> out;
    for (size_t i = 0; i < n; ++i) {
      if (stopped[i] >= 0) {
        out.push_back(CancelledAfterStep(stopped[i], steps));
      } else {
        out.push_back(std::move(done[i]));
      }
    }
    return out;
  };
  const int vae_scale = m.keys->options().vae_scale;
  const auto t_total = SteadyNow();
  std::vector<GenerateResult> r;
  for (auto& e : batch) {
    r.push_back(std::move(e.partial));
    r.back().batch = static_cast<int>(n);
  }
  // The batch's LoRA set: merged and swapped in here, between jobs (the one denoised before is
  // done with the weights; the encode stage, which owns the PackageLoader, waits for it).
  // Counted as a switch by the first job.
  if (LoraSetKey(head.loras) != m.applied_loras) {
    report("applying loras", 0);
    std::lock_guard<std::mutex> device_lock(m.encode_mu);
    if (auto s = m.SwitchLoras(head.loras, &r[0]); !s.ok()) return all_fail(s);
    r[0].lora_switched = true;
  }
  for (auto& x : r) x.loras = LoraSetKey(head.loras);
  // The transformer and the VAE decoder: the encode stage's (batch 1), or for a batch those of
  // bucket batch n, fetched, compiled or loaded here on a miss like any other bucket.
  std::map<std::string, LoadedComponent> packages = batch[0].state->packages;
  if (n > 1) {
    std::lock_guard<std::mutex> device_lock(m.encode_mu);
    std::map<std::string, cache::ArtifactKey> keys;
    for (const std::string c : {"transformer", "vae_decoder"}) {
      keys[c] = m.keys->KeyFor(c, head.width, head.height, static_cast<int>(n));
    }
    LoadReport loaded;
    auto got = m.packages->EnsureAll(keys, &loaded,
                                     [&](const std::string& phase) { report(phase, 0); });
    {
      std::lock_guard<std::mutex> lock(m.digests_mu);
      m.loaded_digests = m.packages->LoadedDigests();
    }
    if (!got.ok()) return all_fail(got.status());
    for (auto& [c, component] : *got) packages[c] = component;
    for (auto& x : r) {
      x.warnings.insert(x.warnings.end(), loaded.warnings.begin(), loaded.warnings.end());
      x.seconds.fetch += loaded.fetch_seconds;
      x.seconds.compile += loaded.compile_seconds;
      x.seconds.package_load += loaded.package_load_seconds;
      x.seconds.weights += loaded.weights_seconds;
      x.weight_bytes += loaded.weight_bytes;
      for (const auto& [c, provenance] : loaded.packages) x.packages[c] = provenance;
    }
  }
  // The transformer step: the whole-graph package, or a regional set's loop over layers.
  const LoadedComponent transformer = packages["transformer"];
  if (m.options.denoise_loop && transformer.regional == nullptr) {
    return all_fail(absl::FailedPreconditionError(
        "a pipeline with a denoise_loop (sequence parallel) needs the regional layout"));
  }
  TransformerFn transformer_fn;
  if (transformer.regional != nullptr) {
    transformer_fn = [set = transformer.regional](const std::vector<at::Tensor>& inputs,
                                                  void* stream) {
      return set->RunOn(inputs, stream);
    };
  } else {
    transformer_fn = TransformerOf(*transformer.package);
  }
  const std::string transformer_digest = transformer.regional != nullptr
                                             ? transformer.regional->manifest().digest
                                             : transformer.package->manifest().digest;
  GenerateResult::DenoiseProfile profile;
  PhaseSeconds seconds;  // the batch's: graph capture, denoise, decode
  std::vector<std::string> warnings;
  at::Tensor bytes;
  try {
    torch::NoGradGuard no_grad;
    const at::ScalarType act = m.options.precision == "fp32" ? at::kFloat : at::kBFloat16;

    // Denoise. Noise comes from a CPU generator so a seed gives the same image on every device;
    // each job's from its own seed, as when it runs alone.
    if (check_cancels(0)) return results(r);
    auto t = SteadyNow();
    const int64_t lh = head.height / vae_scale, lw = head.width / vae_scale;
    const int64_t seq = (lh / 2) * (lw / 2);
    auto schedule = m.ScheduleFor(steps, seq, static_cast<int64_t>(n));
    if (!schedule.ok()) return all_fail(schedule.status());
    std::vector<at::Tensor> noise, text, pooled;
    std::vector<float> guidance;
    for (const auto& e : batch) {
      auto gen = at::detail::createCPUGenerator(e.request.seed);
      noise.push_back(Pack(at::randn({1, m.latent_channels, lh, lw}, gen,
                                     torch::TensorOptions().dtype(at::kFloat))));
      text.push_back(e.state->txt);
      pooled.push_back(e.state->pooled);
      guidance.push_back(static_cast<float>(e.request.guidance));
    }
    at::Tensor latents = torch::cat(noise).to(m.device);  // float32 state [n, S, 4C]
    DenoiseConditioning conditioning;
    conditioning.guidance =
        torch::tensor(guidance, torch::TensorOptions().dtype(at::kFloat)).to(m.device);
    conditioning.text = torch::cat(text).to(act);
    conditioning.pooled = torch::cat(pooled).to(act);

    // The transformer step: a CUDA graph captured once per bucket where possible, else plain runs.
    PlainDenoiser plain(transformer_fn, act);
    Denoiser* denoiser = &plain;
    if (!m.options.denoise_loop && m.device.is_cuda() && m.options.cuda_graphs &&
        CudaGraphsSupported()) {
      auto [slot, fresh] = m.graphs.try_emplace(transformer_digest);
      if (fresh) {
        // A capture (global mode) fails on device calls from other threads: the encode stage
        // waits for it.
        std::lock_guard<std::mutex> device_lock(m.encode_mu);
        SyncDevice(m.device);
        const auto tc = SteadyNow();
        auto captured = CudaGraphDenoiser::Capture(
            m.device, "transformer", transformer_fn, act, conditioning, latents,
            schedule->timesteps.select(0, 0).narrow(0, 0, n));
        if (captured.ok()) {
          slot->second = *std::move(captured);
        } else {
          warnings.push_back(absl::StrCat(captured.status().message(),
                                          "; denoising this bucket without a CUDA graph"));
        }
        SyncDevice(m.device);
        seconds.graph_capture = SecondsSince(tc);
      }
      if (slot->second) denoiser = slot->second.get();
    }
    if (m.options.denoise_loop) {
      // Another's loop (a sequence-parallel pipeline's, over the ranks of a group): one job,
      // no cancel inside (every rank must take part in every step's collectives).
      report("denoising", 0);
      t = SteadyNow();
      DenoiseJob job;
      job.transformer = transformer.regional;
      job.conditioning = conditioning;
      job.schedule = *schedule;
      job.latents = latents;
      job.act = act;
      if (auto s = m.options.denoise_loop(job); !s.ok()) return all_fail(s);
      latents = job.latents;
      report("denoising", steps);
    } else {
      if (auto s = denoiser->Prepare(conditioning); !s.ok()) return all_fail(s);
      profile.cuda_graph = denoiser->cuda_graph();
      report("denoising", 0);
      t = SteadyNow();
      std::unique_ptr<StepProfiler> profiler;
      if (m.options.profile_steps) profiler = std::make_unique<StepProfiler>(m.device);
      // The loop stops when every job of the batch is cancelled (checked after each step).
      CancelToken all_cancelled;
      auto s = RunDenoiseLoop(*denoiser, *schedule, latents, &all_cancelled,
                              [&](int step) {
                                report("denoising", step);
                                if (check_cancels(step)) all_cancelled.Cancel();
                              },
                              profiler.get());
      if (all_cancelled.cancelled()) return results(r);
      if (!s.ok()) return all_fail(s);
      if (profiler) {
        profiler->Disarm();
        SyncDevice(m.device);
        auto p = profiler->Finish();
        profile.sync_checked = p.sync_checked;
        profile.step_ms = std::move(p.step_ms);
        profile.span_ms = p.span_ms;
        profile.idle_fraction = p.idle_fraction;
      }
    }
    SyncDevice(m.device);
    seconds.denoise = SecondsSince(t);

    if (check_cancels(steps)) return results(r);
    report("decoding", steps);
    t = SteadyNow();
    at::Tensor z = Unpack(latents, m.latent_channels, lh, lw).to(act).contiguous();
    auto image = packages["vae_decoder"].package->RunFirst({z});
    if (!image.ok()) return all_fail(image.status());
    bytes = ((*image).to(at::kFloat).div(2).add(0.5).clamp(0, 1).mul(255).round().to(at::kByte))
                .permute({0, 2, 3, 1}).contiguous().cpu();
    seconds.decode = SecondsSince(t);
  } catch (const std::exception& e) {
    return all_fail(absl::InternalError(absl::StrCat("generate: ", ExceptionMessage(e))));
  }
  const double total = SecondsSince(t_total);
  const int64_t image_bytes = bytes.numel() / static_cast<int64_t>(n);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* first = bytes.data_ptr<uint8_t>() + i * image_bytes;
    r[i].rgb.assign(first, first + image_bytes);
    r[i].warnings.insert(r[i].warnings.end(), warnings.begin(), warnings.end());
    r[i].seconds.graph_capture = seconds.graph_capture;
    r[i].seconds.denoise = seconds.denoise;
    r[i].seconds.decode = seconds.decode;
    r[i].seconds.total += total;
    r[i].denoise_profile = profile;
  }
  return results(r);
}

}  // namespace kiln::pipeline
