#include "cache/artifact_key.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/hash.h"
#include "common/job_spec.h"
#include "common/status.h"

namespace kiln::cache {
namespace {

bool OneOf(const std::string& v, const std::vector<std::string>& allowed) {
  return std::find(allowed.begin(), allowed.end(), v) != allowed.end();
}

bool IsHexDigest(const std::string& s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

}  // namespace

// Errors are FieldErrors naming "artifact_key.<field>", like every other field error.
absl::Status ArtifactKey::Validate() const {
  if (!IsHexDigest(architecture))
    return InvalidField("artifact_key.architecture", "must be a sha256 hex digest");
  if (!OneOf(component, kComponents))
    return InvalidField("artifact_key.component", absl::StrCat("'", component, "' is not one of ",
                                                               absl::StrJoin(kComponents, ", ")));
  if (auto s = ValidatePrecision("artifact_key.precision", precision); !s.ok()) return s;
  if (bucket.batch < 1) return InvalidField("artifact_key.bucket.batch", "must be >= 1");
  if (bucket.height < 0 || bucket.width < 0 || bucket.text_len < 0)
    return InvalidField("artifact_key.bucket", "sizes must be >= 0");
  if (!IsHexDigest(compile))
    return InvalidField("artifact_key.compile", "must be a sha256 hex digest");
  if (target != "cpu" && !absl::StartsWith(target, "cuda:sm_"))
    return InvalidField("artifact_key.target",
                        absl::StrCat("'", target, "' is neither cpu nor cuda:sm_XX"));
  // The precision's needs (common/job_spec.h): fp8 needs a cuda target of sm_89 or newer.
  if (auto s = CheckDeviceRuns(precision, CapsOfDevice(target)); !s.ok()) {
    return InvalidField("artifact_key.precision",
                        absl::StrCat(s.message(), " (target ", target, ")"));
  }
  if (toolchain.torch.empty()) return InvalidField("artifact_key.toolchain.torch", "is empty");
  if (!IsHexDigest(toolchain.kiln)) {
    return InvalidField("artifact_key.toolchain.kiln",
                        "must be a sha256 hex digest (kiln's code revision)");
  }
  return absl::OkStatus();
}

nlohmann::json ArtifactKey::ToJson() const {
  return {
      {"architecture", architecture},
      {"component", component},
      {"precision", precision},
      {"bucket",
       {{"batch", bucket.batch},
        {"height", bucket.height},
        {"width", bucket.width},
        {"text_len", bucket.text_len}}},
      {"compile", compile},
      {"target", target},
      {"toolchain",
       {{"torch", toolchain.torch},
        {"cuda", toolchain.cuda},
        {"triton", toolchain.triton},
        {"kiln", toolchain.kiln}}},
  };
}

absl::StatusOr<ArtifactKey> ArtifactKey::FromJson(const nlohmann::json& j) {
  ArtifactKey k;
  try {
    k.architecture = j.at("architecture").get<std::string>();
    k.component = j.at("component").get<std::string>();
    k.precision = j.at("precision").get<std::string>();
    const auto& b = j.at("bucket");
    k.bucket.batch = b.at("batch").get<int>();
    k.bucket.height = b.at("height").get<int>();
    k.bucket.width = b.at("width").get<int>();
    k.bucket.text_len = b.at("text_len").get<int>();
    k.compile = j.at("compile").get<std::string>();
    k.target = j.at("target").get<std::string>();
    const auto& t = j.at("toolchain");
    k.toolchain.torch = t.at("torch").get<std::string>();
    k.toolchain.cuda = t.at("cuda").get<std::string>();
    k.toolchain.triton = t.at("triton").get<std::string>();
    // A key without it names a package compiled before keys carried kiln's code revision:
    // refused here, and never asked for (today's keys always carry one).
    k.toolchain.kiln = t.at("kiln").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    return InvalidField("artifact_key", e.what());
  }
  if (auto s = k.Validate(); !s.ok()) return s;
  return k;
}

std::string ArtifactKey::Digest() const { return Sha256Hex(CanonicalJson(ToJson())); }

std::string ArchitectureDigest(const nlohmann::json& config) {
  nlohmann::json kept = nlohmann::json::object();
  for (const auto& [k, v] : config.items()) {
    if (absl::StartsWith(k, "_") || k == "transformers_version" || k == "torch_dtype") continue;
    kept[k] = v;
  }
  return Sha256Hex(CanonicalJson(kept));
}

std::string CompileOptionsDigest(const nlohmann::json& options) {
  return Sha256Hex(CanonicalJson(options));
}

// Twin of kiln.artifact_key.default_compile_options (where the choice is explained).
nlohmann::json DefaultCompileOptions() {
  return {{"attention", "cudnn"}, {"max_autotune", false}};
}

}  // namespace kiln::cache
