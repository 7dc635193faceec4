#include "pipeline/denoiser.h"

namespace kiln::pipeline {
TransformerFn TransformerOf(AotiPackage& package) {
  return [&package](const std::vector<at::Tensor>& inputs, void* stream) {
    return package.RunOn(inputs, stream);
  };
}

absl::Status PlainDenoiser::Prepare(const DenoiseConditioning& conditioning) {
  conditioning_ = conditioning;
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> PlainDenoiser::Velocity(const at::Tensor& latents,
                                                   const at::Tensor& timestep) {
  auto out = transformer_({latents.to(act_), conditioning_.text, conditioning_.pooled, timestep,
                          conditioning_.guidance},
                         nullptr);
  if (!out.ok()) return out.status();
  if (out->empty()) return absl::InternalError("transformer: returned no outputs");
  return (*out)[0];
}

absl::StatusOr<std::unique_ptr<CudaGraphDenoiser>> CudaGraphDenoiser::Capture(
    AotiPackage& transformer, at::ScalarType act, const DenoiseConditioning& conditioning,
    const at::Tensor& latents, const at::Tensor& timestep) {
  return Capture(transformer.device(), transformer.manifest().key.component,
                 TransformerOf(transformer), act, conditioning, latents, timestep);
}

absl::StatusOr<std::unique_ptr<CudaGraphDenoiser>> CudaGraphDenoiser::Capture(
    const c10::Device& device, const std::string& what, const TransformerFn& transformer,
    at::ScalarType act, const DenoiseConditioning& conditioning, const at::Tensor& latents,
    const at::Tensor& timestep) {
  auto graph = PackageGraph::Capture(
      device, what, transformer,
      {latents.to(act), conditioning.text, conditioning.pooled, timestep, conditioning.guidance});
  if (!graph.ok()) return graph.status();
  return std::unique_ptr<CudaGraphDenoiser>(new CudaGraphDenoiser(*std::move(graph)));
}

absl::Status CudaGraphDenoiser::Prepare(const DenoiseConditioning& conditioning) {
  graph_->inputs()[1].copy_(conditioning.text);
  graph_->inputs()[2].copy_(conditioning.pooled);
  graph_->inputs()[4].copy_(conditioning.guidance);
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> CudaGraphDenoiser::Velocity(const at::Tensor& latents,
                                                       const at::Tensor& timestep) {
  graph_->inputs()[0].copy_(latents);
  graph_->inputs()[3].copy_(timestep);
  auto outputs = graph_->Replay();
  if (!outputs.ok()) return outputs.status();
  if (outputs->empty()) return absl::InternalError("transformer: CUDA graph has no outputs");
  return (*outputs)[0];
}

absl::Status RunDenoiseLoop(Denoiser& denoiser, const DenoiseSchedule& schedule,
                            const at::Tensor& latents, const CancelToken* cancel,
                            const std::function<void(int step)>& on_step,
                            StepProfiler* profiler) {
  const int steps = static_cast<int>(schedule.sigmas.size()) - 1;
  const auto& sigmas = schedule.sigmas;
  const int64_t batch = latents.size(0);
  for (int i = 0; i < steps; ++i) {
    if (cancel != nullptr && cancel->cancelled()) return CancelledAfterStep(i, steps);
    if (profiler) profiler->BeginStep();
    auto v = denoiser.Velocity(latents, schedule.timesteps.select(0, i).narrow(0, 0, batch));
    if (!v.ok()) return v.status();
    latents.add_(v->to(at::kFloat), sigmas[i + 1] - sigmas[i]);
    if (profiler) profiler->EndStep();
    if (on_step) on_step(i + 1);
  }
  return absl::OkStatus();
}

}  // namespace kiln::pipeline
