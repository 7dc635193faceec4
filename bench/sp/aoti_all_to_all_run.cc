// Experiment (issue 15, item 2), the C++ half: run the package that bench/sp/aoti_all_to_all.py
// wrote (a block with _c10d_functional.all_to_all_single) from LibTorch alone, as kiln's nodes
// run packages (torch::inductor::AOTIModelPackageLoader), one rank per process, the group made
// and registered by parallel::ProcessGroup (gloo over loopback on the CPU).
//
// The package names its process group by the string baked in at export ("0", Python's WORLD)
// and the op resolves that name through c10d's group registry at run time. Each rank first runs
// the package with no group registered (refused, catchable), then joins the group registered
// under "0", runs its own input and compares with the eager output the script wrote for it.
//
// Usage: kiln-sp-a2a-run DIR --world N --rank R [--port_file FILE]
//   DIR: the Python script's output for WORLD = N (block.pt2, rank<R>.in.f32, rank<R>.want.f32).
//   Rank 0 binds an ephemeral port and writes it to --port_file; the others read it there.
// Prints one line per rank; exit status 0 when the package's output equals eager within 1e-5.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/exit.h"
#include "common/files.h"
#include "common/flags.h"
#include "common/stopwatch.h"
#include "parallel/process_group.h"

ABSL_FLAG(int, world, 1, "ranks");
ABSL_FLAG(int, rank, 0, "this process's rank");
ABSL_FLAG(std::string, port_file, "", "rank 0 writes its store port here; the others read it");

namespace {

absl::StatusOr<at::Tensor> ReadF32(const std::string& path, std::vector<int64_t> shape) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto t = torch::empty(shape, torch::kFloat32);
  if (bytes.size() != static_cast<size_t>(t.nbytes())) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", bytes.size(), " bytes, want ", t.nbytes()));
  }
  std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}

absl::StatusOr<int> WaitForPort(const std::string& path, double timeout) {
  const kiln::SteadyTime start = kiln::SteadyNow();
  for (;;) {
    std::ifstream in(path);
    std::string text;
    int port = 0;
    if (std::getline(in, text) && absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &port) && port > 0) return port;
    if (kiln::SecondsSince(start) > timeout) return absl::DeadlineExceededError(absl::StrCat("no port in ", path));
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> rest =
      kiln::ParseFlagsOrExit(argc, argv, "kiln-sp-a2a-run", "kiln-sp-a2a-run DIR --world N --rank R [--port_file F]");
  if (rest.size() != 2) return kiln::FailMain(absl::InvalidArgumentError("expected one argument, DIR"));
  const std::string dir = rest[1];
  kiln::parallel::GroupOptions options;
  options.world_size = absl::GetFlag(FLAGS_world);
  options.rank = absl::GetFlag(FLAGS_rank);
  options.group_name = "0";  // the name the package was exported with
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (options.rank == 0) {
    options.on_listen = [&](int port) { (void)kiln::WriteFileAtomically(port_file, absl::StrCat(port, "\n")); };
  } else {
    auto port = WaitForPort(port_file, options.timeout_seconds);
    if (!port.ok()) return kiln::FailMain(port.status());
    options.port = *port;
  }
  auto x = ReadF32(absl::StrCat(dir, "/rank", options.rank, ".in.f32"), {4, 8});
  auto want = ReadF32(absl::StrCat(dir, "/rank", options.rank, ".want.f32"), {4, 8});
  if (!x.ok()) return kiln::FailMain(x.status());
  if (!want.ok()) return kiln::FailMain(want.status());
  try {
    torch::inductor::AOTIModelPackageLoader loader(dir + "/block.pt2", "model");
    try {  // no group registered under "0" yet
      loader.run({*x});
      std::printf("[rank %d] without a registered group: ran (unexpected)\n", options.rank);
      return 1;
    } catch (const std::exception& e) {
      std::string what = kiln::parallel::ExceptionMessage(e);
      std::printf("[rank %d] without a registered group: refused: %s\n", options.rank,
                  what.substr(0, what.find('\n')).c_str());
    }
    auto group = kiln::parallel::ProcessGroup::Create(options);
    if (!group.ok()) return kiln::FailMain(group.status());
    auto got = loader.run({*x});
    double err = (got.at(0) - *want).abs().max().item<double>();
    std::printf("[rank %d] group '0' of %d ranks (gloo) registered: ran; max|package - eager| = %.3e\n",
                options.rank, options.world_size, err);
    return err < 1e-5 ? 0 : 1;
  } catch (const std::exception& e) {
    return kiln::FailMain(absl::InternalError(kiln::parallel::ExceptionMessage(e)));
  }
}
