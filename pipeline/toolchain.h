// The toolchain this kiln build was made with (LibTorch-free, so the node and other components
// may include it). Part of every artifact key; checked against each package's metadata.
#pragma once

namespace kiln::pipeline {

// torch.__version__ of the build's Python, e.g. "2.13.0+cpu" (same wheel as the linked LibTorch);
// packages must have been compiled by the same version.
const char* BuildTorchVersion();
const char* BuildCudaVersion();    // "" for CPU builds
const char* BuildTritonVersion();  // "" when triton is not installed

}  // namespace kiln::pipeline
