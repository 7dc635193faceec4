// libFuzzer target: the manifest and canonical JSON readers. The input is one JSON document, read
// as the cache and pipeline read their files: ReadJsonFile (pipeline/json_file.h),
// PackageManifest::FromFile / FromJson and ArtifactKey::FromJson (cache/), and written back with
// CanonicalJson (common/hash.h). Bad documents must give a Status; canonical JSON must be a fixed
// point (parse(CanonicalJson(v)) writes the same bytes again), and a key that parses must parse
// again from its own ToJson() to the same digest.
#include <cstdint>
#include <string>
#include <string_view>

#include "cache/artifact_key.h"
#include "cache/package.h"
#include "common/hash.h"
#include "nlohmann/json.hpp"
#include "pipeline/json_file.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static kiln::fuzz::MemFile* file = new kiln::fuzz::MemFile();
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const std::string& path = file->Write(text);

  auto manifest = kiln::cache::PackageManifest::FromFile(path);
  if (!manifest.ok()) FUZZ_CHECK(absl::IsDataLoss(manifest.status()));

  auto doc = kiln::pipeline::ReadJsonFile(path);
  if (!doc.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(doc.status()));
    return 0;
  }
  const nlohmann::json& j = *doc;

  const std::string canonical = kiln::CanonicalJson(j);
  const auto reparsed = nlohmann::json::parse(canonical, nullptr, /*allow_exceptions=*/false);
  FUZZ_CHECK(!reparsed.is_discarded());
  FUZZ_CHECK(kiln::CanonicalJson(reparsed) == canonical);

  auto key = kiln::cache::ArtifactKey::FromJson(j);
  if (key.ok()) {
    auto again = kiln::cache::ArtifactKey::FromJson(key->ToJson());
    FUZZ_CHECK(again.ok());
    FUZZ_CHECK(again->Digest() == key->Digest());
  } else {
    FUZZ_CHECK(absl::IsInvalidArgument(key.status()));
  }
  if (j.is_object() && j.contains("config")) (void)kiln::cache::ArchitectureDigest(j["config"]);
  if (j.is_object() && j.contains("options")) (void)kiln::cache::CompileOptionsDigest(j["options"]);

  auto m = kiln::cache::PackageManifest::FromJson(j);
  FUZZ_CHECK(m.ok() == manifest.ok());
  if (!m.ok()) FUZZ_CHECK(absl::IsInvalidArgument(m.status()));
  return 0;
}
