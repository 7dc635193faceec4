// kiln-run: one prompt → one PNG in a single process, on the local package directory. It builds
// the package provider (local directory, optional shared directory, kiln-compile beside it) and
// hands it to the pipeline.
//   kiln-run --model DIR --prompt TEXT --width W --height H --steps N --seed S --out FILE.png [--json]
//            [--device cuda --precision bf16|fp8] [--shared_dir DIR] [--compile_options JSON]
//            [--lora NAME[:SCALE],... --lora_dir DIR,...]
//            [--batch N]   (N jobs, seeds SEED..SEED+N-1, denoised as one batch; OUT-0.png ...)
// Exit status: 0 ok, 2 bad input (flags, prompt, resolution, model repository), 1 other failure.
// Logs (errors, warnings) go to stderr (common/log.h); --log_format json for JSON lines.
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/marshalling.h"

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cache/package_provider.h"
#include "common/exit.h"
#include "common/flags.h"
#include "common/job_spec.h"
#include "common/files.h"
#include "common/log.h"
#include "common/log_flags.h"
#include "common/status.h"
#include "common/stopwatch.h"
#include "nlohmann/json.hpp"
#include "pipeline/flux_pipeline.h"
#include "pipeline/png.h"

ABSL_FLAG(std::string, model, "", "diffusers-layout model repository (required)");
ABSL_FLAG(std::string, prompt, "", "text prompt (UTF-8)");
ABSL_FLAG(int, width, 1024, "image width in pixels");
ABSL_FLAG(int, height, 1024, "image height in pixels");
ABSL_FLAG(int, steps, 28, "denoising steps");
ABSL_FLAG(uint64_t, seed, 0, "noise seed");
ABSL_FLAG(double, guidance, 3.5, "guidance scale (guidance-distilled models)");
ABSL_FLAG(std::string, out, "out.png", "output PNG path");
ABSL_FLAG(bool, json, false, "print one JSON object with timings and package provenance");
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda or cuda:N");
ABSL_FLAG(std::string, precision, "fp32", "fp32, bf16 or fp8 (cuda)");
ABSL_FLAG(std::string, package_dir, "",
          "local package directory (default: $KILN_PACKAGE_DIR, else .kiln/packages)");
ABSL_FLAG(std::string, resolutions, "", "allowed WIDTHxHEIGHT buckets, comma-separated");
ABSL_FLAG(int, max_sequence_length, 512, "T5 text length in tokens (capped by the tokenizer)");
ABSL_FLAG(bool, compile, true, "compile missing packages (--nocompile: fail instead)");
ABSL_FLAG(std::string, compiler, "", "kiln-compile executable (default: beside kiln-run)");
ABSL_FLAG(std::string, shared_dir, "",
          "shared package store (a directory every node sees): packages missing locally are "
          "fetched from it, compiled ones published to it, one compile per key cluster-wide");
ABSL_FLAG(std::string, compile_options, "",
          "JSON object of compile options over kiln's defaults (see kiln-compile), e.g. "
          "'{\"layout\":\"regional\"}' for the regional transformer layout");
ABSL_FLAG(std::string, trusted_keys, "",
          "comma list of .pub files and directories of .pub files: load only packages signed by "
          "one of these keys (\"\": signatures not checked)");
ABSL_FLAG(std::string, signing_key, "",
          "signing key file (kiln signing-key new) to sign the packages this run compiles");
ABSL_FLAG(std::string, revocation_file, "",
          "revocation list (lines 'key HEX' / 'package SHA256'), read before every load");
ABSL_FLAG(bool, canary, true,
          "run each package's canary after loading it (--nocanary: skip; development only)");
ABSL_FLAG(std::vector<std::string>, lora, {},
          "LoRAs merged into the transformer, in order: NAME[:SCALE],... (scale default 1)");
ABSL_FLAG(std::vector<std::string>, lora_dir, {},
          "directories searched in order for NAME.safetensors and its digest "
          "NAME.safetensors.sha256 (default: none; with --shared_dir, SHARED/loras is searched last)");
ABSL_FLAG(int, lora_switches, 0,
          "benchmark: after the image, run this many more jobs alternating the base weights and "
          "the --lora set, and report each switch's seconds under lora_switches with --json");
ABSL_FLAG(bool, lora_prepare_ahead, true,
          "merge a job's LoRA set into new weight tensors in its encode stage, so its switch "
          "only loads them (--nolora_prepare_ahead: merge at the switch, as before)");
ABSL_FLAG(int, batch, 1,
          "run N jobs with seeds seed..seed+N-1 as one batch (transformer and VAE packages of "
          "bucket batch N); images go to OUT with -0, -1, ... before the extension");
ABSL_FLAG(bool, cuda_graphs, true, "cuda: replay the transformer step as a CUDA graph");
ABSL_FLAG(bool, profile_steps, false,
          "cuda: time each denoising step with device events and fail on any host sync inside "
          "the loop (reported under denoise_profile with --json)");

namespace {

constexpr int kMaxBatch = 16;

// OUT for image `i` of a batch of `n`: OUT itself alone, else OUT with "-i" before its extension.
std::string BatchImagePath(const std::string& out, int i, int n) {
  if (n == 1) return out;
  const std::filesystem::path p(out);
  return (p.parent_path() / (p.stem().string() + "-" + std::to_string(i) + p.extension().string()))
      .string();
}

// `n` jobs made of `req` with seeds req.seed + i: Generate() alone, else each encoded, then
// denoised and decoded as one batch (FluxPipeline::DenoiseDecodeBatch). The first error fails.
absl::StatusOr<std::vector<kiln::pipeline::GenerateResult>> RunJobs(
    kiln::pipeline::FluxPipeline& pipeline, const kiln::pipeline::GenerateRequest& req, int n) {
  std::vector<kiln::pipeline::GenerateResult> out;
  if (n == 1) {
    auto r = pipeline.Generate(req);
    if (!r.ok()) return r.status();
    out.push_back(*std::move(r));
    return out;
  }
  std::vector<kiln::pipeline::EncodedPrompt> encoded;
  for (int i = 0; i < n; ++i) {
    kiln::pipeline::GenerateRequest job = req;
    job.seed = req.seed + static_cast<uint64_t>(i);
    auto e = pipeline.EncodePrompt(job);
    if (!e.ok()) return e.status();
    encoded.push_back(*std::move(e));
  }
  for (auto& r : pipeline.DenoiseDecodeBatch(std::move(encoded))) {
    if (!r.ok()) return r.status();
    out.push_back(*std::move(r));
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const kiln::SteadyTime t_main = kiln::SteadyNow();
  auto since_main = [&] { return kiln::SecondsSince(t_main); };
  const std::vector<std::string> rest = kiln::ParseFlagsOrExit(
      argc, argv, "kiln-run", "kiln-run --model DIR --prompt TEXT --out FILE.png [flags]");
  if (auto s = kiln::InitLoggingFromFlags("kiln-run"); !s.ok()) return kiln::FailMain(s);
  if (auto s = kiln::NoPositionalArguments(rest); !s.ok()) return kiln::FailMain(s);
  kiln::pipeline::PipelineOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model);
  options.device = absl::GetFlag(FLAGS_device);
  options.precision = absl::GetFlag(FLAGS_precision);
  options.max_sequence_length = absl::GetFlag(FLAGS_max_sequence_length);
  // The provider: the local package directory, the shared store if given, kiln-compile.
  kiln::cache::TieredProviderConfig provider_config;
  provider_config.local.root = absl::GetFlag(FLAGS_package_dir);
  if (provider_config.local.root.empty()) {
    const char* env = std::getenv("KILN_PACKAGE_DIR");
    provider_config.local.root = env && *env ? env : ".kiln/packages";
  }
  provider_config.shared_root = absl::GetFlag(FLAGS_shared_dir);
  provider_config.trusted_keys = absl::GetFlag(FLAGS_trusted_keys);
  provider_config.signing_key = absl::GetFlag(FLAGS_signing_key);
  provider_config.tiered.revocation_file = absl::GetFlag(FLAGS_revocation_file);
  if (absl::GetFlag(FLAGS_compile)) {
    provider_config.compiler_path = absl::GetFlag(FLAGS_compiler).empty()
                                        ? kiln::ExecutableDir() + "/kiln-compile"
                                        : absl::GetFlag(FLAGS_compiler);
  }
  if (!absl::GetFlag(FLAGS_resolutions).empty()) {
    auto r = kiln::pipeline::ParseResolutions(absl::GetFlag(FLAGS_resolutions));
    if (!r.ok()) return kiln::FailMain(r.status());
    options.resolutions = *r;
  }
  if (options.model_dir.empty()) {
    return kiln::FailMain(absl::InvalidArgumentError("--model is required"));
  }
  options.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  options.canary = absl::GetFlag(FLAGS_canary);
  options.profile_steps = absl::GetFlag(FLAGS_profile_steps);
  if (const std::string co = absl::GetFlag(FLAGS_compile_options); !co.empty()) {
    auto parsed = kiln::pipeline::ParseCompileOptions(co);
    if (!parsed.ok()) return kiln::FailMain(parsed.status());
    options.compile_options = *std::move(parsed);
  }

  kiln::pipeline::GenerateRequest req;
  req.prompt = absl::GetFlag(FLAGS_prompt);
  req.width = absl::GetFlag(FLAGS_width);
  req.height = absl::GetFlag(FLAGS_height);
  req.steps = absl::GetFlag(FLAGS_steps);
  req.seed = absl::GetFlag(FLAGS_seed);
  req.guidance = absl::GetFlag(FLAGS_guidance);
  for (const auto& text : absl::GetFlag(FLAGS_lora)) {
    auto choice = kiln::ParseLoraChoice("--lora", text);
    if (!choice.ok()) return kiln::FailMain(choice.status());
    req.loras.push_back(*std::move(choice));
  }
  options.lora_dirs = absl::GetFlag(FLAGS_lora_dir);
  options.lora_prepare_ahead = absl::GetFlag(FLAGS_lora_prepare_ahead);
  if (!absl::GetFlag(FLAGS_shared_dir).empty()) {
    options.lora_dirs.push_back(absl::GetFlag(FLAGS_shared_dir) + "/loras");
  }
  const std::string out = absl::GetFlag(FLAGS_out);

  if (auto s = options.Validate(); !s.ok()) return kiln::FailMain(s);
  auto provider = kiln::cache::OpenTieredProvider(std::move(provider_config), /*registry=*/nullptr);
  if (!provider.ok()) return kiln::FailMain(provider.status());
  auto pipeline = kiln::pipeline::FluxPipeline::Create(options, *std::move(provider));
  if (!pipeline.ok()) return kiln::FailMain(pipeline.status());
  const int batch = absl::GetFlag(FLAGS_batch);
  if (batch < 1 || batch > kMaxBatch) {
    return kiln::FailMain(absl::InvalidArgumentError(
        absl::StrCat("--batch ", batch, ": not in 1..", kMaxBatch)));
  }
  const double created = since_main();
  auto results = RunJobs(**pipeline, req, batch);
  if (!results.ok()) return kiln::FailMain(results.status());
  const kiln::pipeline::GenerateResult* result = &results->front();
  const double generated = since_main();
  // LoRA switch benchmark (bench/README.md "LoRA switch"): base, set, base, ... after the image.
  nlohmann::json switches = nlohmann::json::array();
  const std::vector<kiln::LoraChoice> lora_set = req.loras;
  for (int i = 0; i < absl::GetFlag(FLAGS_lora_switches); ++i) {
    kiln::pipeline::GenerateRequest again = req;
    again.loras = (i % 2 == 0) == lora_set.empty() ? lora_set : std::vector<kiln::LoraChoice>{};
    auto r = (*pipeline)->Generate(again);
    if (!r.ok()) return kiln::FailMain(r.status());
    switches.push_back({{"loras", r->loras},
                        {"switched", r->lora_switched},
                        {"prepared", r->lora_prepared},
                        {"lora_load_s", r->seconds.lora_load},
                        {"lora_prepare_s", r->seconds.lora_prepare},
                        {"lora_switch_s", r->seconds.lora_switch},
                        {"graph_capture_s", r->seconds.graph_capture},
                        {"denoise_s", r->seconds.denoise}});
  }
  for (const auto& w : result->warnings) kiln::LogWarning("main", w);
  nlohmann::json images = nlohmann::json::array();
  for (int i = 0; i < batch; ++i) {
    const auto& r = (*results)[i];
    const std::string path = BatchImagePath(out, i, batch);
    if (auto s = kiln::pipeline::WritePng(path, r.rgb.data(), r.width, r.height); !s.ok()) {
      return kiln::FailMain(s);
    }
    images.push_back({{"image", path}, {"seed", req.seed + static_cast<uint64_t>(i)}});
  }
  const double written = since_main();
  if (absl::GetFlag(FLAGS_json)) {
    const auto& s = result->seconds;
    nlohmann::json j = {
        {"image", images[0]["image"]},
        {"width", result->width},
        {"height", result->height},
        {"steps", req.steps},
        {"seed", req.seed},
        {"device", options.device},
        {"precision", options.precision},
        {"seconds",
         {{"weights", s.weights},
          {"package_load", s.package_load},
          {"fetch", s.fetch},
          {"compile", s.compile},
          {"graph_capture", s.graph_capture},
          {"lora_load", s.lora_load},
          {"lora_prepare", s.lora_prepare},
          {"lora_switch", s.lora_switch},
          {"text_encoding", s.text_encoding},
          {"denoise", s.denoise},
          {"decode", s.decode},
          {"total", s.total}}},
        {"packages", result->packages},
        {"loras", result->loras},
        {"warnings", result->warnings},
        {"compile_options", options.compile_options},
        {"weight_bytes", result->weight_bytes},
    };
    // Seconds since main() began: the pipeline created (configs, tokenizers), the image
    // generated (Generate(), phases above), the PNG written.
    j["process"] = {{"pipeline_created_s", created}, {"generated_s", generated},
                    {"png_written_s", written}};
    if (!switches.empty()) j["lora_switches"] = switches;
    if (batch > 1) {
      j["batch"] = batch;
      j["images"] = images;
    }
    const auto& p = result->denoise_profile;
    j["denoise_profile"] = {{"cuda_graph", p.cuda_graph}, {"sync_checked", p.sync_checked},
                            {"step_ms", p.step_ms}, {"span_ms", p.span_ms},
                            {"idle_fraction", p.idle_fraction}};
    std::cout << j.dump() << std::endl;
  } else {
    for (const auto& image : images) std::cout << image["image"].get<std::string>() << "\n";
  }
  return kiln::kExitOk;
}
