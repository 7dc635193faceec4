#include "cache/compiler.h"

#include "absl/strings/str_cat.h"
#include "common/hash.h"
#include "common/log.h"
#include "common/subprocess.h"

namespace kiln::cache {
namespace {

std::string Tail(const std::string& s, size_t n) {
  return s.size() <= n ? s : "..." + s.substr(s.size() - n);
}

}  // namespace

absl::Status SubprocessCompiler::Compile(const CompileRequest& r) {
  const Bucket& b = r.key.bucket;
  std::vector<std::string> argv = {
      path_,          "--model",     r.model_dir,
      "--component",  r.key.component, "--precision",
      r.key.precision, "--batch",    std::to_string(b.batch),
      "--height",     std::to_string(b.height), "--width",
      std::to_string(b.width), "--text-len", std::to_string(b.text_len),
      "--target",     r.key.target,  "--compile-options",
      CanonicalJson(r.compile_options), "--out-root", r.out_root};
  auto result = RunProcess(argv, /*echo_stderr=*/false);
  if (!result.ok()) return result.status();
  if (result->exit_code == 3 || result->exit_code == 4) {
    // The package directory is full (3) or unwritable (4): one line for the caller, the whole
    // output for this process's log.
    kiln::LogWarning("cache", absl::StrCat("kiln-compile for ", r.key.component, ": ",
                                           result->stderr_text));
    std::string last = result->stderr_text;
    while (!last.empty() && last.back() == '\n') last.pop_back();
    last = last.substr(last.rfind('\n') == std::string::npos ? 0 : last.rfind('\n') + 1);
    return result->exit_code == 3 ? absl::ResourceExhaustedError(last)
                                  : absl::UnavailableError(last);
  }
  if (result->exit_code != 0) {
    auto msg = absl::StrCat("kiln-compile failed for ", r.key.component, " (exit ",
                            result->exit_code, "): ", Tail(result->stderr_text, 2000));
    return result->exit_code == 2 ? absl::InvalidArgumentError(msg) : absl::InternalError(msg);
  }
  nlohmann::json manifest = nlohmann::json::parse(result->stdout_text, nullptr, false);
  if (manifest.is_discarded() || !manifest.contains("digest")) {
    return absl::InternalError(absl::StrCat("kiln-compile printed no manifest: ",
                                            Tail(result->stdout_text, 500)));
  }
  const std::string theirs = manifest["digest"].get<std::string>();
  if (theirs != r.key.Digest()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "kiln-compile built key ", theirs, " but the runtime asked for ", r.key.Digest(),
        ": toolchain or config mismatch between the C++ runtime and the Python compiler; theirs: ",
        manifest.value("key", nlohmann::json()).dump(), " ours: ", r.key.ToJson().dump()));
  }
  return absl::OkStatus();
}

}  // namespace kiln::cache
