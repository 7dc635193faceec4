// Makes a package that no cache tier holds. `SubprocessCompiler` runs the kiln-compile tool
// (pipeline/python/kiln/compile.py), which publishes ROOT/<digest>/ atomically.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "cache/artifact_key.h"
#include "nlohmann/json.hpp"

namespace kiln::cache {

struct CompileRequest {
  std::string model_dir;        // diffusers-layout model repository
  ArtifactKey key;              // what to build (component, precision, bucket, target)
  nlohmann::json compile_options;
  std::string out_root;         // package directory root
};

class PackageCompiler {
 public:
  virtual ~PackageCompiler() = default;
  // Builds and publishes the package for request.key under request.out_root. The compiler's own
  // digest of the key must equal request.key.Digest() (FailedPrecondition otherwise: the two
  // sides disagree about the toolchain or config).
  virtual absl::Status Compile(const CompileRequest& request) = 0;
};

class SubprocessCompiler : public PackageCompiler {
 public:
  explicit SubprocessCompiler(std::string kiln_compile_path)
      : path_(std::move(kiln_compile_path)) {}
  absl::Status Compile(const CompileRequest& request) override;

 private:
  std::string path_;
};

}  // namespace kiln::cache
