#include "common/flags.h"

#include <algorithm>
#include <cstdlib>
#include <iostream>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/version.h"

namespace kiln {
namespace {

// A flag argument split into its parts: "--name=value" or "-name".
struct FlagArg {
  std::string dashes;  // "-" or "--"
  std::string name;
  bool has_value = false;
  std::string value;
};

bool IsFlagArg(const std::string& arg) { return arg.size() > 1 && arg[0] == '-' && arg != "--"; }

FlagArg SplitFlagArg(const std::string& arg) {
  FlagArg f;
  const size_t start = arg.rfind("--", 0) == 0 ? 2 : 1;
  f.dashes = arg.substr(0, start);
  const size_t eq = arg.find('=', start);
  f.name = arg.substr(start, eq == std::string::npos ? std::string::npos : eq - start);
  if (eq != std::string::npos) {
    f.has_value = true;
    f.value = arg.substr(eq + 1);
  }
  return f;
}

// The flag `name` refers to (also "noNAME" for a bool), nullptr if none; *negated for "noNAME".
absl::CommandLineFlag* LookUp(const std::string& name, bool* negated) {
  *negated = false;
  if (absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name)) return flag;
  if (absl::StartsWith(name, "no")) {
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name.substr(2));
    if (flag != nullptr && flag->IsOfType<bool>()) {
      *negated = true;
      return flag;
    }
  }
  return nullptr;
}

bool TakesValue(const std::string& name) {
  bool negated = false;
  absl::CommandLineFlag* flag = LookUp(name, &negated);
  return flag != nullptr && !flag->IsOfType<bool>();
}

bool IsHelp(const std::string& arg) {
  return arg == "--help" || arg == "-help" || arg == "-h" || arg == "--helpfull" ||
         arg == "--helpshort";
}

}  // namespace

std::vector<std::string> NormalizeFlagNames(const std::vector<std::string>& args) {
  std::vector<std::string> out;
  out.reserve(args.size());
  bool value_next = false;  // the previous argument was a flag that takes this one as its value
  bool positional_only = false;
  for (const std::string& arg : args) {
    if (positional_only || value_next || !IsFlagArg(arg)) {
      if (arg == "--" && !value_next) positional_only = true;
      value_next = false;
      out.push_back(arg);
      continue;
    }
    FlagArg f = SplitFlagArg(arg);
    std::replace(f.name.begin(), f.name.end(), '-', '_');
    value_next = !f.has_value && TakesValue(f.name);
    out.push_back(f.has_value ? absl::StrCat(f.dashes, f.name, "=", f.value)
                              : absl::StrCat(f.dashes, f.name));
  }
  return out;
}

absl::Status CheckFlags(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--") break;
    if (!IsFlagArg(arg)) continue;
    FlagArg f = SplitFlagArg(arg);
    const std::string shown = absl::StrCat("--", f.name);
    bool negated = false;
    absl::CommandLineFlag* flag = LookUp(f.name, &negated);
    if (flag == nullptr || flag->IsRetired()) {
      return InvalidField(shown, "unknown flag (see --help)");
    }
    std::string value = f.value;
    if (flag->IsOfType<bool>()) {
      if (negated && f.has_value) return InvalidField(shown, "takes no value");
      if (!f.has_value) value = negated ? "false" : "true";
    } else if (!f.has_value) {
      if (i + 1 >= args.size()) return InvalidField(shown, "missing value");
      value = args[++i];
    }
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      return InvalidField(shown, absl::StrCat("bad value '", value, "': ", error));
    }
  }
  return absl::OkStatus();
}

std::string FlagsHelpText(absl::string_view usage) {
  std::vector<absl::CommandLineFlag*> flags;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (flag->IsRetired() || absl::StrContains(flag->Filename(), "absl/")) continue;
    flags.push_back(flag);
  }
  std::sort(flags.begin(), flags.end(),
            [](const auto* a, const auto* b) { return a->Name() < b->Name(); });
  std::string text = absl::StrCat("usage: ", usage, "\n\nflags ('-' and '_' alike in names):\n");
  for (const absl::CommandLineFlag* flag : flags) {
    std::string name(flag->Name());
    std::replace(name.begin(), name.end(), '_', '-');
    absl::StrAppend(&text, "  --", name, "  ", flag->Help(), " (default: \"",
                    flag->DefaultValue(), "\")\n");
  }
  absl::StrAppend(&text, "  --help  this text\n  --version  version, git commit, torch, CUDA\n",
                  "\nexit status: 0 ok, 2 bad input (flags, model, device), 1 anything else\n");
  return text;
}

std::vector<std::string> ParseFlagsOrExit(const std::vector<std::string>& argv,
                                          absl::string_view program, absl::string_view usage) {
  absl::SetProgramUsageMessage(usage);
  const std::vector<std::string> args =
      NormalizeFlagNames(std::vector<std::string>(argv.begin() + (argv.empty() ? 0 : 1),
                                                  argv.end()));
  for (const std::string& arg : args) {
    if (arg == "--") break;
    if (IsHelp(arg)) {
      std::cout << FlagsHelpText(usage);
      std::exit(kExitOk);
    }
    if (arg == "--version" || arg == "-version") {
      std::cout << VersionText(program);
      std::exit(kExitOk);
    }
  }
  if (absl::Status s = CheckFlags(args); !s.ok()) {
    std::cerr << program << ": error: " << s.message() << "\n";
    std::exit(kExitBadInput);
  }
  // absl parses again (flag files, "--"), now that every flag is known to parse.
  std::vector<std::string> storage;
  storage.push_back(argv.empty() ? std::string(program) : argv[0]);
  storage.insert(storage.end(), args.begin(), args.end());
  std::vector<char*> cargs;
  for (std::string& a : storage) cargs.push_back(a.data());
  std::vector<std::string> rest;
  for (char* a : absl::ParseCommandLine(static_cast<int>(cargs.size()), cargs.data())) {
    rest.emplace_back(a);
  }
  return rest;
}

std::vector<std::string> ParseFlagsOrExit(int argc, char** argv, absl::string_view program,
                                          absl::string_view usage) {
  return ParseFlagsOrExit(std::vector<std::string>(argv, argv + argc), program, usage);
}

absl::Status NoPositionalArguments(const std::vector<std::string>& rest) {
  if (rest.size() <= 1) return absl::OkStatus();
  return absl::InvalidArgumentError("unexpected argument '" + rest[1] + "'");
}

}  // namespace kiln
