#include "parallel/sequence_parallel.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pipeline/aoti_package.h"

namespace kiln::parallel {
namespace {

std::string Shape(at::IntArrayRef s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

// Rank 0's check of its whole `tensor` against the set's per-rank `spec` ([B, n/P, X]).
absl::Status CheckWhole(const at::Tensor& tensor, const cache::TensorSpec& spec, int world,
                        const char* what, const char* name) {
  if (!tensor.defined() || tensor.dim() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence parallel: rank 0's ", name, " must be [B, tokens, channels], got ",
                     tensor.defined() ? Shape(tensor.sizes()) : "none"));
  }
  if (auto shard = TokenShard(tensor, 0, world, 1, what); !shard.ok()) return shard.status();
  const std::vector<int64_t> want = {spec.shape.at(0), spec.shape.at(1) * world, spec.shape.at(2)};
  if (tensor.sizes().vec() != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence parallel: rank 0's ", name, " is ", Shape(tensor.sizes()), "; the package set ",
        "takes ", Shape(spec.shape), " per rank, ", Shape(want), " over ", world, " ranks"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<at::Tensor> TokenShard(const at::Tensor& x, int rank, int world, int64_t dim,
                                      const char* what) {
  if (world < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence parallel: a rank count of ", world, " (must be at least 1)"));
  }
  if (rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence parallel: rank ", rank, " is not one of ", world, " ranks"));
  }
  if (dim < 0 || dim >= x.dim()) {
    return absl::InvalidArgumentError(absl::StrCat("sequence parallel: no dimension ", dim,
                                                   " in a tensor of shape ", Shape(x.sizes())));
  }
  const int64_t n = x.size(dim);
  if (n % world != 0) {
    return absl::InvalidArgumentError(absl::StrCat("sequence parallel: ", n, " ", what,
                                                   " do not divide over ", world, " ranks"));
  }
  return x.narrow(dim, rank * (n / world), n / world);
}

absl::StatusOr<at::Tensor> SequenceParallelDenoise(ProcessGroup& group,
                                                   pipeline::RegionalTransformer& transformer,
                                                   const SequenceParallelInputs& inputs,
                                                   const pipeline::DenoiseSchedule& schedule,
                                                   at::ScalarType act) {
  const int world = group.world_size(), rank = group.rank();
  const auto& specs = transformer.manifest().inputs;  // the per-rank transformer inputs
  // 1. Every rank's verdict before any data moves, so a refusal anywhere ends every rank.
  absl::Status verdict;
  if (specs.size() != 5) {
    verdict = absl::FailedPreconditionError(absl::StrCat(
        "sequence parallel: the package set takes ", specs.size(), " inputs, not 5"));
  } else if (transformer.sequence_parallel() != world) {
    verdict = absl::FailedPreconditionError(absl::StrCat(
        "sequence parallel: rank ", rank, "'s package set is compiled for ",
        transformer.sequence_parallel(), " rank(s), the group has ", world));
  } else if (world > 1 && group.group_name() != transformer.process_group()) {
    // The blocks' all-to-alls find their group by name: another name would fail inside the
    // first package run (or find another group).
    verdict = absl::FailedPreconditionError(absl::StrCat(
        "sequence parallel: rank ", rank, "'s package set resolves process group \"",
        transformer.process_group(), "\", the group is registered as \"", group.group_name(),
        "\""));
  } else {
    verdict = transformer.SetSequenceParallelRank(world > 1 ? rank : 0);
  }
  if (verdict.ok() && rank == 0) {
    verdict = CheckWhole(inputs.latents, specs[0], world, "image tokens", "latents");
    if (verdict.ok()) {
      verdict = CheckWhole(inputs.conditioning.text, specs[1], world, "text tokens", "text");
    }
    if (verdict.ok() && (!inputs.conditioning.pooled.defined() ||
                         inputs.conditioning.pooled.sizes().vec() != specs[2].shape)) {
      verdict = absl::InvalidArgumentError(absl::StrCat(
          "sequence parallel: rank 0's pooled vector must be ", Shape(specs[2].shape)));
    }
    if (verdict.ok() && (!inputs.conditioning.guidance.defined() ||
                         inputs.conditioning.guidance.sizes().vec() != specs[4].shape)) {
      verdict = absl::InvalidArgumentError(absl::StrCat(
          "sequence parallel: rank 0's guidance must be ", Shape(specs[4].shape)));
    }
  }
  auto flags = group.AllGather(
      torch::tensor({static_cast<int64_t>(verdict.ok())}, torch::dtype(torch::kLong)));
  if (!flags.ok()) return flags.status();
  if (!verdict.ok()) return verdict;
  std::vector<int> refused;
  for (int r = 0; r < world; ++r) {
    if ((*flags)[r].item<int64_t>() == 0) refused.push_back(r);
  }
  if (!refused.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence parallel: rank(s) ", absl::StrJoin(refused, ", "), " refused the job"));
  }

  try {
    // 2. The rank's shares: scattered token shards, broadcast pooled vector and guidance.
    auto dtype = [](const cache::TensorSpec& s) { return pipeline::DtypeFromName(s.dtype); };
    auto text_dtype = dtype(specs[1]), pooled_dtype = dtype(specs[2]);
    if (!text_dtype.ok()) return text_dtype.status();
    if (!pooled_dtype.ok()) return pooled_dtype.status();
    const auto on = torch::TensorOptions().device(group.device());
    auto scatter = [&](const at::Tensor& whole, const cache::TensorSpec& spec, at::ScalarType t,
                       const char* what) -> absl::StatusOr<at::Tensor> {
      at::Tensor out = torch::empty(spec.shape, on.dtype(t));
      std::vector<at::Tensor> chunks;
      if (rank == 0) {
        const at::Tensor cast = whole.to(on.dtype(t));
        for (int r = 0; r < world; ++r) {
          auto c = TokenShard(cast, r, world, 1, what);
          if (!c.ok()) return c.status();
          chunks.push_back(c->contiguous());
        }
      }
      if (auto s = group.Scatter(chunks, out); !s.ok()) return s;
      return out;
    };
    auto latents = scatter(inputs.latents, specs[0], at::kFloat, "image tokens");
    if (!latents.ok()) return latents.status();
    auto text = scatter(inputs.conditioning.text, specs[1], *text_dtype, "text tokens");
    if (!text.ok()) return text.status();
    pipeline::DenoiseConditioning mine;
    mine.text = *text;
    mine.pooled = rank == 0 ? inputs.conditioning.pooled.to(on.dtype(*pooled_dtype)).contiguous()
                            : torch::empty(specs[2].shape, on.dtype(*pooled_dtype));
    mine.guidance = rank == 0 ? inputs.conditioning.guidance.to(on.dtype(at::kFloat)).contiguous()
                              : torch::empty(specs[4].shape, on.dtype(at::kFloat));
    if (auto s = group.Broadcast(mine.pooled); !s.ok()) return s;
    if (auto s = group.Broadcast(mine.guidance); !s.ok()) return s;

    // 3. The loop on the shard: every step runs every block, all-to-alls inside.
    pipeline::PlainDenoiser denoiser(
        [&transformer](const std::vector<at::Tensor>& in, void* stream) {
          return transformer.RunOn(in, stream);
        },
        act);
    if (auto s = denoiser.Prepare(mine); !s.ok()) return s;
    if (auto s = pipeline::RunDenoiseLoop(denoiser, schedule, *latents, nullptr, nullptr, nullptr);
        !s.ok()) {
      return s;
    }

    // 4. The whole latents on every rank, shards in rank (= token) order.
    auto parts = group.AllGather(*latents);
    if (!parts.ok()) return parts.status();
    return at::cat(*parts, 1);
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("sequence parallel: rank ", rank, ": ", ExceptionMessage(e)));
  }
}

}  // namespace kiln::parallel
