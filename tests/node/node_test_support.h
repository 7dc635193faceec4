// Fakes shared by the node tests: a Generator that reports progress like FluxPipeline (phase
// events, one "denoising" event per step) in the same two stages (EncodePrompt, DenoiseDecode;
// batches run job by job and are recorded),
// stops at its request's cancel token between steps as FluxPipeline does, and returns a small
// image, with hooks to slow steps down, fail, or wait for the test at a given step or encoding.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "node/catalog.h"

namespace kiln::node::testing {

class FakeGenerator : public Generator {
 public:
  explicit FakeGenerator(std::string tag = "m") : tag_(std::move(tag)) {}

  absl::StatusOr<pipeline::GenerateResult> Generate(
      const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) override {
    auto encoded = EncodePrompt(request, progress);
    if (!encoded.ok()) return encoded.status();
    return DenoiseDecode(*std::move(encoded), progress);
  }
  // The first stage (the worker's encode thread): "preparing", "text_encoding"; `on_encode`
  // runs between the two.
  absl::StatusOr<pipeline::EncodedPrompt> EncodePrompt(
      const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) override {
    encode_calls++;
    if (progress) progress("preparing", 0, request.steps);
    if (on_encode) on_encode(request);
    if (request.cancel != nullptr && request.cancel->cancelled()) {
      return pipeline::CancelledAfterStep(0, request.steps);
    }
    if (progress) progress("text_encoding", 0, request.steps);
    pipeline::EncodedPrompt encoded;
    encoded.request = request;
    return encoded;
  }
  // The second stage (the worker's denoise thread).
  absl::StatusOr<pipeline::GenerateResult> DenoiseDecode(
      pipeline::EncodedPrompt encoded, const pipeline::ProgressFn& progress) override {
    const pipeline::GenerateRequest& request = encoded.request;
    calls++;
    last_request = request;
    if (!fail.ok()) return fail;
    pipeline::GenerateResult r;
    const bool cold = !loaded_;
    if (progress) progress("denoising", 0, request.steps);
    auto cancelled = [&] { return request.cancel != nullptr && request.cancel->cancelled(); };
    for (int i = 0; i < request.steps; ++i) {
      if (cancelled()) return pipeline::CancelledAfterStep(i, request.steps);
      if (on_step) on_step(i + 1);
      std::this_thread::sleep_for(step_time);
      if (progress) progress("denoising", i + 1, request.steps);
    }
    if (cancelled()) return pipeline::CancelledAfterStep(request.steps, request.steps);
    if (progress) progress("decoding", request.steps, request.steps);
    loaded_ = true;
    r.width = request.width;
    r.height = request.height;
    r.rgb.assign(static_cast<size_t>(request.width) * request.height * 3,
                 static_cast<uint8_t>(request.seed));
    if (cold) {
      r.seconds.weights = 0.5;
      r.seconds.package_load = 0.25;
      r.seconds.fetch = 0.125;
      r.seconds.compile = 2;
    }
    r.seconds.total = 3;
    for (const char* c : {"text_encoder", "text_encoder_2", "transformer", "vae_decoder"}) {
      r.packages[c] = cold ? "local" : "resident";
    }
    r.packages["transformer"] = cold ? "compiled" : "resident";
    // LoRAs as the pipeline reports them: the set merged, and whether this job switched it.
    const std::string set = kiln::LoraSetKey(request.loras);
    absl::MutexLock lock(&applied_mu_);
    r.lora_switched = set != applied_;
    if (r.lora_switched) {
      r.seconds.lora_prepare = 0.25;
      r.seconds.lora_switch = 0.0625;
    }
    applied_ = r.loras = set;
    return r;
  }
  // Records the batch's size, then as Generator's default: each job's DenoiseDecode in turn.
  std::vector<absl::StatusOr<pipeline::GenerateResult>> DenoiseDecodeBatch(
      std::vector<pipeline::EncodedPrompt> encoded,
      const std::vector<pipeline::ProgressFn>& progress) override {
    {
      absl::MutexLock lock(&batches_mu_);
      batches_.push_back(static_cast<int>(encoded.size()));
    }
    return Generator::DenoiseDecodeBatch(std::move(encoded), progress);
  }
  // The size of every DenoiseDecodeBatch call so far, in order.
  std::vector<int> batches() const {
    absl::MutexLock lock(&batches_mu_);
    return batches_;
  }
  std::string AppliedLoras() const override {
    absl::MutexLock lock(&applied_mu_);
    return applied_;
  }
  std::vector<std::string> AvailableLoras() const override { return available_loras; }
  std::vector<std::string> DigestsFor(int width, int height) const override {
    return {absl::StrCat(tag_, "-te-", width, "x", height),
            absl::StrCat(tag_, "-dit-", width, "x", height)};
  }
  std::vector<std::string> LoadedDigests() const override {
    if (!loaded_) return {};
    return {absl::StrCat(tag_, "-loaded")};
  }

  std::atomic<int> calls{0};         // DenoiseDecode calls
  std::atomic<int> encode_calls{0};  // EncodePrompt calls
  pipeline::GenerateRequest last_request;
  absl::Status fail = absl::OkStatus();
  std::chrono::milliseconds step_time{0};
  std::function<void(int step)> on_step;  // called before each step runs (denoise thread)
  // Called in EncodePrompt after "preparing" (encode thread); a cancel set there is honoured.
  std::function<void(const pipeline::GenerateRequest&)> on_encode;
  std::vector<std::string> available_loras;

 private:
  std::string tag_;
  std::atomic<bool> loaded_{false};
  mutable absl::Mutex batches_mu_;
  std::vector<int> batches_ ABSL_GUARDED_BY(batches_mu_);
  mutable absl::Mutex applied_mu_;
  std::string applied_ ABSL_GUARDED_BY(applied_mu_);  // the LoRA set merged
};

}  // namespace kiln::node::testing
