// KeyPolicy: which package each component of a job needs. The bucket rules (the image sizes a
// pipeline serves, and which bucket fields each component's package depends on) and the artifact
// key built from them (architecture, precision, compile options, target, toolchain). LibTorch-free
// and immutable after construction: thread-safe.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/artifact_key.h"
#include "nlohmann/json.hpp"

namespace kiln::pipeline {

struct Resolution {
  int width = 0;   // pixels
  int height = 0;  // pixels
};

// The image sizes packages are compiled for unless told otherwise.
std::vector<Resolution> DefaultResolutions();
// "256x256,512x512" ⇄ list. InvalidArgument naming the bad entry.
absl::StatusOr<std::vector<Resolution>> ParseResolutions(const std::string& text);
std::string FormatResolutions(const std::vector<Resolution>& list);

// The components of a Flux pipeline, in the order a job runs them.
const std::vector<std::string>& FluxComponents();

// The compile options `component`'s package is compiled with and keyed by: the pipeline's, less
// the transformer-only `layout`, `sequence_parallel` and `process_group` for the other
// components (a regional transformer shares the text encoders and VAE of the whole layout), and
// less a `process_group` of "0" (the default: absent and "0" are one key). Twin of
// kiln.compile.component_compile_options.
nlohmann::json ComponentCompileOptions(const nlohmann::json& options,
                                       const std::string& component);

// The compile option `process_group` (docs/multi_gpu.md): the name of the c10d group a
// sequence-parallel set's all-to-alls resolve, registered under it by the ranks
// (parallel::SequenceParallelThreads). "0" (Python's default group) when absent.
inline constexpr char kDefaultProcessGroup[] = "0";
std::string ProcessGroupName(const nlohmann::json& compile_options);
// OK for a name of 1..256 characters of [A-Za-z0-9._:/-] (a model name's characters: the name
// is written into the packages' generated code); InvalidArgument naming the option otherwise.
// Twin of kiln.compile.check_compile_options' rule.
absl::Status CheckProcessGroupName(const nlohmann::json& name);

struct KeyPolicyOptions {
  // Component → its config.json (the architecture digest's input); one per FluxComponents().
  std::map<std::string, nlohmann::json> configs;
  std::string precision = "fp32";  // the pipeline's: fp32 | bf16 | fp8
  nlohmann::json compile_options;  // passed to kiln-compile; its digest is part of the key
  std::string target = "cpu";      // "cpu" or "cuda:sm_<major><minor>"
  std::vector<Resolution> resolutions;  // image sizes served
  int clip_len = 77;   // CLIP tokens (text_encoder bucket)
  int text_len = 512;  // T5 tokens (text_encoder_2 and transformer buckets)
  int vae_scale = 8;   // image pixels per latent pixel
};

class KeyPolicy {
 public:
  explicit KeyPolicy(KeyPolicyOptions options) : options_(std::move(options)) {}

  // OK if a width×height image is one of the served resolutions and packs into 2×2 latent
  // patches (and, with sequence_parallel() P > 1, its patch rows and the text length divide by
  // P); InvalidArgument naming the resolution otherwise.
  absl::Status CheckResolution(int width, int height) const;
  // P of the compile option `sequence_parallel` (1 when absent or not a positive integer, which
  // PipelineOptions::Validate and kiln-compile refuse): the transformer's package set is then
  // one rank's of P (docs/multi_gpu.md), its bucket the rank's (BucketFor).
  int sequence_parallel() const;
  // Bucket fields `component`'s package depends on; must match component_bucket() in
  // pipeline/python/kiln/compile.py. A sequence-parallel transformer's is one rank's: height / P
  // (its rows/P patch rows) and text_len / P, as kiln-compile is asked for it. `batch`: images
  // per call of the transformer and the VAE decoder (a batch of jobs,
  // FluxPipeline::DenoiseDecodeBatch); the text encoders always run one prompt per call (batch
  // 1), so a batched job's embeddings are the job's own.
  cache::Bucket BucketFor(const std::string& component, int width, int height,
                          int batch = 1) const;
  // The artifact key of `component` for a width×height image (0×0 for the text encoders) at
  // `batch` images per call (BucketFor).
  cache::ArtifactKey KeyFor(const std::string& component, int width, int height,
                            int batch = 1) const;
  // Digests of every component's package for a width×height image, in FluxComponents() order.
  std::vector<std::string> DigestsFor(int width, int height) const;

  const KeyPolicyOptions& options() const { return options_; }

 private:
  KeyPolicyOptions options_;
};

}  // namespace kiln::pipeline
