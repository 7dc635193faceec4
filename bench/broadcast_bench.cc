// kiln-broadcast-bench: one rank of a multi-GPU node's weight load (issue 15, item 3;
// docs/multi_gpu.md), launched once per rank by bench/broadcast_bench.sh and by
// tests/parallel/weight_broadcast_test.cc. It joins the host's process group
// (parallel::ProcessGroup) and loads one component's checkpoint with parallel::BroadcastWeights:
// rank 0 reads the files, every other rank receives the tensors. With --world 1 it is one
// independent read onto --device (what each GPU of a host of single-GPU nodes does today).
// Prints one JSON line: rank, world, device, tensors, bytes, join_seconds (group setup),
// seconds (read + broadcast), gbps (bytes / seconds), total_seconds (process start to done),
// digest (the manifest's SHA-256).
//
//   kiln-broadcast-bench --model DIR [--component transformer] --world N --rank R
//       [--port P | --port_file FILE] [--device cpu|cuda:R] [--expect_digest HEX]
//       [--save FILE.safetensors] [--timeout 60]
// Rank 0 with --port 0 (the default) binds an ephemeral port and writes it to --port_file; the
// other ranks read it from there (waiting up to --timeout) or take --port.
// Exit status: 0 ok, 2 bad input, 1 other failure (a peer, a timeout, a refused checkpoint).
#include <iostream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "common/exit.h"
#include "common/flags.h"
#include "common/log.h"
#include "common/log_flags.h"
#include "common/stopwatch.h"
#include "nlohmann/json.hpp"
#include "parallel/port_file.h"
#include "parallel/process_group.h"
#include "parallel/weight_broadcast.h"
#include "pipeline/weights.h"

ABSL_FLAG(std::string, model, "", "diffusers-layout model repository (read by rank 0 only)");
ABSL_FLAG(std::string, component, "transformer", "component folder to load");
ABSL_FLAG(int, world, 1, "ranks in the group");
ABSL_FLAG(int, rank, 0, "this process's rank");
ABSL_FLAG(std::string, address, "127.0.0.1", "rank 0's address");
ABSL_FLAG(int, port, 0, "rank 0's store port (rank 0: 0 = ephemeral, written to --port_file)");
ABSL_FLAG(std::string, port_file, "", "rank 0 writes its port here; the others read it");
ABSL_FLAG(std::string, device, "cpu", "cpu (gloo) or cuda:<index> (NCCL)");
ABSL_FLAG(std::string, expect_digest, "", "manifest digest this rank expects (empty: any)");
ABSL_FLAG(std::string, save, "", "write the tensors received to this .safetensors file");
ABSL_FLAG(double, timeout, 60, "seconds allowed for joining and for each collective");

int main(int argc, char** argv) {
  const kiln::SteadyTime t_main = kiln::SteadyNow();
  const std::vector<std::string> rest = kiln::ParseFlagsOrExit(
      argc, argv, "kiln-broadcast-bench",
      "kiln-broadcast-bench --model DIR --world N --rank R [--port P | --port_file FILE] [flags]");
  if (auto s = kiln::InitLoggingFromFlags("kiln-broadcast-bench"); !s.ok())
    return kiln::FailMain(s);
  if (rest.size() > 1) {
    return kiln::FailMain(
        absl::InvalidArgumentError(absl::StrCat("unexpected argument '", rest[1], "'")));
  }
  kiln::parallel::GroupOptions group_options;
  group_options.address = absl::GetFlag(FLAGS_address);
  group_options.world_size = absl::GetFlag(FLAGS_world);
  group_options.rank = absl::GetFlag(FLAGS_rank);
  group_options.device = absl::GetFlag(FLAGS_device);
  group_options.timeout_seconds = absl::GetFlag(FLAGS_timeout);
  group_options.port = absl::GetFlag(FLAGS_port);
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (group_options.rank == 0 && !port_file.empty()) {
    group_options.on_listen = [&](int port) {
      if (auto s = kiln::parallel::WritePortFile(port_file, port); !s.ok()) {
        kiln::LogError("main", absl::StrCat("cannot write --port_file: ", s.message()));
      }
    };
  } else if (group_options.rank != 0 && group_options.port == 0 && !port_file.empty()) {
    auto port = kiln::parallel::WaitForPortFile(port_file, group_options.timeout_seconds);
    if (!port.ok()) return kiln::FailMain(port.status(), kiln::ExitContext::kCommand);
    group_options.port = *port;
  }
  if (auto s = group_options.Validate(); !s.ok()) return kiln::FailMain(s);

  const kiln::SteadyTime t_join = kiln::SteadyNow();
  auto group = kiln::parallel::ProcessGroup::Create(group_options);
  if (!group.ok()) return kiln::FailMain(group.status(), kiln::ExitContext::kCommand);
  const double join_seconds = kiln::SecondsSince(t_join);

  kiln::parallel::BroadcastOptions load;
  const std::string component = absl::GetFlag(FLAGS_component);
  load.dir = absl::StrCat(absl::GetFlag(FLAGS_model), "/",
                          kiln::pipeline::ComponentWeights::FolderFor(component));
  load.stem = kiln::pipeline::ComponentWeights::StemFor(component);
  load.expected_digest = absl::GetFlag(FLAGS_expect_digest);
  auto result = kiln::parallel::BroadcastWeights(**group, load);
  if (!result.ok()) return kiln::FailMain(result.status(), kiln::ExitContext::kCommand);
  if (const std::string save = absl::GetFlag(FLAGS_save); !save.empty()) {
    if (auto s = kiln::pipeline::WriteSafetensors(save, result->tensors); !s.ok()) {
      return kiln::FailMain(s, kiln::ExitContext::kCommand);
    }
  }
  nlohmann::json out = {{"rank", group_options.rank},
                        {"world", group_options.world_size},
                        {"device", group_options.device},
                        {"tensors", result->tensors.size()},
                        {"bytes", result->bytes},
                        {"join_seconds", join_seconds},
                        {"seconds", result->seconds},
                        {"gbps", result->GigabytesPerSecond()},
                        {"total_seconds", kiln::SecondsSince(t_main)},
                        {"digest", result->digest}};
  std::cout << out.dump() << std::endl;
  return 0;
}
