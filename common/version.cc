#include "common/version.h"

#include "absl/strings/str_cat.h"
#include "common/version_info.h"

namespace kiln {

const BuildInfo& GetBuildInfo() {
  static const BuildInfo* info =
      new BuildInfo{KILN_VERSION, KILN_GIT_COMMIT, KILN_TORCH_VERSION, KILN_CUDA_VERSION};
  return *info;
}

std::string VersionText(absl::string_view program) {
  const BuildInfo& info = GetBuildInfo();
  return absl::StrCat(program, " ", info.version, " (git ", info.git_commit, ")\ntorch ",
                      info.torch, ", CUDA ", info.cuda, "\n");
}

}  // namespace kiln
