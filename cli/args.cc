#include "cli/args.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace kiln::cli {
namespace {

std::vector<FlagSpec> ClientFlags() {
  return {
      {"coordinator", true, "ENDPOINT[,ENDPOINT]",
       "coordinator client endpoint(s), e.g. tcp://127.0.0.1:5555, or every coordinator's as a "
       "comma list (else $KILN_COORDINATOR, else STATE/cluster.json)"},
      {"state-dir", true, "DIR", "local cluster state directory (default .kiln/cluster)"},
      {"key", true, "FILE",
       "this client's CURVE key pair, NAME.key from `kiln keys new` (else $KILN_KEY, else the "
       "local cluster's admin key)"},
      {"server-key", true, "FILE",
       "the coordinator's CURVE public key, coordinator.pub (else $KILN_SERVER_KEY, else the "
       "local cluster's)"},
      {"insecure-plaintext", false, "",
       "no CURVE: talk to a coordinator started with --insecure_plaintext"},
      {"request-timeout", true, "SECONDS",
       "how long the coordinator may take to answer a request (default 10)"},
      {"retry-for", true, "SECONDS",
       "keep retrying an unanswered request on the next coordinator for this long; 0 = never "
       "(default 60)"},
  };
}

std::vector<FlagSpec> SpecFlags() {
  return {
      {"prompt", true, "TEXT", "text prompt (UTF-8)"},
      {"model", true, "NAME", "model name served by the cluster (default flux-tiny)"},
      {"width", true, "PIXELS", "image width, a multiple of 16 (default 256)"},
      {"height", true, "PIXELS", "image height, a multiple of 16 (default 256)"},
      {"steps", true, "N", "denoising steps (default 28)"},
      {"seed", true, "N", "noise seed; same seed, same image (default 0)"},
      {"guidance", true, "G", "guidance scale; 0 = the model's default (default 0)"},
      {"precision", true, "P", "fp32, bf16, fp8; empty = the node's default"},
      {"lora", true, "NAME[:SCALE]",
       "LoRA merged into the transformer for this job (repeatable, in order; scale default 1)"},
      {"priority", true, "N", "higher runs first (default 0)"},
      {"job-id", true, "ID", "idempotency key, [A-Za-z0-9._:-]{1,128} (default: generated)"},
  };
}

std::vector<FlagSpec> Concat(std::vector<std::vector<FlagSpec>> parts) {
  std::vector<FlagSpec> all;
  for (auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

const FlagSpec kJson{"json", false, "", "print one JSON object instead of text"};

std::vector<CommandSpec> MakeCommands() {
  std::vector<CommandSpec> c;
  c.push_back(
      {"up",
       "",
       0,
       0,
       "start a local cluster: a coordinator and N nodes sharing one package cache",
       {{"nodes", true, "N", "number of nodes (default 1)"},
        {"models", true, "NAME=DIR[,NAME=DIR]", "models every node serves (repeatable; required)"},
        {"state-dir", true, "DIR",
         "holds cluster.json, logs, the shared cache and each node's packages "
         "(default .kiln/cluster)"},
        {"detach", false, "",
         "return once the cluster is up (else stay in the "
         "foreground; Ctrl-C brings it down)"},
        {"device", true, "DEVICE", "cpu, cuda or cuda:N (default cpu)"},
        {"gpus", true, "LIST",
         "with --device cuda: one node per GPU index or MIG UUID, comma-separated "
         "(each node sees only its GPU; with --gpus-per-node N, one node per N of them)"},
        {"gpus-per-node", true, "N",
         "each node spreads every job over N GPUs (sequence parallel, 1..16; default 1): with "
         "--gpus, consecutive entries make one node; with --device cpu, N CPU ranks per node "
         "(tests and development)"},
        {"precision", true, "P[,P...]", "the nodes' precision (default fp32); a list: the nodes serve each, the first is their default"},
        {"heartbeat-ms", true, "MS", "heartbeat interval (default: the coordinator's)"},
        {"max-batch", true, "N",
         "every node runs up to N batch-compatible jobs as one batch (1..4; default 1: none)"},
        {"batch-wait-ms", true, "MS",
         "with --max-batch: how long a node waits for a full batch (0..10000; default 0)"},
        {"max-attempts", true, "N",
         "times a job is assigned before it fails (default: the coordinator's)"},
        {"no-compile", false, "", "nodes never compile (every package must be cached)"},
        {"compile-options", true, "JSON",
         "compile options (a JSON object) for every node, also those added later "
         "(default: kiln's)"},
        {"start-timeout", true, "SECONDS",
         "how long to wait for every process to come up (default 60)"},
        {"bin-dir", true, "DIR", "where kiln-coordinator and kiln-node are (default: beside kiln)"},
        {"advertise", true, "HOST",
         "a host name or IPv4 address other hosts reach this one at: the coordinator and the "
         "nodes bind every interface and advertise HOST (default: 127.0.0.1 only)"},
        {"redis", true, "URL|local",
         "cluster mode: jobs in Redis (redis://HOST:PORT/DB), also the nodes' shared package "
         "cache; `local` starts a redis-server (AOF, appendfsync always) under the state "
         "directory (default: jobs in memory)"},
        {"insecure-plaintext", false, "",
         "no keys, no encryption, no authentication (development only)"},
        kJson}});
  c.push_back({"down",
               "",
               0,
               0,
               "stop the local cluster: nodes first (each finishes its job), then the "
               "coordinator",
               {{"state-dir", true, "DIR", "local cluster state directory (default .kiln/cluster)"},
                {"timeout", true, "SECONDS",
                 "how long each process may take to exit before SIGKILL (default 120)"}}});
  c.push_back({"add-node",
               "",
               0,
               0,
               "start one more node in the running local cluster",
               {{"state-dir", true, "DIR", "local cluster state directory (default .kiln/cluster)"},
                {"fresh", false, "", "start with an empty local package directory"},
                {"node-id", true, "ID", "the node's id (default node-<next number>)"},
                {"gpus", true, "LIST",
                 "the node's GPUs, comma-separated (the cluster's --gpus-per-node of them, "
                 "none given to a running node); required in a cluster started with --gpus"},
                {"start-timeout", true, "SECONDS",
                 "how long to wait for the node to register (default 60)"},
                kJson}});
  c.push_back({"generate", "", 0, 0,
               "submit a job, show its progress, write the PNG and print its path",
               Concat({ClientFlags(),
                       SpecFlags(),
                       {{"out", true, "FILE.png", "where to write the image (required)"},
                        {"timeout", true, "SECONDS", "give up waiting after this (default: never)"},
                        {"no-progress", false, "", "no progress bar on stderr"},
                        kJson}})});
  c.push_back({"submit", "", 0, 0, "submit a job and print its id",
               Concat({ClientFlags(), SpecFlags(), {kJson}})});
  c.push_back(
      {"status", "JOB", 1, 1, "show a job",
       Concat({ClientFlags(),
               {{"out", true, "FILE.png", "write the image if the job succeeded"}, kJson}})});
  c.push_back({"wait", "JOB", 1, 1, "wait until a job is done; optionally write its image",
               Concat({ClientFlags(),
                       {{"timeout", true, "SECONDS", "give up waiting after this (default: never)"},
                        {"out", true, "FILE.png", "write the image if the job succeeded"},
                        {"no-progress", false, "", "no progress bar on stderr"},
                        kJson}})});
  c.push_back({"cancel", "JOB", 1, 1, "cancel a job", Concat({ClientFlags(), {kJson}})});
  c.push_back({"nodes", "", 0, 0, "list the cluster's nodes", Concat({ClientFlags(), {kJson}})});
  c.push_back({"drain", "NODE", 1, 1, "stop placing jobs on a node (its running job finishes)",
               Concat({ClientFlags(), {kJson}})});
  c.push_back({"uncordon", "NODE", 1, 1, "place jobs on a drained node again",
               Concat({ClientFlags(), {kJson}})});
  c.push_back({"remove-node", "NODE", 1, 1,
               "forget a node (a local cluster's node is also stopped and leaves cluster.json)",
               Concat({ClientFlags(),
                       {{"force", false, "", "remove it even while jobs run on it: they are requeued"},
                        {"timeout", true, "SECONDS",
                         "local node: wait this long for it to exit before SIGKILL (default 120)"},
                        kJson}})});
  c.push_back({"keys", "new NAME", 2, 2,
               "make a CURVE key pair: NAME.key (secret, mode 0600) and NAME.pub",
               {{"dir", true, "DIR", "where to write them (default .; created 0700)"},
                {"force", false, "", "overwrite existing files"}}});
  c.push_back({"signing-key", "new KEY | sign KEY DIR | revoke key|package VALUE", 2, 3,
               "package signing keys: make one, sign a package directory, revoke a key or a "
               "package in the shared cache",
               {{"shared-cache", true, "DIR|redis://HOST:PORT/DB",
                 "revoke: the cluster's shared cache (default: the local cluster's)"},
                {"state-dir", true, "DIR", "local cluster state directory (default .kiln/cluster)"}}});
  c.push_back({"help", "[COMMAND]", 0, 1, "show this help, or one command's", {}});
  return c;
}

// Spaces that bring `head` to `column` (at least two).
std::string Pad(const std::string& head, size_t column) {
  return std::string(head.size() + 2 > column ? 2 : column - head.size(), ' ');
}

std::string Canonical(std::string name) { return absl::StrReplaceAll(name, {{"_", "-"}}); }

const FlagSpec* FindFlag(const CommandSpec& spec, const std::string& name) {
  for (const auto& f : spec.flags) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

}  // namespace

const std::vector<CommandSpec>& Commands() {
  static const auto* commands = new std::vector<CommandSpec>(MakeCommands());
  return *commands;
}

const CommandSpec* FindCommand(const std::string& name) {
  for (const auto& c : Commands()) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

std::string CommandLine::Get(const std::string& name, const std::string& fallback) const {
  auto it = flags.find(name);
  return it == flags.end() || it->second.empty() ? fallback : it->second.back();
}

const std::vector<std::string>& CommandLine::All(const std::string& name) const {
  static const auto* empty = new std::vector<std::string>();
  auto it = flags.find(name);
  return it == flags.end() ? *empty : it->second;
}

absl::StatusOr<int64_t> CommandLine::GetInt(const std::string& name, int64_t fallback, int64_t min,
                                            int64_t max) const {
  if (!Has(name)) return fallback;
  const std::string text = Get(name);
  int64_t v = 0;
  if (!absl::SimpleAtoi(text, &v)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", text, "' is not an integer"));
  }
  if (v < min || v > max) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, ": ", v, " is outside ", min, "..", max));
  }
  return v;
}

absl::StatusOr<uint64_t> CommandLine::GetUint64(const std::string& name, uint64_t fallback) const {
  if (!Has(name)) return fallback;
  const std::string text = Get(name);
  uint64_t v = 0;
  if (text.empty() || text[0] == '-' || !absl::SimpleAtoi(text, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, ": '", text, "' is not a non-negative integer"));
  }
  return v;
}

absl::StatusOr<double> CommandLine::GetDouble(const std::string& name, double fallback) const {
  if (!Has(name)) return fallback;
  const std::string text = Get(name);
  double v = 0;
  if (!absl::SimpleAtod(text, &v) || !std::isfinite(v)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", text, "' is not a number"));
  }
  return v;
}

absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args) {
  CommandLine cl;
  if (args.empty()) return absl::InvalidArgumentError("no command given");
  size_t i = 0;
  std::string command = args[0];
  if (command == "--help" || command == "-h") command = "help";
  cl.spec = FindCommand(command);
  if (cl.spec == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unknown command '", command, "'"));
  }
  bool only_positional = false;
  for (i = 1; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (only_positional || arg.size() < 2 || arg[0] != '-' || (arg[1] != '-' && arg != "-h")) {
      cl.positional.push_back(arg);
      continue;
    }
    if (arg == "--") {
      only_positional = true;
      continue;
    }
    if (arg == "-h" || arg == "--help") {
      cl.positional.insert(cl.positional.begin(), cl.spec->name);
      cl.spec = FindCommand("help");
      cl.flags.clear();
      return cl;
    }
    std::string name = arg.substr(2);
    std::string value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    name = Canonical(name);
    const FlagSpec* flag = FindFlag(*cl.spec, name);
    if (flag == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("kiln ", cl.spec->name, ": unknown flag --", name));
    }
    if (flag->takes_value) {
      if (!has_value) {
        if (i + 1 >= args.size()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "kiln ", cl.spec->name, ": --", name, " needs a value (", flag->value_name, ")"));
        }
        value = args[++i];
      }
    } else {
      if (has_value && value != "true" && value != "false") {
        return absl::InvalidArgumentError(
            absl::StrCat("kiln ", cl.spec->name, ": --", name, " takes no value"));
      }
      if (!has_value) value = "true";
      if (value == "false") {
        cl.flags.erase(name);
        continue;
      }
    }
    cl.flags[name].push_back(value);
  }
  const int n = static_cast<int>(cl.positional.size());
  if (n < cl.spec->min_positional || n > cl.spec->max_positional) {
    if (cl.spec->max_positional == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("kiln ", cl.spec->name, ": unexpected argument '", cl.positional[0], "'"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("kiln ", cl.spec->name, ": expected ", cl.spec->positional));
  }
  return cl;
}

absl::StatusOr<std::string> TakeLogFormat(std::vector<std::string>* args) {
  std::string value;
  while (!args->empty()) {
    const std::string& a = (*args)[0];
    if (a == "--log-format" || a == "--log_format") {
      if (args->size() < 2) return absl::InvalidArgumentError("--log-format: needs text or json");
      value = (*args)[1];
      args->erase(args->begin(), args->begin() + 2);
    } else if (a.rfind("--log-format=", 0) == 0 || a.rfind("--log_format=", 0) == 0) {
      value = a.substr(a.find('=') + 1);
      args->erase(args->begin());
    } else {
      break;
    }
  }
  return value;
}

std::string Usage() {
  std::string s =
      "kiln: run and use a kiln image-generation cluster\n\n"
      "usage: kiln [--log-format text|json] COMMAND [flags]\n\ncommands:\n";
  for (const auto& c : Commands()) {
    std::string head = c.name + (c.positional.empty() ? "" : " " + c.positional);
    s += absl::StrCat("  ", head, Pad(head, 18), c.summary, "\n");
  }
  s += "\n`kiln help COMMAND` lists a command's flags. Exit status: 0 ok, 2 bad input or usage,\n"
       "3 job failed or cancelled, 1 any other failure.\n";
  return s;
}

std::string CommandUsage(const CommandSpec& spec) {
  std::string s =
      absl::StrCat("usage: kiln ", spec.name, spec.positional.empty() ? "" : " " + spec.positional,
                   spec.flags.empty() ? "" : " [flags]", "\n  ", spec.summary, "\n");
  if (!spec.flags.empty()) s += "\nflags:\n";
  for (const auto& f : spec.flags) {
    std::string head = "--" + f.name + (f.takes_value ? " " + f.value_name : "");
    s += absl::StrCat("  ", head, Pad(head, 28), f.help, "\n");
  }
  return s;
}

}  // namespace kiln::cli
