// FluxPipeline: prompt → PNG pixels for a Flux-class model in a diffusers-layout repository,
// every component running from an AOTInductor package with the repository's weights handed to it
// at run time.
//
//   tokenize (CLIP BPE, T5 SentencePiece) → text_encoder, text_encoder_2 → denoise loop
//   (flow-matching Euler, state on the device, no host sync inside) → vae_decoder → RGB bytes
//
// Its parts: KeyPolicy (key_policy.h: served sizes, buckets, artifact keys), PackageLoader
// (package_loader.h: packages from the PackageProvider it is given — it knows nothing about
// where they come from — loaded with their weights, read once per component and shared by every
// bucket), Denoiser (denoiser.h: the transformer step, plain or as a CUDA graph, and the Euler
// loop). Phase timings and per-component package provenance are reported per call; a
// CancelToken in the request stops it between steps.
//
// Two stages, so that a node can overlap jobs (node/worker.h): EncodePrompt (tokenize, get and
// load the bucket's packages, run the text encoders — on CUDA on the pipeline's own stream) and
// DenoiseDecode (the denoise loop and the VAE decode, on the calling thread's current stream).
// Generate() is the two in a row; a staged job gives the same bytes as Generate().
// DenoiseDecodeBatch runs the second stage of several encoded jobs as one batch.
// Threads: one EncodePrompt() and one DenoiseDecode() (or DenoiseDecodeBatch()) may run at the
// same time, on two threads (job N+1's encoding beside job N's denoise); Generate() counts as
// both. LoadedDigests() and
// the const accessors from any thread.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/artifact_key.h"
#include "common/job_spec.h"
#include "cache/package_provider.h"
#include "nlohmann/json.hpp"
#include "pipeline/cancel_token.h"
#include "pipeline/key_policy.h"

namespace kiln::pipeline {

// A --compile_options flag: a JSON object (checked by kiln-compile when it compiles), over the
// defaults (cache::DefaultCompileOptions): options it does not name keep their default, so
// '{"layout":"regional"}' keys and compiles as the defaults plus the regional layout.
// InvalidArgument if `text` is not a JSON object.
absl::StatusOr<nlohmann::json> ParseCompileOptions(const std::string& text);

struct DenoiseJob;        // pipeline/denoiser.h
class ComponentWeights;  // pipeline/weights.h
// Runs one job's denoise loop in the pipeline's stead (PipelineOptions::denoise_loop); leaves
// the final latents in `job.latents`.
using DenoiseLoopFn = std::function<absl::Status(DenoiseJob& job)>;

struct PipelineOptions {
  std::string model_dir;           // diffusers-layout repository (required)
  std::string device = "cpu";      // "cpu", "cuda" or "cuda:N"
  std::string precision = "fp32";  // fp32 | bf16 | fp8 (fp8: cuda only)
  std::vector<Resolution> resolutions = DefaultResolutions();  // allowed buckets
  int max_sequence_length = 512;  // T5 tokens; capped by tokenizer_2's model_max_length
  // The one copy of the compile options: part of every artifact key, and sent with each package
  // request to the provider, which passes them to kiln-compile on a miss.
  nlohmann::json compile_options = cache::DefaultCompileOptions();
  // CUDA: capture the transformer step once per bucket as a CUDA graph and replay it (falls back
  // to plain runs, with a warning, if capture fails). Ignored on the CPU.
  bool cuda_graphs = true;
  // Run each package's numerical canary after loading it, before serving (pipeline/canary.h);
  // a package that disagrees is quarantined and rebuilt once.
  bool canary = true;
  // CUDA: time every denoising step with device events and run the loop with LibTorch's
  // synchronization check set to error (any host sync inside the loop fails the job). Fills
  // GenerateResult::denoise_profile. For benchmarks; costs nothing measurable.
  bool profile_steps = false;
  // Directories searched in order for a job's LoRAs (NAME.safetensors with its digest
  // NAME.safetensors.sha256; pipeline/lora.h). Empty: jobs with LoRAs fail NotFound.
  std::vector<std::string> lora_dirs;
  // Merge a job's LoRA set into new transformer weight tensors during its EncodePrompt (beside
  // the previous job's denoise on a node), so that its DenoiseDecode only loads them (pointers;
  // FluxPipeline, README "LoRA"). On CUDA only while the device's free memory
  // exceeds the merged weights' float32 size plus lora_prepare_reserve_bytes; otherwise, or when
  // off, the merge waits for DenoiseDecode as the whole switch.
  bool lora_prepare_ahead = true;
  uint64_t lora_prepare_reserve_bytes = uint64_t{2} << 30;  // bytes left free for the denoise
  // Runs each job's denoise loop instead of the pipeline (null: the pipeline's own). Set by
  // parallel::SequenceParallelPipeline (parallel/sequence_parallel_pipeline.h), whose loop runs
  // over the ranks of a process group; required when compile_options' `sequence_parallel` is
  // above 1 (the transformer set is then one rank's). With it, jobs are denoised one at a time
  // (no batches), a job's CancelToken is checked before and after the loop, not inside, and
  // progress hears "denoising" at step 0 and at the last step only.
  DenoiseLoopFn denoise_loop;

  absl::Status Validate() const;  // InvalidArgument naming the field
};

// Called from Generate()'s thread at phase changes and after every denoising step (the step
// count is known on the host without waiting for the device). phase: "preparing", then while
// packages are not loaded "fetching or compiling <components>", "loading package <component>",
// "loading weights <component>" (PackageLoader::EnsureAll), then "text_encoding", "denoising",
// "decoding".
using ProgressFn = std::function<void(const std::string& phase, int step, int total_steps)>;

struct GenerateRequest {
  std::string prompt;    // UTF-8
  int width = 1024;      // pixels; one of PipelineOptions::resolutions
  int height = 1024;     // pixels
  int steps = 28;        // denoising steps, 1..1000
  uint64_t seed = 0;     // noise seed; same seed → same image
  double guidance = 3.5; // distilled guidance scale (guidance-embedding models)
  // LoRAs merged into the transformer's weights, in this order (empty: the base weights). The
  // pipeline keeps the set of its last job merged; a job with another set switches it first.
  std::vector<LoraChoice> loras;
  // Checked at phase boundaries and between denoising steps (null: never cancelled); when set,
  // Generate() returns CancelledError "cancelled after step K of N". Not owned; must outlive
  // the call.
  const CancelToken* cancel = nullptr;

  absl::Status Validate() const;
};

struct PhaseSeconds {
  double weights = 0;        // reading weights and moving them to the device
  double package_load = 0;   // verifying and loading packages
  // Finding packages runs for all components at once; these two are the wall time of that
  // phase, counted as compile if any package was compiled, else as fetch if any was fetched.
  double fetch = 0;          // copying packages from the shared tier
  double compile = 0;        // kiln-compile on package misses (components compile in parallel)
  double graph_capture = 0;  // CUDA graph warm-up + capture of the transformer step (once)
  // LoRA switch (zero when the job's set was merged already): reading and checking LoRA files
  // not read before (digest, names and shapes); lora_prepare: merging the set into new weight
  // tensors during EncodePrompt (hidden under the previous job's denoise on a node);
  // lora_switch: the switch at the start of DenoiseDecode, on the critical path (the load
  // alone when the set was prepared ahead, else merge and load).
  double lora_load = 0;
  double lora_prepare = 0;
  double lora_switch = 0;
  double text_encoding = 0;  // tokenizers + text encoders
  double denoise = 0;        // the whole denoise loop
  double decode = 0;         // VAE decode + conversion to bytes
  double total = 0;
};

struct GenerateResult {
  std::vector<uint8_t> rgb;  // height*width*3, row-major RGB
  int width = 0;
  int height = 0;
  PhaseSeconds seconds;
  // component → the wire's provenance (JobInfo.packages): "compiled" (built on a miss in this
  // call), "local" (loaded from the node-local package directory in this call), "shared" (fetched
  // from the shared tier in this call) or "resident" (already loaded by an earlier call).
  std::map<std::string, std::string> packages;
  std::vector<std::string> warnings;  // e.g. prompt truncation
  // Images denoised and decoded together with this one, itself included (1: alone;
  // FluxPipeline::DenoiseDecodeBatch). Its denoise, decode and graph-capture seconds are the
  // batch's.
  int batch = 1;
  std::string loras;           // LoraSetKey of the set the image was made with ("" = base)
  bool lora_switched = false;  // this call changed the merged set
  // The switch loaded weights prepared ahead (by this job's EncodePrompt, or an earlier
  // one's for the same set) instead of merging on the critical path.
  bool lora_prepared = false;
  uint64_t weight_bytes = 0;  // checkpoint bytes read for the packages loaded in this call
  // How the denoise loop ran; step timings only with PipelineOptions::profile_steps on CUDA.
  struct DenoiseProfile {
    bool cuda_graph = false;     // steps replayed a captured graph
    bool sync_checked = false;   // the loop ran with host syncs turned into errors
    std::vector<double> step_ms; // device time of each step (events around the step's work)
    double span_ms = 0;          // device time from the first step's start to the last's end
    double idle_fraction = 0;    // 1 - sum(step_ms) / span_ms: the GPU idle between steps
  } denoise_profile;
};

// EncodePrompt's output for one request: what DenoiseDecode needs (the text embeddings on the
// device, the bucket's loaded packages) and what the result reports so far (warnings, package
// provenance, cold-start and text-encoding seconds). Belongs to the pipeline that made it.
struct EncodedPrompt {
  GenerateRequest request;
  GenerateResult partial;
  struct State;                  // pipeline-private (flux_pipeline.cc)
  std::shared_ptr<State> state;  // null: not made by a FluxPipeline (a test's fake)
};

// True if two requests can be denoised as one batch: the same image size, step count (one
// schedule) and LoRA set (one set of weights). Prompts, seeds and guidance stay per job. Inline:
// the node's worker uses it in builds without the pipeline's LibTorch half (tests/fuzz).
inline bool BatchCompatible(const GenerateRequest& a, const GenerateRequest& b) {
  return a.width == b.width && a.height == b.height && a.steps == b.steps &&
         LoraSetKey(a.loras) == LoraSetKey(b.loras);
}

class FluxPipeline {
 public:
  // Reads the repository's configs and tokenizers; loads nothing heavy yet. Every package comes
  // from `provider` (required; shared by the pipelines of a node, thread-safe).
  // InvalidArgument naming the bad option, NotFound for a missing repository file.
  static absl::StatusOr<std::unique_ptr<FluxPipeline>> Create(
      const PipelineOptions& options, std::shared_ptr<cache::PackageProvider> provider);
  ~FluxPipeline();

  // EncodePrompt then DenoiseDecode.
  absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request,
                                          const ProgressFn& progress = nullptr);
  // The first stage: checks the request, tokenizes (bad prompts fail before any heavy work),
  // reads and checks the request's LoRA files (a missing or misshaped one fails here), gets and
  // loads the packages of the request's bucket, runs the text encoders and waits for them; then,
  // when the request's LoRA set is not the one merged now and no other set is prepared and not
  // yet swapped in, merges it into new transformer weight tensors
  // (PipelineOptions::lora_prepare_ahead; the weights a running denoise uses are untouched).
  // Progress: "preparing", the loader's phases, "text_encoding". `request.cancel` is checked
  // before the encoders run. Safe beside another job's DenoiseDecode.
  absl::StatusOr<EncodedPrompt> EncodePrompt(const GenerateRequest& request,
                                             const ProgressFn& progress = nullptr);
  // The second stage: the denoise loop and the VAE decode of `encoded` (from this pipeline's
  // EncodePrompt; InvalidArgument otherwise). First, when the request's LoRA set is not the one
  // merged now, it is swapped in ("applying loras": between jobs, so the job denoised before
  // finished on its own weights): the buffers prepared by EncodePrompt if they still hold this
  // set, else merged now. Progress: "denoising" per step, "decoding". The
  // result's seconds add both stages' (time between the stages is not counted).
  absl::StatusOr<GenerateResult> DenoiseDecode(EncodedPrompt encoded,
                                               const ProgressFn& progress = nullptr);
  // The second stage for several jobs at once: one denoise loop and one VAE decode over the
  // batch (the transformer and VAE packages of bucket batch N = encoded.size(), fetched or
  // compiled on a miss like any bucket; N = 1 is DenoiseDecode). Each job keeps its own noise
  // (its seed, as alone), text embeddings and guidance; the jobs must be BatchCompatible
  // (InvalidArgument for every job otherwise). Returns one result per job, in order. A job whose
  // CancelToken is set drops out (CancelledError "cancelled after step K of N"; no more progress
  // for it) while the others run on; the loop stops when all are cancelled. Any other error is
  // every job's. `progress`: one function per job (or empty). Results are numerically those of
  // each job alone within the batched kernels' rounding (tests/pipeline/flux_pipeline_test.cc
  // states the tolerance measured).
  std::vector<absl::StatusOr<GenerateResult>> DenoiseDecodeBatch(
      std::vector<EncodedPrompt> encoded, const std::vector<ProgressFn>& progress = {});

  // A follower rank's part of a job of a sequence-parallel pipeline (PipelineOptions::
  // denoise_loop set): reads and checks the job's LoRA files (from this pipeline's lora_dirs),
  // gets and loads the transformer of the width×height bucket (KeyPolicy's key: one rank's set),
  // makes `loras` its merged set when it is not (merged at once: nothing is prepared ahead on a
  // follower), builds the job's schedule and calls denoise_loop with a DenoiseJob whose
  // conditioning and latents are empty. The text encoders and the VAE are not loaded.
  // InvalidArgument for a size the pipeline does not serve, FailedPrecondition without a
  // denoise_loop or with a whole-graph transformer; a LoRA's errors as EncodePrompt's (NotFound
  // naming every path looked at for a missing one); the loader's and the loop's errors as they
  // are. Not beside EncodePrompt on another thread.
  absl::Status FollowDenoise(int width, int height, int steps,
                             const std::vector<LoraChoice>& loras = {});
  // `component`'s weights from `weights` instead of its checkpoint under model_dir (a rank of a
  // sequence-parallel pipeline: the transformer weights rank 0 broadcast,
  // parallel/sequence_parallel_pipeline.h); before the component's first load.
  // FailedPrecondition once its weights are open. Not beside EncodePrompt on another thread.
  absl::Status UseWeights(const std::string& component,
                          std::unique_ptr<ComponentWeights> weights);

  // The artifact key this pipeline uses for `component` at an image size (0×0 for text encoders).
  cache::ArtifactKey KeyFor(const std::string& component, int width, int height) const;
  int text_len() const;
  // Digests of the four packages a job of this size needs (text encoders, transformer, VAE).
  std::vector<std::string> DigestsFor(int width, int height) const;
  // Digests of the packages loaded in memory now.
  std::vector<std::string> LoadedDigests() const;
  const PipelineOptions& options() const;
  // LoraSetKey of the LoRA set merged now ("" = base weights).
  std::string applied_loras() const;
  // Names of the LoRAs in PipelineOptions::lora_dirs (with a digest file).
  std::vector<std::string> AvailableLoras() const;

 private:
  class Impl;
  explicit FluxPipeline(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kiln::pipeline
