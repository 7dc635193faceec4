#include "cache/package.h"

#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kiln::cache {
namespace {

absl::StatusOr<std::vector<TensorSpec>> ParseSpecs(const nlohmann::json& list) {
  std::vector<TensorSpec> out;
  for (const auto& e : list) {
    TensorSpec s;
    s.name = e.at("name").get<std::string>();
    s.shape = e.at("shape").get<std::vector<int64_t>>();
    s.dtype = e.at("dtype").get<std::string>();
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace

absl::StatusOr<PackageManifest> PackageManifest::FromJson(const nlohmann::json& j) {
  PackageManifest m;
  try {
    if (j.at("format").get<int>() != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("manifest: format ", j.at("format").dump(), " is not supported (want 1)"));
    }
    auto key = ArtifactKey::FromJson(j.at("key"));
    if (!key.ok()) return key.status();
    m.key = *key;
    m.digest = j.at("digest").get<std::string>();
    m.layout = j.value("layout", "whole");
    if (m.layout == "regional") {
      for (const auto& [region, entry] : j.at("regions").items()) {
        const auto& pkg = entry.at("package");
        m.region_packages.push_back({region, pkg.at("file").get<std::string>(),
                                     pkg.at("sha256").get<std::string>(),
                                     pkg.at("bytes").get<int64_t>()});
      }
      if (m.region_packages.empty()) {
        return absl::InvalidArgumentError("manifest: a regional set without regions");
      }
    } else if (m.layout == "whole") {
      const auto& pkg = j.at("package");
      m.package_file = pkg.at("file").get<std::string>();
      m.package_sha256 = pkg.at("sha256").get<std::string>();
      m.package_bytes = pkg.at("bytes").get<int64_t>();
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("manifest: layout '", m.layout, "' (expected whole or regional)"));
    }
    m.extra_constants = j.value("extra_constants", "");
    for (const auto& [fqn, c] : j.at("constants").items()) {
      ConstantSpec spec{c.at("shape").get<std::vector<int64_t>>(),
                        c.at("dtype").get<std::string>(), c.at("source").get<std::string>(), {}};
      if (auto d = c.find("derive"); d != c.end()) {
        spec.derive.op = d->at("op").get<std::string>();
        spec.derive.sources = d->at("from").get<std::vector<std::string>>();
        if (spec.derive.op.empty() || spec.derive.sources.empty() || spec.source != "checkpoint") {
          return absl::InvalidArgumentError(absl::StrCat(
              "manifest: constant '", fqn, "': derive needs an op, at least one source and "
              "source \"checkpoint\""));
        }
      }
      m.constants[fqn] = std::move(spec);
    }
    auto inputs = ParseSpecs(j.at("inputs"));
    if (!inputs.ok()) return inputs.status();
    m.inputs = *std::move(inputs);
    auto outputs = ParseSpecs(j.at("outputs"));
    if (!outputs.ok()) return outputs.status();
    m.outputs = *std::move(outputs);
    m.compile_seconds = j.value("compile_seconds", 0.0);
    m.built_by = j.value("built_by", "");
    m.built_at = j.value("built_at", "");
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("manifest: ", e.what()));
  }
  if (m.digest != m.key.Digest()) {
    return absl::InvalidArgumentError(absl::StrCat("manifest: digest ", m.digest,
                                                   " does not match its key (", m.key.Digest(),
                                                   ")"));
  }
  auto plain = [](const std::string& f) { return !f.empty() && f.find('/') == std::string::npos; };
  bool names_ok = m.extra_constants.find('/') == std::string::npos &&
                  (m.layout == "regional" || plain(m.package_file));
  for (const auto& r : m.region_packages) names_ok &= plain(r.file) && r.file != "manifest.json";
  if (!names_ok) {
    return absl::InvalidArgumentError("manifest: file names must be plain names in the package dir");
  }
  m.raw = j;
  return m;
}

absl::StatusOr<PackageManifest> PackageManifest::FromFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("manifest ", path, " cannot be opened"));
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::DataLossError(absl::StrCat("manifest ", path, " is not valid JSON"));
  }
  auto m = FromJson(j);
  if (!m.ok()) return absl::DataLossError(absl::StrCat(path, ": ", m.status().message()));
  return m;
}

}  // namespace kiln::cache
