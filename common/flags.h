// The command line of every kiln executable that defines its flags with absl (kiln-coordinator,
// kiln-node, kiln-run, kiln-bench): one flag style and one behaviour for --help, --version and bad
// flags. Only mains call this (STYLE: only main reads flags). Not thread-safe: call it first
// thing in main, before other threads start.
//
//   --state-dir=X, --state_dir=X, --state-dir X   the same flag ('-' and '_' alike in names)
//   --help, -h, --helpfull                         usage and every kiln flag on stdout, exit 0
//   --version                                      common/version.h's VersionText, exit 0
//   an unknown flag, a bad value, a missing value  one line on stderr, exit 2 (kExitBadInput)
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kiln {

// Rewrites the name of each flag argument in `args` (argv without argv[0]) with '_' for '-':
// "--state-dir=a-b" → "--state_dir=a-b", "--no-color" → "--no_color". Values are left alone:
// the part after '=', the argument after a flag that takes a value ("--prompt -a-b"), and
// everything after a bare "--".
std::vector<std::string> NormalizeFlagNames(const std::vector<std::string>& args);

// Checks normalized `args` against the flags the process defines and sets their values (absl's
// CommandLineFlag::ParseFrom). InvalidArgument naming the flag ("--heartbeat_ms") for an unknown
// flag, a value absl cannot parse or a missing value.
absl::Status CheckFlags(const std::vector<std::string>& args);

// `usage` then every flag defined outside absl itself, sorted, with its help and default.
std::string FlagsHelpText(absl::string_view usage);

// The whole command line of a main: normalizes argv, answers --help and --version (exit 0) and
// bad flags (exit 2) itself, then parses with absl::ParseCommandLine. Returns the positional
// arguments, argv[0] first. `program` is the executable's name ("kiln-node"), `usage` its usage
// line(s).
std::vector<std::string> ParseFlagsOrExit(int argc, char** argv, absl::string_view program,
                                          absl::string_view usage);
std::vector<std::string> ParseFlagsOrExit(const std::vector<std::string>& argv,
                                          absl::string_view program, absl::string_view usage);

// OK when ParseFlagsOrExit's result holds only argv[0]; else InvalidArgument naming the first
// positional argument ("unexpected argument 'x'"), for the mains that take none.
absl::Status NoPositionalArguments(const std::vector<std::string>& rest);

}  // namespace kiln
