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

std::string LastLine(std::string s) {
  while (!s.empty() && s.back() == '\n') s.pop_back();
  const size_t nl = s.rfind('\n');
  return nl == std::string::npos ? s : s.substr(nl + 1);
}

// toolchain.kiln of the key in a manifest kiln-compile printed; "(none)" where it has none (a
// kiln-compile older than the field).
std::string ManifestKilnRevision(const nlohmann::json& manifest) {
  const nlohmann::json::json_pointer at("/key/toolchain/kiln");
  if (!manifest.contains(at) || !manifest.at(at).is_string()) return "(none)";
  return manifest.at(at).get<std::string>();
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
      CanonicalJson(r.compile_options), "--out-root", r.out_root,
      // kiln-compile refuses (exit 5) unless it runs the code this key names.
      "--kiln-revision", r.key.toolchain.kiln};
  auto result = RunProcess(argv, /*echo_stderr=*/false);
  if (!result.ok()) return result.status();
  if (result->exit_code == 5) {
    // The key's code revision is not the one kiln-compile runs: its one line names both.
    return absl::FailedPreconditionError(absl::StrCat(
        LastLine(result->stderr_text), " (", path_, ", compiling ", r.key.component, ")"));
  }
  if (result->exit_code == 3 || result->exit_code == 4) {
    // The package directory is full (3) or unwritable (4): one line for the caller, the whole
    // output for this process's log.
    kiln::LogWarning("cache", absl::StrCat("kiln-compile for ", r.key.component, ": ",
                                           result->stderr_text));
    const std::string last = LastLine(result->stderr_text);
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
  // A kiln-compile that ignored --kiln-revision: name the two revisions before anything else.
  const std::string their_kiln = ManifestKilnRevision(manifest);
  if (theirs != r.key.Digest() && their_kiln != r.key.toolchain.kiln) {
    return absl::FailedPreconditionError(absl::StrCat(
        "code revision mismatch: kiln-compile (", path_, ") built ", r.key.component,
        " from kiln code revision ", their_kiln, ", this binary was built from kiln code revision ",
        r.key.toolchain.kiln, "; the binary and the Python package come from different checkouts"));
  }
  if (theirs != r.key.Digest()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "kiln-compile built key ", theirs, " but the runtime asked for ", r.key.Digest(),
        ": toolchain or config mismatch between the C++ runtime and the Python compiler; theirs: ",
        manifest.value("key", nlohmann::json()).dump(), " ours: ", r.key.ToJson().dump()));
  }
  return absl::OkStatus();
}

}  // namespace kiln::cache
