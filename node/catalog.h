// What a node serves and how a job's spec becomes a pipeline request.
//
// A `Generator` is one model at one precision (FluxPipeline in production, a fake in tests). The
// `ModelCatalog` holds one per served (model, precision), the allowed resolutions and the
// default precision, and turns a wire JobSpec into a `JobPlan` — or an InvalidArgument whose
// message starts with the offending field ("spec.width: ..."), so a bad job is answered with a
// clear error result instead of reaching the pipeline.
//
// Threads: the catalog's structure is fixed after construction; Plan(), PackageSets() and the
// accessors may be called from any thread. A Generator's stages belong to the worker's threads
// (one EncodePrompt and one DenoiseDecode or DenoiseDecodeBatch at a time); DigestsFor() and
// LoadedDigests() are thread-safe.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/proto/kiln.pb.h"
#include "common/status.h"
#include "pipeline/flux_pipeline.h"

namespace kiln::node {

class Generator {
 public:
  virtual ~Generator() = default;
  // Runs one job; `progress` as pipeline::ProgressFn.
  virtual absl::StatusOr<pipeline::GenerateResult> Generate(
      const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) = 0;
  // The job in two stages, as FluxPipeline::EncodePrompt / DenoiseDecode: the worker encodes
  // the next job on one thread while the current one denoises on another (one call of each at
  // a time). The defaults do no work in the first stage and Generate() in the second.
  virtual absl::StatusOr<pipeline::EncodedPrompt> EncodePrompt(
      const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) {
    (void)progress;
    pipeline::EncodedPrompt encoded;
    encoded.request = request;
    return encoded;
  }
  virtual absl::StatusOr<pipeline::GenerateResult> DenoiseDecode(
      pipeline::EncodedPrompt encoded, const pipeline::ProgressFn& progress) {
    return Generate(encoded.request, progress);
  }
  // The second stage of several pipeline::BatchCompatible jobs at once, as
  // FluxPipeline::DenoiseDecodeBatch: one result per job, in order; `progress` one per job. The
  // default runs each job's DenoiseDecode in turn.
  virtual std::vector<absl::StatusOr<pipeline::GenerateResult>> DenoiseDecodeBatch(
      std::vector<pipeline::EncodedPrompt> encoded,
      const std::vector<pipeline::ProgressFn>& progress) {
    std::vector<absl::StatusOr<pipeline::GenerateResult>> out;
    for (size_t i = 0; i < encoded.size(); ++i) {
      out.push_back(DenoiseDecode(std::move(encoded[i]),
                                  i < progress.size() ? progress[i] : nullptr));
    }
    return out;
  }
  // Digests of the packages a job of this size needs. Cheap, thread-safe.
  virtual std::vector<std::string> DigestsFor(int width, int height) const = 0;
  // Digests of the packages loaded now. Thread-safe.
  virtual std::vector<std::string> LoadedDigests() const = 0;
  // LoraSetKey of the LoRA set its weights hold now ("" = base). Thread-safe.
  virtual std::string AppliedLoras() const { return ""; }
  // Names of the LoRAs it can apply (its LoRA directories). Any thread.
  virtual std::vector<std::string> AvailableLoras() const { return {}; }
  // OK while it can run jobs; not OK once it can run none until the node restarts (a multi-GPU
  // node's rank group whose collective failed: Unavailable naming the group and the failure).
  // Thread-safe.
  virtual absl::Status Health() const { return absl::OkStatus(); }
};

// A Generator over a FluxPipeline (created by the caller; FluxPipeline::Create reads configs and
// tokenizers only, weights and packages load on the first Generate()).
class PipelineGenerator : public Generator {
 public:
  explicit PipelineGenerator(std::unique_ptr<pipeline::FluxPipeline> pipeline)
      : pipeline_(std::move(pipeline)) {}
  absl::StatusOr<pipeline::GenerateResult> Generate(
      const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) override {
    return pipeline_->Generate(request, progress);
  }
  absl::StatusOr<pipeline::EncodedPrompt> EncodePrompt(
      const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) override {
    return pipeline_->EncodePrompt(request, progress);
  }
  absl::StatusOr<pipeline::GenerateResult> DenoiseDecode(
      pipeline::EncodedPrompt encoded, const pipeline::ProgressFn& progress) override {
    return pipeline_->DenoiseDecode(std::move(encoded), progress);
  }
  std::vector<absl::StatusOr<pipeline::GenerateResult>> DenoiseDecodeBatch(
      std::vector<pipeline::EncodedPrompt> encoded,
      const std::vector<pipeline::ProgressFn>& progress) override {
    return pipeline_->DenoiseDecodeBatch(std::move(encoded), progress);
  }
  std::vector<std::string> DigestsFor(int width, int height) const override {
    return pipeline_->DigestsFor(width, height);
  }
  std::vector<std::string> LoadedDigests() const override { return pipeline_->LoadedDigests(); }
  std::string AppliedLoras() const override { return pipeline_->applied_loras(); }
  std::vector<std::string> AvailableLoras() const override { return pipeline_->AvailableLoras(); }

 private:
  std::unique_ptr<pipeline::FluxPipeline> pipeline_;
};

// A job ready for the worker.
struct JobPlan {
  Generator* generator = nullptr;  // owned by the catalog
  std::string model;
  std::string precision;  // resolved: never ""
  pipeline::GenerateRequest request;
};

class ModelCatalog {
 public:
  // `default_precision`: for jobs whose spec.precision is "".
  ModelCatalog(std::string default_precision, std::vector<pipeline::Resolution> resolutions)
      : default_precision_(std::move(default_precision)), resolutions_(std::move(resolutions)) {}

  void Add(const std::string& model, const std::string& precision,
           std::unique_ptr<Generator> generator);

  // Checks `spec` and maps it: guidance 0 → 3.5 (the model default), precision "" → the default
  // precision. The spec's own rules are the shared ones (kiln::ValidateJobSpec, as the
  // coordinator checks them); on top, only what this node serves: the model, the precision and
  // the size (one of resolutions()). Errors are InvalidArgument FieldErrors naming the field
  // ("spec.width: ..."). Deadlines are checked when the job starts (the worker), not here.
  absl::StatusOr<JobPlan> Plan(const kiln::v1::JobSpec& spec) const;

  // "<model>/<precision>/<W>x<H>" → digests, for every served model × precision × resolution.
  std::map<std::string, std::vector<std::string>> PackageSets() const;

  std::vector<std::string> models() const;  // sorted
  std::vector<Generator*> generators() const;
  // "<model>/<precision>" → its generator (the key of NodeInfo.applied_loras).
  std::map<std::string, Generator*> GeneratorsByKey() const;
  // The generators whose Health() is not OK, by model then precision. Any thread.
  struct Unhealthy {
    std::string model;
    std::string precision;
    absl::Status health;
  };
  std::vector<Unhealthy> UnhealthyGenerators() const;
  // LoRA names any generator can apply, sorted, unique.
  std::vector<std::string> AvailableLoras() const;
  const std::string& default_precision() const { return default_precision_; }
  const std::vector<pipeline::Resolution>& resolutions() const { return resolutions_; }

 private:
  std::string default_precision_;
  std::vector<pipeline::Resolution> resolutions_;
  // model → precision → generator.
  std::map<std::string, std::map<std::string, std::unique_ptr<Generator>>> generators_;
};

}  // namespace kiln::node
