#include "pipeline/cuda_graph.h"

#include <algorithm>
#include <exception>

#include "absl/strings/str_cat.h"
#include "pipeline/torch_error.h"

#ifdef KILN_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace kiln::pipeline {

#ifdef KILN_WITH_CUDA
struct PackageGraph::Impl {
  at::cuda::CUDAGraph graph;
  std::vector<at::Tensor> outputs;
};
bool CudaGraphsSupported() { return true; }
#else
struct PackageGraph::Impl {};
bool CudaGraphsSupported() { return false; }
#endif

PackageGraph::PackageGraph() : impl_(std::make_unique<Impl>()) {}
PackageGraph::~PackageGraph() = default;

absl::StatusOr<std::unique_ptr<PackageGraph>> PackageGraph::Capture(
    AotiPackage* package, const std::vector<at::Tensor>& example_inputs) {
  return Capture(
      package->device(), package->manifest().key.component,
      [package](const std::vector<at::Tensor>& inputs, void* stream) {
        return package->RunOn(inputs, stream);
      },
      example_inputs);
}

absl::StatusOr<std::unique_ptr<PackageGraph>> PackageGraph::Capture(
    const c10::Device& device, const std::string& what, const GraphRunFn& run,
    const std::vector<at::Tensor>& example_inputs) {
  if (!device.is_cuda()) {
    return absl::FailedPreconditionError(absl::StrCat(what, ": CUDA graphs need a CUDA package"));
  }
#ifndef KILN_WITH_CUDA
  return absl::UnimplementedError("this kiln build links a LibTorch without CUDA");
#else
  std::unique_ptr<PackageGraph> g(new PackageGraph());
  const c10::DeviceIndex index = device.index();
  try {
    for (const auto& t : example_inputs) g->inputs_.push_back(t.clone());
    auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index);
    // The static inputs were written on the current stream: the side stream must see them.
    at::cuda::CUDAEvent inputs_ready;
    inputs_ready.record(c10::cuda::getCurrentCUDAStream(index));
    inputs_ready.block(side);
    {
      c10::cuda::CUDAStreamGuard guard(side);
      // Warm-up: the runtime loads its kernels (and libraries pick algorithms) on first use.
      auto warm = run(g->inputs_, side.stream());
      if (!warm.ok()) return warm.status();
      side.synchronize();
      g->impl_->graph.capture_begin();
      auto captured = run(g->inputs_, side.stream());
      g->impl_->graph.capture_end();
      if (!captured.ok()) return captured.status();
      g->impl_->outputs = *std::move(captured);
    }
    // Later work on the current stream (the first replay) follows the capture stream's work.
    at::cuda::CUDAEvent captured;
    captured.record(side);
    captured.block(c10::cuda::getCurrentCUDAStream(index));
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat(what, ": CUDA graph capture failed: ", ExceptionMessage(e)));
  }
  return g;
#endif
}

absl::StatusOr<std::vector<at::Tensor>> PackageGraph::Replay() {
#ifndef KILN_WITH_CUDA
  return absl::UnimplementedError("this kiln build links a LibTorch without CUDA");
#else
  try {
    impl_->graph.replay();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("CUDA graph replay failed: ", ExceptionMessage(e)));
  }
  return impl_->outputs;
#endif
}

#ifdef KILN_WITH_CUDA
struct StepProfiler::Impl {
  bool active = false;  // CUDA device
  bool armed = false;
  c10::cuda::SyncDebugMode previous = c10::cuda::SyncDebugMode::L_DISABLED;
  c10::DeviceIndex index = 0;
  std::vector<std::unique_ptr<at::cuda::CUDAEvent>> begins, ends;
};

StepProfiler::StepProfiler(const c10::Device& device) : impl_(std::make_unique<Impl>()) {
  if (!device.is_cuda()) return;
  impl_->active = true;
  impl_->index = device.has_index() ? device.index() : 0;
  impl_->previous = c10::cuda::warning_state().get_sync_debug_mode();
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
  impl_->armed = true;
}

StepProfiler::~StepProfiler() { Disarm(); }

void StepProfiler::Disarm() {
  if (!impl_->armed) return;
  c10::cuda::warning_state().set_sync_debug_mode(impl_->previous);
  impl_->armed = false;
}

void StepProfiler::BeginStep() {
  if (!impl_->active) return;
  impl_->begins.push_back(std::make_unique<at::cuda::CUDAEvent>(cudaEventDefault));
  impl_->begins.back()->record(c10::cuda::getCurrentCUDAStream(impl_->index));
}

void StepProfiler::EndStep() {
  if (!impl_->active) return;
  impl_->ends.push_back(std::make_unique<at::cuda::CUDAEvent>(cudaEventDefault));
  impl_->ends.back()->record(c10::cuda::getCurrentCUDAStream(impl_->index));
}

StepProfiler::Result StepProfiler::Finish() {
  Disarm();
  Result r;
  if (!impl_->active || impl_->begins.empty() || impl_->begins.size() != impl_->ends.size()) {
    return r;
  }
  r.sync_checked = true;
  double busy = 0;
  for (size_t i = 0; i < impl_->begins.size(); ++i) {
    impl_->ends[i]->synchronize();
    r.step_ms.push_back(impl_->begins[i]->elapsed_time(*impl_->ends[i]));
    busy += r.step_ms.back();
  }
  r.span_ms = impl_->begins.front()->elapsed_time(*impl_->ends.back());
  r.idle_fraction = r.span_ms > 0 ? std::max(0.0, 1.0 - busy / r.span_ms) : 0.0;
  return r;
}
#else
struct StepProfiler::Impl {};
StepProfiler::StepProfiler(const c10::Device&) : impl_(std::make_unique<Impl>()) {}
StepProfiler::~StepProfiler() = default;
void StepProfiler::Disarm() {}
void StepProfiler::BeginStep() {}
void StepProfiler::EndStep() {}
StepProfiler::Result StepProfiler::Finish() { return {}; }
#endif

}  // namespace kiln::pipeline
