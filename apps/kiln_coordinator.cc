// kiln-coordinator: accepts jobs from clients, tracks nodes, places jobs, returns results.
//   kiln-coordinator [--client_endpoint tcp://127.0.0.1:7700]
//                    [--node_endpoint tcp://127.0.0.1:7701] [--metrics 127.0.0.1:9400]
//                    [--endpoints_file PATH] [--heartbeat_ms 1000] [--max_attempts 3]
// Port 0 picks a free port; --endpoints_file then tells the chosen ones. Runs until SIGTERM or
// SIGINT. Exit status: 0 after a clean shutdown, 2 bad flags, 1 other failure (e.g. cannot bind).
#include <signal.h>
#include <unistd.h>

#include <iostream>
#include <memory>
#include <string>

#include "absl/cleanup/cleanup.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "common/clock.h"
#include "coordinator/coordinator.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/coordinator_server.h"
#include "coordinator/job_store.h"
#include "coordinator/process_support.h"
#include "coordinator/status_board.h"
#include "metrics/metrics_server.h"

ABSL_FLAG(std::string, client_endpoint, "tcp://127.0.0.1:7700",
          "ZeroMQ endpoint for clients (ROUTER); port 0 picks a free port");
ABSL_FLAG(std::string, node_endpoint, "tcp://127.0.0.1:7701",
          "ZeroMQ endpoint for nodes (ROUTER); port 0 picks a free port");
ABSL_FLAG(std::string, metrics, "127.0.0.1:9400",
          "HOST:PORT serving Prometheus /metrics; port 0 picks a free port");
ABSL_FLAG(std::string, endpoints_file, "",
          "after binding, write the bound endpoints, metrics URL and pid here as JSON (atomic)");
ABSL_FLAG(int, heartbeat_ms, 1000, "heartbeat interval in ms (a node is dead after 3 missed)");
ABSL_FLAG(int, max_attempts, 3, "assignments per job before a node loss fails it");
ABSL_FLAG(int, max_jobs_per_node, 1, "jobs a node runs at once");
ABSL_FLAG(int64_t, max_message_bytes, 64 << 20,
          "largest inbound message in bytes; a peer sending more is disconnected");

namespace {

int Fail(const absl::Status& s) {
  std::cerr << "kiln-coordinator: error: " << s.message() << "\n";
  return absl::IsInvalidArgument(s) ? 2 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("kiln-coordinator [--client_endpoint E] [--node_endpoint E] "
                               "[--metrics HOST:PORT] [--endpoints_file PATH]");
  absl::ParseCommandLine(argc, argv);

  // Block the stop signals before any thread starts, so every thread inherits the mask and
  // main receives them in sigwait below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  kiln::coordinator::CoordinatorOptions options;
  options.heartbeat_interval_ms = absl::GetFlag(FLAGS_heartbeat_ms);
  options.max_attempts = static_cast<uint32_t>(std::max(0, absl::GetFlag(FLAGS_max_attempts)));
  options.max_jobs_per_node = absl::GetFlag(FLAGS_max_jobs_per_node);
  if (auto s = options.Validate(); !s.ok()) return Fail(s);
  kiln::coordinator::CoordinatorServerOptions server_options;
  server_options.client_endpoint = absl::GetFlag(FLAGS_client_endpoint);
  server_options.node_endpoint = absl::GetFlag(FLAGS_node_endpoint);
  server_options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  if (auto s = server_options.Validate(); !s.ok()) return Fail(s);

  const kiln::coordinator::EventLog log = kiln::coordinator::StderrLog("kiln-coordinator");
  auto metrics_server = kiln::metrics::MetricsServer::Start(absl::GetFlag(FLAGS_metrics));
  if (!metrics_server.ok()) return Fail(metrics_server.status());
  kiln::coordinator::CoordinatorMetrics metrics((*metrics_server)->registry());
  kiln::coordinator::InMemoryJobStore store;
  kiln::SystemClock clock;
  auto coordinator = kiln::coordinator::Coordinator::Create(options, store, clock, metrics, log);
  if (!coordinator.ok()) return Fail(coordinator.status());
  // /sd, /status/ and /readyz on the metrics port, fed from the poll thread.
  kiln::coordinator::StatusBoard board({}, clock, metrics);
  board.Install(**metrics_server);
  // Stop the web server (its threads read the board) before the board goes, on every return.
  absl::Cleanup stop_http = [&metrics_server] { metrics_server->reset(); };
  server_options.after_tick = [&board, &store](const kiln::coordinator::Coordinator& c) {
    board.MaybeRefresh(c, store);
  };
  auto server =
      kiln::coordinator::CoordinatorServer::Start(server_options, **coordinator, metrics, log);
  if (!server.ok()) return Fail(server.status());

  kiln::coordinator::EndpointsFile endpoints;
  endpoints.client_endpoint = kiln::coordinator::ConnectableEndpoint((*server)->client_endpoint());
  endpoints.node_endpoint = kiln::coordinator::ConnectableEndpoint((*server)->node_endpoint());
  endpoints.metrics_url = (*metrics_server)->url();
  endpoints.pid = static_cast<int>(getpid());
  if (const std::string path = absl::GetFlag(FLAGS_endpoints_file); !path.empty()) {
    if (auto s = kiln::coordinator::WriteEndpointsFile(path, endpoints); !s.ok()) return Fail(s);
  }
  log(absl::StrCat("serving clients on ", endpoints.client_endpoint, ", nodes on ",
                   endpoints.node_endpoint, ", metrics on ", endpoints.metrics_url,
                   ", status page on ", (*metrics_server)->base_url(), "/status/ (pid ",
                   endpoints.pid, ")"));

  int signal = 0;
  sigwait(&stop_signals, &signal);
  log(absl::StrCat("stopping (", signal == SIGTERM ? "SIGTERM" : "SIGINT", ")"));
  (*server)->Stop();
  log("stopped");
  return 0;
}
