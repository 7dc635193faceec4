// PackageGraph: one run of an AOTI package captured as a CUDA graph and replayed.
//
// The denoise loop calls the transformer with the same shapes every step, so the package's
// ~1,500 kernel launches per step are captured once and replayed as one graph launch. Capture
// happens on a side stream with the package in single-threaded mode (AotiPackage::RunOn): one
// eager warm-up run (the runtime loads its kernels lazily), a device sync (once, at capture), then
// the captured run, whose intermediates and output live in the graph's private memory pool.
//
// Inputs are static buffers: copy each step's values into inputs()[i] (on the current stream)
// before Replay(); Replay() launches the graph on the current stream and returns the static
// output, overwritten by the next replay. Built only where LibTorch has CUDA; elsewhere Capture()
// is Unimplemented and callers run the package directly.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "pipeline/aoti_package.h"

namespace kiln::pipeline {

// One run of what is captured: `inputs` → outputs, its kernels launched on `cuda_stream` (a
// cudaStream_t, the capture stream; LibTorch's current stream is the same one while capturing).
// AotiPackage::RunOn for one package; RegionalTransformer::RunOn for a regional set's loop over
// layers (several packages and a concatenation, captured as one graph).
using GraphRunFn = std::function<absl::StatusOr<std::vector<at::Tensor>>(
    const std::vector<at::Tensor>& inputs, void* cuda_stream)>;

class PackageGraph {
 public:
  // Captures `package` (loaded, constants loaded, on a CUDA device) on static copies of
  // `example_inputs`. FailedPrecondition on a CPU package; Internal if capture fails (the caller
  // may fall back to eager runs).
  static absl::StatusOr<std::unique_ptr<PackageGraph>> Capture(
      AotiPackage* package, const std::vector<at::Tensor>& example_inputs);
  // The same for any run function on `device`; `what` names it in errors. Everything `run` reads
  // besides its inputs (weights) must keep its address for the life of the graph.
  static absl::StatusOr<std::unique_ptr<PackageGraph>> Capture(
      const c10::Device& device, const std::string& what, const GraphRunFn& run,
      const std::vector<at::Tensor>& example_inputs);
  ~PackageGraph();

  std::vector<at::Tensor>& inputs() { return inputs_; }
  // Launches the graph on the current CUDA stream; returns the static outputs.
  absl::StatusOr<std::vector<at::Tensor>> Replay();

 private:
  struct Impl;
  PackageGraph();
  std::unique_ptr<Impl> impl_;
  std::vector<at::Tensor> inputs_;
};

// True where this build can capture CUDA graphs (LibTorch with CUDA).
bool CudaGraphsSupported();

// Proof that a loop keeps the GPU fed: device events around each step (recorded on the current
// stream, read only after the loop), and LibTorch's synchronization check set to "error" while
// armed, so any host sync that goes through LibTorch inside the loop throws. On a CPU device, or
// without CUDA, it does nothing and Finish() reports no steps.
class StepProfiler {
 public:
  struct Result {
    std::vector<double> step_ms;  // device time of each step
    double span_ms = 0;           // first step's start to last step's end
    double idle_fraction = 0;     // 1 - sum(step_ms) / span_ms
    bool sync_checked = false;    // the check was armed around the steps
  };
  explicit StepProfiler(const c10::Device& device);  // arms the sync check
  ~StepProfiler();                                    // disarms it if still armed
  void BeginStep();
  void EndStep();
  // Disarms the sync check; call after the loop, before the caller's own device sync.
  void Disarm();
  // Reads the events; call after the device has finished the steps.
  Result Finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kiln::pipeline
