// Experiment (issue 15, item 2), the C++ half: run a package with a functional all-to-all
// (`_c10d_functional.all_to_all_single`) from LibTorch alone, as kiln's nodes run packages
// (torch::inductor::AOTIModelPackageLoader), one rank per process, the group made and registered
// by parallel::ProcessGroup (gloo over loopback on the CPU). Packages and inputs come from
//   bench/sp/aoti_all_to_all.py DIR N   block.pt2 (linear -> all-to-all -> linear), shared
//   bench/aoti_collectives.py --out DIR  block-rank<R>.pt2, a flux-tiny SP DoubleStreamBlock
// each of which writes rank<R>.safetensors: the inputs in0, in1, ... and `want`, the rank's
// share of the reference output (eager sharded, or the single-process block's token shard).
//
// The package names its process group by the string baked in at export ("0", Python's WORLD)
// and the op resolves that name through c10d's group registry at run time. Each rank first runs
// the package with no group registered (refused, catchable), then joins the group registered
// under "0", runs its inputs and compares output 0 with `want`.
//
// Usage: kiln-sp-a2a-run DIR --world N --rank R [--port_file FILE] [--package block.pt2]
//            [--tolerance 1e-5]
//   --package: file name in DIR; "{rank}" is replaced by R (block-rank{rank}.pt2).
//   Rank 0 binds an ephemeral port and writes it to --port_file; the others read it there.
// Prints one line per stage; exit status 0 when max|out - want| / max|want| <= --tolerance.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/exit.h"
#include "common/flags.h"
#include "parallel/port_file.h"
#include "parallel/process_group.h"
#include "pipeline/safetensors.h"
#include "pipeline/weights.h"

ABSL_FLAG(int, world, 1, "ranks");
ABSL_FLAG(int, rank, 0, "this process's rank");
ABSL_FLAG(std::string, port_file, "", "rank 0 writes its store port here; the others read it");
ABSL_FLAG(std::string, package, "block.pt2", "package file in DIR ({rank}: this rank)");
ABSL_FLAG(double, tolerance, 1e-5, "largest max|out - want| / max|want| accepted");

namespace {

// The inputs in0, in1, ... (in order) and `want` of rank<R>.safetensors, copied out of the file.
absl::Status ReadInputs(const std::string& path, std::vector<at::Tensor>* inputs,
                        at::Tensor* want) {
  auto set = kiln::pipeline::WeightSet::OpenFiles({path});
  if (!set.ok()) return set.status();
  auto load = [&](const std::string& name) -> absl::StatusOr<at::Tensor> {
    auto view = (*set)->Require(name);
    if (!view.ok()) return view.status();
    auto t = kiln::pipeline::TensorFromView(**view);
    if (!t.ok()) return t.status();
    return t->clone();
  };
  for (size_t i = 0; (*set)->Find(absl::StrCat("in", i)) != nullptr; ++i) {
    auto t = load(absl::StrCat("in", i));
    if (!t.ok()) return t.status();
    inputs->push_back(*t);
  }
  auto w = load("want");
  if (!w.ok()) return w.status();
  *want = *w;
  return inputs->empty() ? absl::InvalidArgumentError(absl::StrCat(path, ": no input in0"))
                         : absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> rest = kiln::ParseFlagsOrExit(
      argc, argv, "kiln-sp-a2a-run",
      "kiln-sp-a2a-run DIR --world N --rank R [--port_file F] [--package P]");
  if (rest.size() != 2)
    return kiln::FailMain(absl::InvalidArgumentError("expected one argument, DIR"));
  const std::string dir = rest[1];
  kiln::parallel::GroupOptions options;
  options.world_size = absl::GetFlag(FLAGS_world);
  options.rank = absl::GetFlag(FLAGS_rank);
  options.group_name = "0";  // the name the package was exported with
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (options.rank == 0) {
    options.on_listen = [&](int port) {
      if (auto s = kiln::parallel::WritePortFile(port_file, port); !s.ok())
        std::fprintf(stderr, "%s\n", s.ToString().c_str());
    };
  } else {
    auto port = kiln::parallel::WaitForPortFile(port_file, options.timeout_seconds);
    if (!port.ok()) return kiln::FailMain(port.status());
    options.port = *port;
  }
  std::vector<at::Tensor> inputs;
  at::Tensor want;
  if (auto s = ReadInputs(absl::StrCat(dir, "/rank", options.rank, ".safetensors"), &inputs, &want);
      !s.ok()) {
    return kiln::FailMain(s);
  }
  const std::string package =
      absl::StrReplaceAll(absl::GetFlag(FLAGS_package), {{"{rank}", absl::StrCat(options.rank)}});
  try {
    torch::inductor::AOTIModelPackageLoader loader(dir + "/" + package, "model");
    try {  // no group registered under "0" yet
      loader.run(inputs);
      std::printf("[rank %d] without a registered group: ran (unexpected)\n", options.rank);
      return 1;
    } catch (const std::exception& e) {
      std::string what = kiln::parallel::ExceptionMessage(e);
      std::printf("[rank %d] without a registered group: refused: %s\n", options.rank,
                  what.substr(0, what.find('\n')).c_str());
    }
    auto group = kiln::parallel::ProcessGroup::Create(options);
    if (!group.ok()) return kiln::FailMain(group.status());
    auto got = loader.run(inputs);
    const double err = ((got.at(0) - want).abs().max() / want.abs().max()).item<double>();
    std::printf(
        "[rank %d] group '0' of %d ranks (gloo) registered: ran %s; max|out - want| / max|want| = "
        "%.2e\n",
        options.rank, options.world_size, package.c_str(), err);
    return err <= absl::GetFlag(FLAGS_tolerance) ? 0 : 1;
  } catch (const std::exception& e) {
    return kiln::FailMain(absl::InternalError(kiln::parallel::ExceptionMessage(e)));
  }
}
