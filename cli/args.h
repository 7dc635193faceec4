// The `kiln` command line: the table of commands and their flags, and a parser from argv to a
// CommandLine. Pure functions, no I/O; called by cli/commands.cc. Thread-safe.
//
//   kiln COMMAND [--flag VALUE | --flag=VALUE | --bool-flag] [POSITIONAL ...]
//
// Flag names accept '-' and '_' alike (--state-dir == --state_dir); a flag may be repeated (the
// last value wins for single-valued flags; --models collects every value).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kiln::cli {

struct FlagSpec {
  std::string name;        // canonical spelling, with '-' ("state-dir")
  bool takes_value;        // false: a boolean switch
  std::string value_name;  // shown in usage, e.g. "DIR"
  std::string help;
};

struct CommandSpec {
  std::string name;
  std::string positional;  // usage text of the positional arguments, e.g. "JOB"
  int min_positional = 0;
  int max_positional = 0;
  std::string summary;
  std::vector<FlagSpec> flags;
};

// Every command `kiln` knows, in the order `kiln help` lists them.
const std::vector<CommandSpec>& Commands();
// nullptr if there is no such command.
const CommandSpec* FindCommand(const std::string& name);

struct CommandLine {
  const CommandSpec* spec = nullptr;
  std::map<std::string, std::vector<std::string>> flags;  // canonical name → values in order
  std::vector<std::string> positional;

  bool Has(const std::string& name) const { return flags.count(name) > 0; }
  // The last value given, or `fallback`.
  std::string Get(const std::string& name, const std::string& fallback = "") const;
  const std::vector<std::string>& All(const std::string& name) const;
  // Typed values; InvalidArgument naming the flag when the text is not a number in range.
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t fallback, int64_t min,
                                 int64_t max) const;
  absl::StatusOr<uint64_t> GetUint64(const std::string& name, uint64_t fallback) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double fallback) const;
};

// `args` excludes argv[0]. InvalidArgument (a usage error) for an unknown command or flag, a
// missing value or a wrong number of positional arguments; the message says which.
absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args);

// Global options stand before the command: `kiln --log-format json up ...`. Removes the leading
// `--log-format VALUE` / `--log-format=VALUE` (also `--log_format`) from `args` and returns its
// value, "" when there is none. InvalidArgument naming --log-format when the value is missing.
absl::StatusOr<std::string> TakeLogFormat(std::vector<std::string>* args);

// `kiln help` text, and the usage of one command.
std::string Usage();
std::string CommandUsage(const CommandSpec& spec);

}  // namespace kiln::cli
