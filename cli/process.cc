#include "cli/process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"

namespace kiln::cli {
namespace {

// The process state letter from /proc/PID/stat ('R', 'S', 'Z', ...), or 0 if there is none.
char ProcState(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto paren = text.rfind(')');  // the command name may contain spaces and parentheses
  if (paren == std::string::npos || paren + 2 >= text.size()) return 0;
  return text[paren + 2];
}

std::string Argv0Basename(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/cmdline"));
  std::string argv0;
  std::getline(in, argv0, '\0');
  auto slash = argv0.find_last_of('/');
  return slash == std::string::npos ? argv0 : argv0.substr(slash + 1);
}

}  // namespace

absl::StatusOr<pid_t> Spawn(const SpawnOptions& options) {
  if (options.argv.empty()) return absl::InvalidArgumentError("Spawn: empty argv");
  // Errors between fork and exec come back through a close-on-exec pipe.
  int report[2];
  if (pipe2(report, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
  }
  // The child's environment, built before fork (setenv is not async-signal-safe).
  std::vector<std::string> env_storage;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    if (options.env.count(entry.substr(0, entry.find('='))) == 0) env_storage.push_back(entry);
  }
  for (const auto& [name, value] : options.env) env_storage.push_back(name + "=" + value);
  std::vector<char*> envp;
  for (auto& e : env_storage) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<char*> args;
  for (const auto& a : options.argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    close(report[0]);
    close(report[1]);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec.
    auto fail = [&](int step) {
      int err[2] = {step, errno};
      (void)!write(report[1], err, sizeof(err));
      _exit(127);
    };
    if (options.new_session && setsid() < 0) fail(1);
    if (options.die_with_parent) {
      if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0) fail(2);
      if (getppid() != parent) _exit(1);  // the parent is already gone
    }
    int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd < 0 || dup2(null_fd, STDIN_FILENO) < 0) fail(3);
    if (null_fd > STDERR_FILENO) close(null_fd);
    if (!options.log_path.empty()) {
      int log_fd = open(options.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (log_fd < 0 || dup2(log_fd, STDOUT_FILENO) < 0 || dup2(log_fd, STDERR_FILENO) < 0) {
        fail(4);
      }
      if (log_fd > STDERR_FILENO) close(log_fd);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    signal(SIGPIPE, SIG_DFL);
    execve(args[0], args.data(), envp.data());
    fail(5);
  }
  close(report[1]);
  int err[2] = {0, 0};
  ssize_t n;
  do {
    n = read(report[0], err, sizeof(err));
  } while (n < 0 && errno == EINTR);
  close(report[0]);
  if (n == static_cast<ssize_t>(sizeof(err))) {
    waitpid(pid, nullptr, 0);
    static const char* steps[] = {"", "setsid", "prctl", "stdin", "open log", "exec"};
    const char* step = err[0] >= 1 && err[0] <= 5 ? steps[err[0]] : "start";
    std::string what = err[0] == 4 ? options.log_path : options.argv[0];
    if (err[0] == 5 && (err[1] == ENOENT || err[1] == EACCES)) {
      return absl::NotFoundError(
          absl::StrCat("cannot run ", options.argv[0], ": ", std::strerror(err[1])));
    }
    return absl::InternalError(absl::StrCat("cannot start ", options.argv[0], " (", step, " ", what,
                                            "): ", std::strerror(err[1])));
  }
  return pid;
}

bool ProcessAlive(pid_t pid, const std::string& exe_name) {
  if (pid <= 0) return false;
  int status = 0;
  pid_t r = waitpid(pid, &status, WNOHANG);
  if (r == pid) return false;  // our child, now reaped
  if (kill(pid, 0) != 0 && errno == ESRCH) return false;
  const char state = ProcState(pid);
  if (state == 0 || state == 'Z' || state == 'X') return false;
  if (!exe_name.empty() && Argv0Basename(pid) != exe_name) return false;
  return true;
}

absl::Status SignalProcess(pid_t pid, int signal, const std::string& exe_name) {
  if (!ProcessAlive(pid, exe_name)) return absl::OkStatus();
  if (kill(pid, signal) != 0 && errno != ESRCH) {
    return absl::InternalError(absl::StrCat("kill(", pid, "): ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

bool WaitGone(pid_t pid, int timeout_ms, const std::string& exe_name) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (ProcessAlive(pid, exe_name)) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return true;
}

bool StopProcess(pid_t pid, int grace_ms, const std::string& exe_name) {
  if (!ProcessAlive(pid, exe_name)) return true;
  // Ours (checked just now): from here on, wait for the pid itself. A process that is exiting
  // has an empty /proc/PID/cmdline before it is gone, so the name check would call it gone
  // early (cli/process_test saw it alive after StopProcess returned true).
  (void)SignalProcess(pid, SIGTERM);
  if (WaitGone(pid, grace_ms)) return true;
  (void)SignalProcess(pid, SIGKILL);
  WaitGone(pid, 5000);
  return false;
}

std::string TailOfFile(const std::string& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  const std::streamoff start = size > static_cast<std::streamoff>(max_bytes)
                                   ? size - static_cast<std::streamoff>(max_bytes)
                                   : 0;
  in.seekg(start);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace kiln::cli
