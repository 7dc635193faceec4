#include "pipeline/lora.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"
#include "common/hash.h"
#include "pipeline/torch_error.h"
#include "pipeline/weights.h"

namespace kiln::pipeline {
namespace fs = std::filesystem;
namespace {

constexpr char kSuffix[] = ".safetensors";
constexpr char kDigestSuffix[] = ".safetensors.sha256";

// Black Forest Labs' Flux module names (kohya's sd-scripts) → the diffusers modules they cover,
// in row order of the fused weight, relative to the block ("transformer_blocks.N." or
// "single_transformer_blocks.N.").
const std::map<std::string, std::vector<std::string>>& DoubleBlockModules() {
  static const auto* m = new std::map<std::string, std::vector<std::string>>{
      {"img_attn_qkv", {"attn.to_q", "attn.to_k", "attn.to_v"}},
      {"txt_attn_qkv", {"attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"}},
      {"img_attn_proj", {"attn.to_out.0"}},
      {"txt_attn_proj", {"attn.to_add_out"}},
      {"img_mlp_0", {"ff.net.0.proj"}},
      {"img_mlp_2", {"ff.net.2"}},
      {"txt_mlp_0", {"ff_context.net.0.proj"}},
      {"txt_mlp_2", {"ff_context.net.2"}},
      {"img_mod_lin", {"norm1.linear"}},
      {"txt_mod_lin", {"norm1_context.linear"}},
  };
  return *m;
}

const std::map<std::string, std::vector<std::string>>& SingleBlockModules() {
  static const auto* m = new std::map<std::string, std::vector<std::string>>{
      {"linear1", {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"}},
      {"linear2", {"proj_out"}},
      {"modulation_lin", {"norm.linear"}},
  };
  return *m;
}

// "double_blocks_3_img_attn_qkv" → {"transformer_blocks.3.attn.to_q", ...}; empty if not a BFL
// name.
std::vector<std::string> BflModules(const std::string& stem) {
  for (const auto& [prefix, table, block] :
       {std::make_tuple("double_blocks_", &DoubleBlockModules(), "transformer_blocks."),
        std::make_tuple("single_blocks_", &SingleBlockModules(), "single_transformer_blocks.")}) {
    absl::string_view rest = stem;
    if (!absl::ConsumePrefix(&rest, prefix)) continue;
    const size_t us = rest.find('_');
    int index = 0;
    if (us == absl::string_view::npos || !absl::SimpleAtoi(rest.substr(0, us), &index)) return {};
    auto it = table->find(std::string(rest.substr(us + 1)));
    if (it == table->end()) return {};
    std::vector<std::string> out;
    for (const auto& m : it->second) out.push_back(absl::StrCat(block, index, ".", m));
    return out;
  }
  return {};
}

// One module's tensors as found in the file.
struct Group {
  const TensorView* down = nullptr;  // A
  const TensorView* up = nullptr;    // B
  const TensorView* alpha = nullptr;
  bool kohya = false;
};

std::string Shape(const std::vector<int64_t>& s) { return ShapeString(s); }

}  // namespace

absl::StatusOr<LocatedLora> LoraLibrary::Find(const std::string& name) const {
  std::vector<std::string> looked;
  for (const auto& dir : dirs_) {
    const std::string path = absl::StrCat(dir, "/", name, kSuffix);
    looked.push_back(path);
    std::error_code ec;
    if (!fs::is_regular_file(path, ec)) continue;
    const std::string digest_path = absl::StrCat(dir, "/", name, kDigestSuffix);
    std::ifstream in(digest_path);
    std::string hex;
    if (!(in >> hex)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "LoRA ", path, ": no digest recorded (", digest_path,
          " missing or empty; write it with `sha256sum NAME.safetensors > NAME.safetensors.sha256`)"));
    }
    hex = absl::AsciiStrToLower(hex);
    if (hex.size() != 64 || hex.find_first_not_of("0123456789abcdef") != std::string::npos) {
      return absl::FailedPreconditionError(
          absl::StrCat("LoRA ", path, ": ", digest_path, " does not start with a SHA-256 in hex"));
    }
    return LocatedLora{name, path, hex};
  }
  return absl::NotFoundError(absl::StrCat("LoRA '", name, "' not found (looked for ",
                                          absl::StrJoin(looked, ", "), ")"));
}

absl::Status LoraLibrary::Verify(const LocatedLora& lora) {
  auto actual = Sha256File(lora.path);
  if (!actual.ok()) return actual.status();
  if (*actual != lora.sha256) {
    return absl::DataLossError(absl::StrCat("LoRA ", lora.path, ": SHA-256 ", *actual,
                                            " differs from the recorded ", lora.sha256));
  }
  return absl::OkStatus();
}

std::vector<std::string> LoraLibrary::Names() const {
  std::set<std::string> names;
  for (const auto& dir : dirs_) {
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string file = it->path().filename().string();
      absl::string_view stem = file;
      if (!absl::ConsumeSuffix(&stem, kSuffix)) continue;
      std::error_code ec2;
      if (fs::exists(absl::StrCat(dir, "/", stem, kDigestSuffix), ec2)) names.emplace(stem);
    }
  }
  return {names.begin(), names.end()};
}

absl::StatusOr<std::unique_ptr<LoraWeights>> LoraWeights::Load(const std::string& path,
                                                               const WeightSet& checkpoint,
                                                               const c10::Device& device) {
  auto file = SafetensorsFile::Open(path);
  if (!file.ok()) return file.status();
  auto bad = [&](const std::string& tensor, const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("LoRA ", path, ": tensor '", tensor, "': ", why));
  };
  // Group the tensors by module.
  std::map<std::string, Group> groups;
  for (const TensorView& t : (*file)->tensors()) {
    absl::string_view name = t.name;
    const bool kohya = absl::ConsumePrefix(&name, "lora_unet_");
    const TensorView** slot = nullptr;
    Group probe;
    if (absl::ConsumeSuffix(&name, kohya ? ".lora_down.weight" : ".lora_A.weight")) {
      slot = &probe.down;
    } else if (absl::ConsumeSuffix(&name, kohya ? ".lora_up.weight" : ".lora_B.weight")) {
      slot = &probe.up;
    } else if (absl::ConsumeSuffix(&name, ".alpha")) {
      slot = &probe.alpha;
    }
    if (slot == nullptr || (!kohya && absl::StartsWith(t.name, "lora_"))) {
      return bad(t.name, absl::StrCat(
                             "not a transformer LoRA tensor (expected <module>.lora_A.weight / "
                             ".lora_B.weight / .alpha, or lora_unet_<module>.lora_down.weight / "
                             ".lora_up.weight / .alpha)"));
    }
    if (!kohya && !absl::ConsumePrefix(&name, "transformer.")) {
      absl::ConsumePrefix(&name, "base_model.model.");
    }
    auto& g = groups[std::string(kohya ? "k:" : "p:") + std::string(name)];
    g.kohya = kohya;
    if (slot == &probe.down) g.down = &t;
    if (slot == &probe.up) g.up = &t;
    if (slot == &probe.alpha) g.alpha = &t;
  }
  if (groups.empty()) return absl::InvalidArgumentError(absl::StrCat("LoRA ", path, ": no tensors"));

  // Checkpoint weights by kohya stem ("transformer_blocks_0_attn_to_q" → "...to_q.weight").
  std::map<std::string, std::string> by_stem;
  for (const auto& n : checkpoint.names()) {
    absl::string_view module = n;
    if (!absl::ConsumeSuffix(&module, ".weight")) continue;
    by_stem[absl::StrReplaceAll(module, {{".", "_"}})] = n;
  }

  std::unique_ptr<LoraWeights> out(new LoraWeights());
  out->path_ = path;
  for (const auto& [key, g] : groups) {
    const std::string module = key.substr(2);
    const std::string shown = g.kohya ? "lora_unet_" + module : module;
    if (g.down == nullptr || g.up == nullptr) {
      const TensorView* have = g.down ? g.down : g.up ? g.up : g.alpha;
      return bad(have->name, absl::StrCat("its ", g.down ? (g.kohya ? "lora_up" : "lora_B")
                                                         : (g.kohya ? "lora_down" : "lora_A"),
                                          " factor is missing"));
    }
    if (out->layout_.empty()) out->layout_ = g.kohya ? "kohya" : "peft";
    // The checkpoint weights this module changes (several for a fused BFL projection).
    std::vector<std::string> targets;
    if (!g.kohya) {
      targets.push_back(module + ".weight");
    } else if (auto it = by_stem.find(module); it != by_stem.end()) {
      targets.push_back(it->second);
    } else {
      for (const auto& m : BflModules(module)) targets.push_back(m + ".weight");
    }
    for (const auto& t : targets) {
      const TensorView* w = checkpoint.Find(t);
      if (w == nullptr || w->shape.size() != 2) {
        return bad(g.down->name, absl::StrCat("targets '", t, "', which the transformer "
                                              "checkpoint does not have as a matrix"));
      }
    }
    if (targets.empty()) {
      return bad(g.down->name, absl::StrCat("module '", module, "' matches no weight of the "
                                            "transformer checkpoint"));
    }
    const auto& a = g.down->shape;
    const auto& b = g.up->shape;
    if (a.size() != 2) return bad(g.down->name, absl::StrCat("shape ", Shape(a), " is not a matrix"));
    if (b.size() != 2) return bad(g.up->name, absl::StrCat("shape ", Shape(b), " is not a matrix"));
    const int64_t rank = a[0];
    int64_t out_rows = 0;
    for (const auto& t : targets) out_rows += checkpoint.Find(t)->shape[0];
    const int64_t in = checkpoint.Find(targets.front())->shape[1];
    if (a[1] != in || rank < 1) {
      return bad(g.down->name, absl::StrCat("shape ", Shape(a), ", the target '", targets.front(),
                                            "' needs [rank, ", in, "]"));
    }
    if (b[0] != out_rows || b[1] != rank) {
      return bad(g.up->name, absl::StrCat("shape ", Shape(b), ", the target",
                                          targets.size() > 1 ? "s '" : " '",
                                          absl::StrJoin(targets, "', '"), "' and rank ", rank,
                                          " need [", out_rows, ", ", rank, "]"));
    }
    double alpha = static_cast<double>(rank);
    try {
      if (g.alpha != nullptr) {
        int64_t numel = 1;
        for (auto d : g.alpha->shape) numel *= d;
        auto t = TensorFromView(*g.alpha);
        if (!t.ok()) return t.status();
        if (numel != 1) return bad(g.alpha->name, absl::StrCat("shape ", Shape(g.alpha->shape), " is not one number"));
        alpha = t->to(at::kDouble).item<double>();
        if (!std::isfinite(alpha)) return bad(g.alpha->name, "not finite");
      }
      auto down = TensorFromView(*g.down);
      if (!down.ok()) return down.status();
      auto up = TensorFromView(*g.up);
      if (!up.ok()) return up.status();
      at::Tensor down_d = down->to(device, down->scalar_type(), false, /*copy=*/true).contiguous();
      at::Tensor up_d = up->to(device, up->scalar_type(), false, /*copy=*/true).contiguous();
      out->bytes_ += g.down->nbytes + g.up->nbytes;
      int64_t row = 0;
      for (const auto& t : targets) {
        const int64_t rows = checkpoint.Find(t)->shape[0];
        LoraFactor f;
        f.target = t;
        f.up = targets.size() == 1 ? up_d : up_d.narrow(0, row, rows).contiguous();
        f.down = down_d;
        f.alpha_over_rank = alpha / static_cast<double>(rank);
        f.tensors = absl::StrCat(g.down->name, ", ", g.up->name);
        row += rows;
        out->factors_.push_back(std::move(f));
      }
    } catch (const std::exception& e) {
      return absl::InternalError(
          absl::StrCat("LoRA ", path, ": module '", shown, "': ", ExceptionMessage(e)));
    }
  }
  return out;
}

void LoraDeltas::Add(std::shared_ptr<const LoraWeights> lora, double scale) {
  for (const auto& f : lora->factors()) by_target_[f.target].push_back({&f, scale});
  loras_.push_back(std::move(lora));
}

at::Tensor LoraDeltas::DeltaFor(const std::string& target) const {
  auto it = by_target_.find(target);
  if (it == by_target_.end()) return at::Tensor();
  at::Tensor sum;
  for (const auto& term : it->second) {
    at::Tensor d = at::matmul(term.factor->up.to(at::kFloat), term.factor->down.to(at::kFloat))
                       .mul_(term.scale * term.factor->alpha_over_rank);
    sum = sum.defined() ? sum.add_(d) : d;
  }
  return sum;
}

std::vector<std::string> LoraDeltas::Targets() const {
  std::vector<std::string> out;
  for (const auto& [t, terms] : by_target_) out.push_back(t);
  return out;
}

}  // namespace kiln::pipeline
