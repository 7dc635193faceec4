// Stand-ins for the LibTorch half of kiln::pipeline in the fuzz build (tests/fuzz/CMakeLists.txt):
// the toolchain names that node/ objects reference. Never part of a real binary.
#include "pipeline/toolchain.h"

namespace kiln::pipeline {
const char* BuildTorchVersion() { return "fuzz"; }
const char* BuildCudaVersion() { return ""; }
const char* BuildTritonVersion() { return ""; }
}  // namespace kiln::pipeline
