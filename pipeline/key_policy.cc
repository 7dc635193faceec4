#include "pipeline/key_policy.h"

#include <string_view>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "pipeline/toolchain.h"

namespace kiln::pipeline {

std::vector<Resolution> DefaultResolutions() {
  return {{256, 256},  {512, 512},   {768, 768},   {1024, 1024}, {1024, 768},
          {768, 1024}, {1152, 896},  {896, 1152},  {1344, 768},  {768, 1344}};
}

absl::StatusOr<std::vector<Resolution>> ParseResolutions(const std::string& text) {
  std::vector<Resolution> out;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    std::vector<std::string> wh = absl::StrSplit(item, 'x');
    Resolution r;
    if (wh.size() != 2 || !absl::SimpleAtoi(wh[0], &r.width) ||
        !absl::SimpleAtoi(wh[1], &r.height) || r.width <= 0 || r.height <= 0 || r.width % 16 ||
        r.height % 16) {
      return absl::InvalidArgumentError(absl::StrCat(
          "resolution '", item, "': expected WIDTHxHEIGHT, positive multiples of 16"));
    }
    out.push_back(r);
  }
  if (out.empty()) return absl::InvalidArgumentError("no resolutions given");
  return out;
}

std::string FormatResolutions(const std::vector<Resolution>& list) {
  return absl::StrJoin(list, ", ", [](std::string* out, const Resolution& r) {
    absl::StrAppend(out, r.width, "x", r.height);
  });
}

const std::vector<std::string>& FluxComponents() {
  static const auto* components = new std::vector<std::string>{
      "text_encoder", "text_encoder_2", "transformer", "vae_decoder"};
  return *components;
}

nlohmann::json ComponentCompileOptions(const nlohmann::json& options,
                                       const std::string& component) {
  nlohmann::json out = options;
  if (!out.is_object()) return out;
  if (component != "transformer") {
    out.erase("layout");
    out.erase("sequence_parallel");
    out.erase("process_group");
  } else if (auto it = out.find("process_group");
             it != out.end() && *it == kDefaultProcessGroup) {
    out.erase(it);
  }
  return out;
}

std::string ProcessGroupName(const nlohmann::json& compile_options) {
  if (!compile_options.is_object()) return kDefaultProcessGroup;
  auto it = compile_options.find("process_group");
  return it != compile_options.end() && it->is_string() ? it->get<std::string>()
                                                        : kDefaultProcessGroup;
}

absl::Status CheckProcessGroupName(const nlohmann::json& name) {
  const auto bad = [&] {
    return absl::InvalidArgumentError(absl::StrCat(
        "compile_options process_group: ", name.dump(),
        " (want 1..256 characters of [A-Za-z0-9._:/-], e.g. \"flux-dev/bf16\")"));
  };
  if (!name.is_string()) return bad();
  const std::string& s = name.get_ref<const std::string&>();
  if (s.empty() || s.size() > 256) return bad();
  for (char c : s) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) &&
        std::string_view("._:/-").find(c) == std::string_view::npos) {
      return bad();
    }
  }
  return absl::OkStatus();
}

absl::Status KeyPolicy::CheckResolution(int width, int height) const {
  bool allowed = false;
  for (const auto& r : options_.resolutions) allowed |= (r.width == width && r.height == height);
  if (!allowed) {
    return absl::InvalidArgumentError(absl::StrCat("resolution ", width, "x", height,
                                                   " is not one of the compiled buckets: ",
                                                   FormatResolutions(options_.resolutions)));
  }
  const int patch = options_.vae_scale * 2;
  if (width % patch || height % patch) {
    return absl::InvalidArgumentError(
        absl::StrCat("resolution ", width, "x", height, ": must be a multiple of ", patch));
  }
  // Each rank holds whole patch rows (the bucket's height / P names them) and 1/P of the text.
  if (const int p = sequence_parallel(); p > 1) {
    if ((height / patch) % p) {
      return absl::InvalidArgumentError(absl::StrCat("resolution ", width, "x", height, ": its ",
                                                     height / patch, " patch rows do not divide "
                                                     "over ", p, " sequence-parallel ranks"));
    }
    if (options_.text_len % p) {
      return absl::InvalidArgumentError(absl::StrCat("text length ", options_.text_len,
                                                     " does not divide over ", p,
                                                     " sequence-parallel ranks"));
    }
  }
  return absl::OkStatus();
}

int KeyPolicy::sequence_parallel() const {
  const nlohmann::json& o = options_.compile_options;
  if (!o.is_object()) return 1;
  auto it = o.find("sequence_parallel");
  if (it == o.end() || !it->is_number_integer() || it->get<int64_t>() < 1 ||
      it->get<int64_t>() > 1024) {
    return 1;
  }
  return it->get<int>();
}

cache::Bucket KeyPolicy::BucketFor(const std::string& component, int width, int height,
                                   int batch) const {
  if (component == "text_encoder") return {1, 0, 0, options_.clip_len};
  if (component == "text_encoder_2") return {1, 0, 0, options_.text_len};
  if (component == "transformer") {
    const int p = sequence_parallel();
    return {batch, height / p, width, options_.text_len / p};
  }
  return {batch, height, width, 0};
}

cache::ArtifactKey KeyPolicy::KeyFor(const std::string& component, int width, int height,
                                     int batch) const {
  cache::ArtifactKey k;
  k.architecture = cache::ArchitectureDigest(options_.configs.at(component));
  k.component = component;
  // fp8 means fp8 linears in the transformer; the other components run bf16 math, so they
  // share the bf16 packages instead of compiling identical ones under fp8 keys.
  k.precision = (options_.precision == "fp8" && component != "transformer") ? "bf16"
                                                                           : options_.precision;
  k.bucket = BucketFor(component, width, height, batch);
  k.compile =
      cache::CompileOptionsDigest(ComponentCompileOptions(options_.compile_options, component));
  k.target = options_.target;
  k.toolchain.torch = BuildTorchVersion();
  k.toolchain.kiln = cache::BuildKilnRevision();
  if (options_.target != "cpu") {
    k.toolchain.cuda = BuildCudaVersion();
    k.toolchain.triton = BuildTritonVersion();
  }
  return k;
}

std::vector<std::string> KeyPolicy::DigestsFor(int width, int height) const {
  std::vector<std::string> out;
  for (const auto& c : FluxComponents()) out.push_back(KeyFor(c, width, height).Digest());
  return out;
}

}  // namespace kiln::pipeline
