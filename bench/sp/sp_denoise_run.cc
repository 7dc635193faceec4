// kiln-sp-denoise: one rank of a sequence-parallel denoise from C++ (issue 15, item 2;
// docs/multi_gpu.md), launched once per rank by tests/parallel/sequence_parallel_test.cc. It
// loads a regional transformer package set (SET: a package directory holding manifest.json) with
// the model's transformer weights, joins the host's process group (parallel::ProcessGroup,
// registered under "0", the name the set's all-to-alls resolve), and runs
// parallel::SequenceParallelDenoise: rank 0 draws the whole noise, text, pooled vector from
// --seed (seeded stand-ins for the encoders' outputs) and scatters them; every rank denoises its
// token shard for --steps steps of the model's Flux schedule; the latents are gathered at the
// end. With --world 1 and an ordinary regional set it is the single-rank reference.
//
//   kiln-sp-denoise SET --model DIR --world N --rank R [--port_file FILE] [--steps 2]
//       [--seed 0] [--out FILE.safetensors] [--timeout 60] [--image_tokens N]
//       [--group_name 0]
// --out: "{rank}" is replaced by R; the file holds `latents`, float32 [1, S, C], whole.
// Prints one JSON line: rank, world, sequence_parallel, image_tokens, text_tokens, steps,
// seconds (the denoise: scatter, loop, gather). Exit status: 0 ok, 2 bad flags or inputs
// (InvalidArgument: on rank 0, tokens that do not divide or do not fit the set), 1 any other
// failure (a set for another rank count, a peer that refused, a timeout).
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "cache/package_dir.h"
#include "common/exit.h"
#include "common/flags.h"
#include "common/stopwatch.h"
#include "nlohmann/json.hpp"
#include "parallel/port_file.h"
#include "parallel/process_group.h"
#include "parallel/sequence_parallel.h"
#include "pipeline/aoti_package.h"
#include "pipeline/regional.h"
#include "pipeline/scheduler.h"
#include "pipeline/weights.h"

ABSL_FLAG(std::string, model, "", "diffusers-layout model repository (transformer, scheduler)");
ABSL_FLAG(int, world, 1, "ranks in the group");
ABSL_FLAG(int, rank, 0, "this process's rank");
ABSL_FLAG(std::string, port_file, "", "rank 0 writes its store port here; the others read it");
ABSL_FLAG(int, steps, 2, "denoising steps");
ABSL_FLAG(uint64_t, seed, 0, "seed of rank 0's noise and stand-in conditioning");
ABSL_FLAG(std::string, out, "", "write the gathered latents here ({rank}: this rank)");
ABSL_FLAG(double, timeout, 60, "seconds allowed for joining and for each collective");
ABSL_FLAG(std::string, group_name, "0", "the name the group is registered under");
ABSL_FLAG(int64_t, image_tokens, 0,
          "rank 0's noise has this many tokens (0: what the set takes; others test refusals)");

namespace {

using kiln::ExitContext;
using kiln::FailMain;
namespace pipeline = kiln::pipeline;
namespace parallel = kiln::parallel;

// The job every rank denoises: on rank 0 the seeded whole inputs, the schedule on every rank.
absl::StatusOr<pipeline::DenoiseSchedule> Schedule(const std::string& model, int steps,
                                                   int image_tokens) {
  auto config =
      pipeline::SchedulerConfig::FromJsonFile(model + "/scheduler/scheduler_config.json");
  if (!config.ok()) return config.status();
  auto flux = pipeline::MakeFluxSchedule(*config, steps, image_tokens);
  if (!flux.ok()) return flux.status();
  pipeline::DenoiseSchedule schedule;
  schedule.sigmas = flux->sigmas;
  // One step a row, padded to 4 floats (as FluxPipeline: each step's view 16-byte aligned).
  std::vector<float> t(steps * 4, 0.0f);
  for (int i = 0; i < steps; ++i) t[i * 4] = pipeline::FluxModelTimestep(*flux, i);
  schedule.timesteps = torch::tensor(t).view({steps, 4});
  return schedule;
}

int Run(const std::string& set_dir) {
  torch::NoGradGuard no_grad;
  auto manifest = kiln::cache::PackageManifest::FromFile(set_dir + "/manifest.json");
  if (!manifest.ok()) return FailMain(manifest.status(), ExitContext::kCommand);
  auto set = kiln::cache::VerifyPackageDir(set_dir, manifest->key);
  if (!set.ok()) return FailMain(set.status(), ExitContext::kCommand);
  auto transformer = pipeline::RegionalTransformer::Load(*set, c10::kCPU);
  if (!transformer.ok()) return FailMain(transformer.status(), ExitContext::kCommand);
  auto weights = pipeline::ComponentWeights::Open(
      absl::GetFlag(FLAGS_model) + "/transformer", "diffusion_pytorch_model", c10::kCPU);
  if (!weights.ok()) return FailMain(weights.status(), ExitContext::kCommand);
  if (auto s = (*transformer)->LoadWeights(**weights); !s.ok()) {
    return FailMain(s, ExitContext::kCommand);
  }
  const auto& specs = (*transformer)->manifest().inputs;
  if (specs.size() != 5) {
    return FailMain(absl::DataLossError(absl::StrCat(set_dir, ": not a transformer set")),
                    ExitContext::kCommand);
  }
  auto act = pipeline::DtypeFromName(specs[0].dtype);
  if (!act.ok()) return FailMain(act.status(), ExitContext::kCommand);

  parallel::GroupOptions options;
  options.world_size = absl::GetFlag(FLAGS_world);
  options.rank = absl::GetFlag(FLAGS_rank);
  options.timeout_seconds = absl::GetFlag(FLAGS_timeout);
  options.group_name = absl::GetFlag(FLAGS_group_name);  // the set's: "0"
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (options.rank == 0 && !port_file.empty()) {
    options.on_listen = [&](int port) {
      if (auto s = parallel::WritePortFile(port_file, port); !s.ok()) {
        std::cerr << "cannot write --port_file: " << s.message() << std::endl;
      }
    };
  } else if (options.rank != 0) {
    auto port = parallel::WaitForPortFile(port_file, options.timeout_seconds);
    if (!port.ok()) return FailMain(port.status(), ExitContext::kCommand);
    options.port = *port;
  }
  if (auto s = options.Validate(); !s.ok()) return FailMain(s);
  auto group = parallel::ProcessGroup::Create(options);
  if (!group.ok()) return FailMain(group.status(), ExitContext::kCommand);

  // Whole sizes: the set's per-rank sizes times its rank count (the group's, if they agree;
  // SequenceParallelDenoise refuses a set for another count on every rank).
  const int p = (*transformer)->sequence_parallel();
  const int64_t image_tokens = specs[0].shape.at(1) * p, text_tokens = specs[1].shape.at(1) * p;
  const int steps = absl::GetFlag(FLAGS_steps);
  auto schedule = Schedule(absl::GetFlag(FLAGS_model), steps, static_cast<int>(image_tokens));
  if (!schedule.ok()) return FailMain(schedule.status());
  parallel::SequenceParallelInputs inputs;
  if (options.rank == 0) {
    auto gen = at::detail::createCPUGenerator(absl::GetFlag(FLAGS_seed));
    const int64_t b = specs[0].shape.at(0);
    const int64_t drawn = absl::GetFlag(FLAGS_image_tokens) > 0 ? absl::GetFlag(FLAGS_image_tokens)
                                                                : image_tokens;
    inputs.latents = at::randn({b, drawn, specs[0].shape.at(2)}, gen, at::kFloat);
    inputs.conditioning.text =
        at::randn({b, text_tokens, specs[1].shape.at(2)}, gen, at::kFloat);
    inputs.conditioning.pooled = at::randn(specs[2].shape, gen, at::kFloat);
    inputs.conditioning.guidance = torch::full(specs[4].shape, 3.5f);
  }
  const kiln::SteadyTime t0 = kiln::SteadyNow();
  auto latents = parallel::SequenceParallelDenoise(**group, **transformer, inputs, *schedule, *act);
  if (!latents.ok()) return FailMain(latents.status(), ExitContext::kCommand);
  const double seconds = kiln::SecondsSince(t0);
  if (std::string out = absl::GetFlag(FLAGS_out); !out.empty()) {
    out = absl::StrReplaceAll(out, {{"{rank}", absl::StrCat(options.rank)}});
    if (auto s = pipeline::WriteSafetensors(out, {{"latents", latents->contiguous()}}); !s.ok()) {
      return FailMain(s, ExitContext::kCommand);
    }
  }
  std::cout << nlohmann::json{{"rank", options.rank},
                              {"world", options.world_size},
                              {"sequence_parallel", p},
                              {"image_tokens", image_tokens},
                              {"text_tokens", text_tokens},
                              {"steps", steps},
                              {"seconds", seconds}}
                   .dump()
            << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> rest = kiln::ParseFlagsOrExit(
      argc, argv, "kiln-sp-denoise",
      "kiln-sp-denoise SET --model DIR --world N --rank R [--port_file F] [--steps N]");
  if (rest.size() != 2) {
    return FailMain(
        absl::InvalidArgumentError("expected one argument, the package set's directory"));
  }
  return Run(rest[1]);
}
