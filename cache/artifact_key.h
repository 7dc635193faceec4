// The artifact key: what a compiled package depends on (docs/architecture.md, "The artifact key").
// Its canonical JSON is hashed with SHA-256 to address the package in every cache tier. The Python
// side (pipeline/python/kiln/artifact_key.py, used by kiln-compile) computes the same digest; a
// cross-language test keeps the two in step.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/job_spec.h"
#include "nlohmann/json.hpp"

namespace kiln::cache {

// Static input shape a package is compiled for. Zero means "not an input of this component"
// (text encoders have no image size, the VAE decoder no text length).
struct Bucket {
  int batch = 1;     // images per call
  int height = 0;    // image pixels
  int width = 0;     // image pixels
  int text_len = 0;  // tokens
  bool operator==(const Bucket& o) const {
    return batch == o.batch && height == o.height && width == o.width && text_len == o.text_len;
  }
};

// Versions of what generated and compiled the package's code. Empty string = not used.
struct Toolchain {
  std::string torch;   // torch.__version__, e.g. "2.13.0+cpu"
  std::string cuda;    // torch.version.cuda, "" on CPU builds
  std::string triton;  // triton.__version__, "" for CPU targets
  // Code revision of the kiln Python package that builds the graphs (models, export, compile:
  // kiln.artifact_key.code_revision), a SHA-256 hex digest; never empty. Keys made by this
  // binary carry BuildKilnRevision().
  std::string kiln;
};

// The code revision of pipeline/python/kiln this binary was built from: computed from those
// sources at build time (cache/code_revision.cmake, re-run by the build whenever one of them
// changes, appears or goes), so a node that only consumes packages has it too.
// kiln.artifact_key.code_revision is the Python twin; SubprocessCompiler refuses a kiln-compile
// whose revision differs.
const char* BuildKilnRevision();

struct ArtifactKey {
  std::string architecture;  // ArchitectureDigest() of the component's config.json
  std::string component;     // one of kComponents
  std::string precision;     // one of kPrecisions
  Bucket bucket;
  std::string compile;  // CompileOptionsDigest() of the compile options
  std::string target;   // "cpu" or "cuda:sm_<major><minor>", e.g. "cuda:sm_90"
  Toolchain toolchain;

  // InvalidArgument naming the bad field ("artifact_key.precision: ..."), also for a precision
  // the target cannot run (fp8 on cpu or below sm_89).
  absl::Status Validate() const;
  nlohmann::json ToJson() const;
  static absl::StatusOr<ArtifactKey> FromJson(const nlohmann::json& j);
  // Lower-case hex SHA-256 of CanonicalJson(ToJson()): the cache address.
  std::string Digest() const;
};

// Components, named as the diffusers repository folders their weights come from.
inline const std::vector<std::string> kComponents = {"text_encoder", "text_encoder_2",
                                                     "transformer", "vae_decoder"};
// Compute precisions (common/job_spec.h): fp32, bf16, fp8 (e4m3 linears, bf16 activations;
// CUDA sm_89+ only).
using kiln::kPrecisions;

// Digest of a component config with the keys that do not change the computation removed
// (keys starting with "_", "transformers_version", "torch_dtype").
std::string ArchitectureDigest(const nlohmann::json& config);

// Digest of the compile options object passed to kiln-compile (--compile-options).
std::string CompileOptionsDigest(const nlohmann::json& options);

// The compile options kiln uses unless told otherwise.
nlohmann::json DefaultCompileOptions();

}  // namespace kiln::cache
