// kiln-coordinator: accepts jobs from clients, tracks nodes, places jobs, returns results.
//   kiln-coordinator [--client_endpoint tcp://127.0.0.1:7700]
//                    [--node_endpoint tcp://127.0.0.1:7701] [--metrics 127.0.0.1:9400]
//                    [--endpoints_file PATH] [--heartbeat_ms 1000] [--max_attempts 3]
//                    [--log_format text|json]
//                    (--key coordinator.key --node_keys F --client_keys F [--admin_keys F]
//                     | --insecure_plaintext)
//                    [--redis redis://HOST:PORT/DB [--lease_ttl_ms 3000] [--retention_s 86400]
//                     [--redis_prefix kiln]]
// Without --redis, jobs live in memory (local mode). With --redis, jobs and results live in Redis
// and the process runs active/standby: it binds nothing until it holds the leader lease, then
// rebuilds its queue from Redis and serves; it steps down (and waits as a standby again) if it
// loses the lease. Transport: CURVE with the --key pair; peers are let in by the allowlists
// (a file of keys or a directory of *.pub files, re-read when they change and on SIGHUP); see
// docs/security.md. --insecure_plaintext turns authentication off (development only; logged). Port 0 picks a free port; --endpoints_file then tells the chosen ones (written
// once it serves). Runs until SIGTERM or SIGINT. Exit status: 0 after a clean shutdown, 2 bad
// flags, 1 other failure (e.g. cannot bind in local mode).
#include <signal.h>
#include <unistd.h>

#include <time.h>

#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "common/advertise.h"
#include "common/clock.h"
#include "common/curve_keys.h"
#include "common/exit.h"
#include "common/flags.h"
#include "common/log.h"
#include "common/log_flags.h"
#include "common/status.h"
#include "coordinator/coordinator.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/coordinator_server.h"
#include "coordinator/job_store.h"
#include "coordinator/leader_lease.h"
#include "coordinator/process_support.h"
#include "coordinator/redis_job_store.h"
#include "coordinator/status_board.h"
#include "metrics/metrics_server.h"

ABSL_FLAG(std::string, client_endpoint, "tcp://127.0.0.1:7700",
          "ZeroMQ endpoint for clients (ROUTER); port 0 picks a free port");
ABSL_FLAG(std::string, node_endpoint, "tcp://127.0.0.1:7701",
          "ZeroMQ endpoint for nodes (ROUTER); port 0 picks a free port");
ABSL_FLAG(std::string, metrics, "127.0.0.1:9400",
          "HOST:PORT serving Prometheus /metrics; port 0 picks a free port");
ABSL_FLAG(std::string, advertise, "",
          "host other machines reach this coordinator at; the endpoints file and log carry it "
          "instead of the bound address (\"\": 127.0.0.1 for 0.0.0.0)");
ABSL_FLAG(std::string, endpoints_file, "",
          "after binding, write the bound endpoints, metrics URL and pid here as JSON (atomic)");
ABSL_FLAG(int, heartbeat_ms, 1000, "heartbeat interval in ms (a node is dead after 3 missed)");
ABSL_FLAG(int, max_attempts, 3, "assignments per job before a node loss fails it");
ABSL_FLAG(int, max_jobs_per_node, 1, "jobs a node runs at once");
ABSL_FLAG(int64_t, max_message_bytes, 64 << 20,
          "largest inbound message in bytes; a peer sending more is disconnected");
ABSL_FLAG(std::string, key, "",
          "this coordinator's CURVE key pair (NAME.key from `kiln keys new`); required unless "
          "--insecure_plaintext");
ABSL_FLAG(std::string, node_keys, "",
          "allowlist of node public keys: a file of 'Z85KEY [name]' lines or a directory of "
          "*.pub files; re-read on change and on SIGHUP");
ABSL_FLAG(std::string, client_keys, "",
          "allowlist of client public keys (they see and cancel their own jobs)");
ABSL_FLAG(std::string, admin_keys, "",
          "allowlist of admin public keys (every job, drain and other node operations)");
ABSL_FLAG(bool, insecure_plaintext, false,
          "no CURVE, no authentication: anyone who reaches the ports is an admin or a node "
          "(development only)");
ABSL_FLAG(int64_t, run_timeout_min_ms, 600000,
          "a running job gets at least this long (ms) before it is requeued for lack of a "
          "result (its timeout is 4x its expected time when that is longer); 0 = no timeout");
ABSL_FLAG(double, run_timeout_factor, 4.0,
          "a running job's timeout is this many times its expected cold start + run time (the "
          "coordinator's cost model), at least --run_timeout_min_ms");
ABSL_FLAG(int, latency_priority, 1,
          "jobs with --priority at or above this are placed where they finish first; lower ones "
          "(throughput work) by expected finish x the node's GPUs, so multi-GPU nodes go to "
          "latency-critical jobs first");
ABSL_FLAG(std::string, redis, "",
          "redis://HOST:PORT/DB: keep jobs and results in Redis and run active/standby with the "
          "other coordinators on it (empty: jobs in memory)");
ABSL_FLAG(int64_t, lease_ttl_ms, 3000,
          "with --redis: leader lease lifetime in ms; a standby takes over within about "
          "1.25 x this after the leader dies");
ABSL_FLAG(int64_t, retention_s, 24 * 3600,
          "with --redis: seconds a finished job and its PNG are kept in Redis");
ABSL_FLAG(std::string, redis_prefix, "kiln",
          "with --redis: prefix of every key (one kiln cluster per prefix)");

int main(int argc, char** argv) {
  const std::vector<std::string> rest = kiln::ParseFlagsOrExit(
      argc, argv, "kiln-coordinator",
      "kiln-coordinator [--client-endpoint E] [--node-endpoint E] [--metrics HOST:PORT] "
      "[--endpoints-file PATH] [--redis redis://HOST:PORT/DB] [flags]");
  if (auto s = kiln::NoPositionalArguments(rest); !s.ok()) return kiln::FailMain(s);
  if (auto s = kiln::InitLoggingFromFlags("kiln-coordinator"); !s.ok()) return kiln::FailMain(s);

  // Block the stop signals before any thread starts, so every thread inherits the mask and
  // main receives them in sigwait below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGHUP);  // reload the key allowlists
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  kiln::coordinator::CoordinatorOptions options;
  options.heartbeat_interval_ms = absl::GetFlag(FLAGS_heartbeat_ms);
  options.max_attempts = static_cast<uint32_t>(std::max(0, absl::GetFlag(FLAGS_max_attempts)));
  options.max_jobs_per_node = absl::GetFlag(FLAGS_max_jobs_per_node);
  options.run_timeout_min_ms = absl::GetFlag(FLAGS_run_timeout_min_ms);
  options.run_timeout_factor = absl::GetFlag(FLAGS_run_timeout_factor);
  options.latency_priority = absl::GetFlag(FLAGS_latency_priority);
  if (options.run_timeout_min_ms == 0) options.run_timeout_factor = 0;
  if (auto s = options.Validate(); !s.ok()) return kiln::FailMain(s);
  const std::string advertise = absl::GetFlag(FLAGS_advertise);
  if (auto s = kiln::ValidateAdvertiseHost(advertise, "--advertise"); !s.ok()) {
    return kiln::FailMain(s);
  }
  kiln::coordinator::CoordinatorServerOptions server_options;
  server_options.client_endpoint = absl::GetFlag(FLAGS_client_endpoint);
  server_options.node_endpoint = absl::GetFlag(FLAGS_node_endpoint);
  server_options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  if (absl::GetFlag(FLAGS_insecure_plaintext)) {
    if (!absl::GetFlag(FLAGS_key).empty()) {
      return kiln::FailMain(
          absl::InvalidArgumentError("--key and --insecure_plaintext exclude each other"));
    }
    for (int i = 0; i < 3; ++i) {
      kiln::LogWarning("main",
                       "INSECURE: --insecure_plaintext: no encryption, no authentication; anyone "
                       "who reaches the ports can submit, read and cancel every job and act as a "
                       "node. Development only.");
    }
  } else {
    if (absl::GetFlag(FLAGS_key).empty()) {
      return kiln::FailMain(kiln::InvalidField(
          "key", "required: this coordinator's CURVE key pair (`kiln keys new coordinator`), or "
                 "--insecure_plaintext for development"));
    }
    auto pair = kiln::ReadCurveKeyPair(absl::GetFlag(FLAGS_key));
    if (!pair.ok()) return kiln::FailMain(pair.status());
    server_options.curve_secret_key = pair->secret_key;
    server_options.auth.allowlists.node_keys = absl::GetFlag(FLAGS_node_keys);
    server_options.auth.allowlists.client_keys = absl::GetFlag(FLAGS_client_keys);
    server_options.auth.allowlists.admin_keys = absl::GetFlag(FLAGS_admin_keys);
    if (server_options.auth.allowlists.node_keys.empty()) {
      return kiln::FailMain(
          kiln::InvalidField("node_keys", "required with --key (who may be a node)"));
    }
    if (server_options.auth.allowlists.client_keys.empty() &&
        server_options.auth.allowlists.admin_keys.empty()) {
      return kiln::FailMain(
          kiln::InvalidField("client_keys", "--client_keys or --admin_keys is required"));
    }
    // Fail at start, not at the first handshake, on an unreadable list.
    if (auto lists = kiln::coordinator::KeyAllowlist::Load(server_options.auth.allowlists);
        !lists.ok()) {
      return kiln::FailMain(lists.status());
    }
    kiln::LogInfo("main", absl::StrCat("CURVE on; coordinator public key ", pair->public_key));
  }
  if (auto s = server_options.Validate(); !s.ok()) return kiln::FailMain(s);

  const kiln::coordinator::EventLog log = kiln::LineLogger("coordinator");
  auto metrics_server = kiln::metrics::MetricsServer::Start(absl::GetFlag(FLAGS_metrics));
  if (!metrics_server.ok()) return kiln::FailMain(metrics_server.status());
  kiln::coordinator::CoordinatorMetrics metrics((*metrics_server)->registry());
  server_options.auth_registry = &(*metrics_server)->registry();
  kiln::SystemClock clock;
  const std::string metrics_url = (*metrics_server)->url();
  // /sd, /status/ and /readyz on the metrics port, fed from the serving poll thread (a standby
  // refreshes nothing, so its /readyz turns false after stale_after_ms).
  kiln::coordinator::StatusBoard board({}, clock, metrics);
  board.Install(**metrics_server);
  // Stop the web server (its threads read the board) before the board goes, on every return.
  absl::Cleanup stop_http = [&metrics_server] { metrics_server->reset(); };

  // Recovers a Coordinator from `store`, binds its server and writes the endpoints file.
  auto serve = [&](kiln::coordinator::JobStore& store) -> absl::StatusOr<
                   std::pair<std::unique_ptr<kiln::coordinator::Coordinator>,
                             std::unique_ptr<kiln::coordinator::CoordinatorServer>>> {
    auto coordinator = kiln::coordinator::Coordinator::Create(options, store, clock, metrics, log);
    if (!coordinator.ok()) return coordinator.status();
    kiln::coordinator::CoordinatorServerOptions serving_options = server_options;
    serving_options.after_tick = [&board, &store](const kiln::coordinator::Coordinator& c) {
      board.MaybeRefresh(c, store);
    };
    auto server =
        kiln::coordinator::CoordinatorServer::Start(serving_options, **coordinator, metrics, log);
    if (!server.ok()) return server.status();
    kiln::coordinator::EndpointsFile endpoints = kiln::coordinator::AdvertisedEndpoints(
        (*server)->client_endpoint(), (*server)->node_endpoint(), metrics_url, advertise);
    endpoints.pid = static_cast<int>(getpid());
    if (const std::string path = absl::GetFlag(FLAGS_endpoints_file); !path.empty()) {
      if (auto s = kiln::coordinator::WriteEndpointsFile(path, endpoints); !s.ok()) return s;
    }
    log(absl::StrCat("serving clients on ", endpoints.client_endpoint, ", nodes on ",
                     endpoints.node_endpoint, ", metrics on ", endpoints.metrics_url,
                     ", status page on ", (*metrics_server)->base_url(), "/status/ (pid ",
                     endpoints.pid, ")"));
    return std::make_pair(std::move(*coordinator), std::move(*server));
  };

  if (absl::GetFlag(FLAGS_redis).empty()) {
    kiln::coordinator::InMemoryJobStore store;
    auto serving = serve(store);
    if (!serving.ok()) return kiln::FailMain(serving.status());
    int signal = 0;
    while (sigwait(&stop_signals, &signal) == 0 && signal == SIGHUP) {
      log("SIGHUP: reloading the key allowlists");
      serving->second->ReloadKeys();
    }
    log(absl::StrCat("stopping (", signal == SIGTERM ? "SIGTERM" : "SIGINT", ")"));
    serving->second->Stop();
    log("stopped");
    return 0;
  }

  // Cluster mode.
  auto redis_options = kiln::redis::ParseRedisUrl(absl::GetFlag(FLAGS_redis));
  if (!redis_options.ok()) {
    return kiln::FailMain(absl::InvalidArgumentError(
        absl::StrCat("--redis: ", redis_options.status().message())));
  }
  kiln::coordinator::RedisJobStoreOptions store_options;
  store_options.key_prefix = absl::GetFlag(FLAGS_redis_prefix);
  store_options.retention_ms = absl::GetFlag(FLAGS_retention_s) * 1000;
  store_options.log = log;
  kiln::coordinator::LeaderLeaseOptions lease_options;
  lease_options.key_prefix = store_options.key_prefix;
  lease_options.ttl_ms = absl::GetFlag(FLAGS_lease_ttl_ms);
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  lease_options.holder = absl::StrCat(host, " pid ", getpid(), " (clients ",
                                      server_options.client_endpoint, ")");
  kiln::redis::RedisOptions store_redis = *redis_options;
  store_redis.client_name = "job_store";
  kiln::redis::RedisOptions lease_redis = *redis_options;
  lease_redis.client_name = "leader_lease";
  auto store = kiln::coordinator::RedisJobStore::Create(store_options, store_redis, clock,
                                                        (*metrics_server)->registry());
  if (!store.ok()) return kiln::FailMain(store.status());
  auto lease = kiln::coordinator::LeaderLease::Create(lease_options, lease_redis,
                                                      (*metrics_server)->registry());
  if (!lease.ok()) return kiln::FailMain(lease.status());
  log(absl::StrCat("cluster mode: jobs in ", redis_options->Url(), " (prefix ",
                   store_options.key_prefix, "), lease ttl ", lease_options.ttl_ms,
                   " ms; metrics on ", metrics_url));

  std::unique_ptr<kiln::coordinator::Coordinator> coordinator;
  std::unique_ptr<kiln::coordinator::CoordinatorServer> server;
  std::string last_note;  // the last standby/outage line, so each is logged once
  auto note = [&](const std::string& line) {
    if (line != last_note) log(line);
    last_note = line;
  };
  auto step_down = [&]() {
    if (server != nullptr) server->Stop();
    server.reset();
    coordinator.reset();
    (*store)->SetFencingToken(0);
  };
  const int64_t interval_ms = lease_options.interval_ms();
  int signal = 0;
  while (true) {
    if (!(*lease)->is_leader()) {
      auto acquired = (*lease)->TryAcquire();
      if (!acquired.ok()) {
        note(absl::StrCat("standby: cannot reach Redis (", acquired.status().message(), ")"));
      } else if (!*acquired) {
        note(absl::StrCat("standby; leader is ", (*lease)->holder()));
      } else {
        (*store)->SetFencingToken((*lease)->token());
        log(absl::StrCat("leading (fencing token ", (*lease)->token(), ")"));
        last_note.clear();
      }
    } else {
      auto renewed = (*lease)->Renew();
      if (absl::IsAborted(renewed)) {
        log(absl::StrCat("stepping down: ", renewed.message()));
        step_down();
      } else if (!renewed.ok()) {
        note(absl::StrCat("cannot renew the leader lease (", renewed.message(),
                          "); serving on: fencing protects the store"));
      }
    }
    if ((*lease)->is_leader() && server == nullptr) {
      // Recover and bind; retried every interval while it fails (Redis down, or a paused old
      // leader still holding the port).
      auto serving = serve(**store);
      if (serving.ok()) {
        coordinator = std::move(serving->first);
        server = std::move(serving->second);
        last_note.clear();
      } else {
        note(absl::StrCat("leading but cannot serve yet: ", serving.status().message()));
      }
    }
    timespec wait{interval_ms / 1000, (interval_ms % 1000) * 1000000};
    signal = sigtimedwait(&stop_signals, nullptr, &wait);
    if (signal == SIGTERM || signal == SIGINT) break;
    if (signal == SIGHUP && server != nullptr) {
      log("SIGHUP: reloading the key allowlists");
      server->ReloadKeys();
    }
  }
  log(absl::StrCat("stopping (", signal == SIGTERM ? "SIGTERM" : "SIGINT", ")"));
  step_down();
  (void)(*lease)->Release();
  log("stopped");
  return 0;
}
