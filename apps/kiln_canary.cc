// kiln-canary: records a compiled package's numerical canary (pipeline/canary.h RecordCanary) with
// the loader a node serves with. kiln-compile calls it after compiling a package and before
// writing the manifest; it is not meant to be run by hand.
//   kiln-canary --manifest M.json --package model.pt2 --inputs in.safetensors --device cuda:0 \
//               --out canary.safetensors
// Prints the number of outputs. Exit status: 0 ok, 2 bad input, 1 other failure.
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/exit.h"
#include "common/flags.h"
#include "common/log_flags.h"
#include "pipeline/canary.h"
#include "pipeline/torch_error.h"

ABSL_FLAG(std::string, manifest, "", "the package's manifest (its canary not filled in yet)");
ABSL_FLAG(std::string, package, "", "the package file (model.pt2)");
ABSL_FLAG(std::string, inputs, "", "safetensors file with the canary inputs input.<i>");
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda or cuda:N");
ABSL_FLAG(std::string, out, "", "where to write input.<i> and output.<i> (safetensors)");

int main(int argc, char** argv) {
  const std::vector<std::string> rest = kiln::ParseFlagsOrExit(
      argc, argv, "kiln-canary",
      "kiln-canary --manifest M.json --package P.pt2 --inputs IN.safetensors --out OUT.safetensors");
  if (auto s = kiln::InitLoggingFromFlags("kiln-canary"); !s.ok()) return kiln::FailMain(s);
  if (auto s = kiln::NoPositionalArguments(rest); !s.ok()) return kiln::FailMain(s);
  const std::vector<std::pair<std::string, std::string>> required = {
      {"manifest", absl::GetFlag(FLAGS_manifest)}, {"package", absl::GetFlag(FLAGS_package)},
      {"inputs", absl::GetFlag(FLAGS_inputs)}, {"out", absl::GetFlag(FLAGS_out)}};
  for (const auto& [name, value] : required) {
    if (value.empty()) {
      return kiln::FailMain(absl::InvalidArgumentError(absl::StrCat("--", name, " is required")));
    }
  }
  c10::Device device(c10::kCPU);
  try {
    device = c10::Device(absl::GetFlag(FLAGS_device));
  } catch (const std::exception& e) {
    return kiln::FailMain(absl::InvalidArgumentError(
        absl::StrCat("--device '", absl::GetFlag(FLAGS_device),
                     "': ", kiln::pipeline::ExceptionMessage(e))));
  }
  auto outputs = kiln::pipeline::RecordCanary(absl::GetFlag(FLAGS_manifest),
                                              absl::GetFlag(FLAGS_package),
                                              absl::GetFlag(FLAGS_inputs), device,
                                              absl::GetFlag(FLAGS_out));
  if (!outputs.ok()) return kiln::FailMain(outputs.status());
  std::cout << *outputs << "\n";
  return 0;
}
