// CancelToken: how another thread stops a running FluxPipeline::Generate(). The owner (the node's
// worker) sets it; Generate() checks it at phase boundaries and between denoising steps and then
// returns CancelledError naming the step it stopped after. A step in flight is never interrupted.
// Thread-safe: Cancel()/Reset() from any thread, cancelled() from the generating thread.
#pragma once

#include <atomic>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kiln::pipeline {

class CancelToken {
 public:
  void Cancel() { cancelled_.store(true, std::memory_order_relaxed); }
  void Reset() { cancelled_.store(false, std::memory_order_relaxed); }
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }

 private:
  std::atomic<bool> cancelled_{false};
};

// The status of a Generate() stopped by its token after `step` of `total` denoising steps.
inline absl::Status CancelledAfterStep(int step, int total) {
  return absl::CancelledError(absl::StrCat("cancelled after step ", step, " of ", total));
}

}  // namespace kiln::pipeline
