// What `--version` prints, for every kiln executable: the kiln version, the git commit it was
// built from and the torch / CUDA it was built against. The values are baked in when CMake
// configures the build (CMakeLists.txt writes common/version_info.h into the build tree), so a
// commit made after configuring shows only after the next configure. Thread-safe (constants).
#pragma once

#include <string>

#include "absl/strings/string_view.h"

namespace kiln {

struct BuildInfo {
  std::string version;       // kiln's version, "0.1.0"
  std::string git_commit;    // short commit hash, "+dirty" when the tree had changes; "unknown"
  std::string torch;         // torch.__version__ of the build's PyTorch; "unknown"
  std::string cuda;          // torch.version.cuda, "none" for a CPU build
};

const BuildInfo& GetBuildInfo();

// "kiln-node 0.1.0 (git 1a2b3c4)\ntorch 2.5.1+cpu, CUDA none\n".
std::string VersionText(absl::string_view program);

}  // namespace kiln
