// NodeAgent: a kiln node's service loop, a thin ZeroMQ adapter around NodeSession (the protocol
// logic: registration, heartbeats, jobs, results, drain; node/node_session.h). It owns the worker,
// the outbox between the worker and the I/O thread, the session, and the I/O thread with the
// DEALER socket (routing id = node id): poll the socket and the outbox, decode, call the
// session, send what it says. Frames that are not one decodable Envelope go to the session as
// bad frames (answered and counted there).
//
// Threads (both owned and joined here):
//  - the I/O thread: the only user of the socket and of the session.
//  - the worker thread (node/worker.h) runs one job at a time; it talks to the I/O thread only
//    through the Outbox (worker → I/O) and Worker's locked methods (I/O → worker).
//
// Graceful stop (Stop(), e.g. on SIGTERM): NodeSession::Drain() — jobs not started and every
// later AssignJob are answered UNAVAILABLE, the running job finishes and its result is sent, then
// Deregister (the closing socket lingers to flush it) and the I/O thread ends.
//
// Who calls what: node/node_factory.h creates the agent (tests create it with a fake catalog),
// main Start()s it, calls Stop() from its signal loop and Wait()s. Stop(), done(),
// registered_once() and status() are thread-safe.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "cache/local_disk_store.h"
#include "common/clock.h"
#include "node/catalog.h"
#include "node/node_metrics.h"
#include "node/disk_health.h"
#include "node/health.h"
#include "node/node_options.h"
#include "node/node_session.h"
#include "node/outbox.h"
#include "node/worker.h"
#include "prometheus/registry.h"

namespace kiln::node {

class NodeAgent {
 public:
  // Serves `catalog`; advertises the packages in `packages` (the node-local store, whose owner
  // it keeps alive; null: none). Fills options.hostname (gethostname()) and
  // options.device_info.kind (from options.device) when empty. Connects nothing yet.
  // InvalidArgument for bad options or an empty catalog. `registry` must outlive the agent;
  // `clock` null = the system clock.
  static absl::StatusOr<std::unique_ptr<NodeAgent>> Create(
      NodeOptions options, std::unique_ptr<ModelCatalog> catalog,
      std::shared_ptr<const cache::LocalDiskStore> packages, prometheus::Registry& registry,
      const Clock* clock = nullptr);

  // Abandons the connection at once and cancels a running job (Stop() + Wait() is the graceful
  // way), then joins both threads.
  ~NodeAgent();
  NodeAgent(const NodeAgent&) = delete;
  NodeAgent& operator=(const NodeAgent&) = delete;

  // Starts the worker and I/O threads. Once.
  absl::Status Start();
  // Graceful stop (see the file comment); returns at once. Idempotent, any thread.
  void Stop();
  // Blocks until the I/O thread has ended (after Stop(), or a fatal socket error), joins both
  // threads.
  void Wait();

  bool done() const { return done_.load(); }
  // True once the first RegisterAck has arrived.
  bool registered_once() const { return registered_once_.load(); }
  // Why the I/O thread ended: OK after a graceful stop; the socket error otherwise.
  absl::Status status() const;

  const NodeOptions& options() const { return options_; }
  // The package directory's health (node/disk_health.h): readiness includes it.
  // Not OK: the one line people read (what, where, what to do).
  absl::Status disk_status() const {
    const absl::Status s = disk_->status();
    return s.ok() ? s : absl::Status(s.code(), disk_->reason());
  }
  // disk_status(), and once that is OK the generators' health (a multi-GPU node's rank group
  // that failed: node/health.h GeneratorsReason): readiness includes it. Any thread.
  absl::Status health_status() const {
    const absl::Status disk = disk_status();
    if (!disk.ok()) return disk;
    const std::string reason = GeneratorsReason(catalog_->UnhealthyGenerators());
    return reason.empty() ? absl::OkStatus() : absl::UnavailableError(reason);
  }
  // "<model>/<precision>/<W>x<H>" → digests, as sent in RegisterNode.
  const std::map<std::string, std::vector<std::string>>& package_sets() const {
    return session_->package_sets();
  }

 private:
  class Channel;  // CoordinatorChannel over the DEALER socket

  NodeAgent(NodeOptions options, std::unique_ptr<ModelCatalog> catalog,
            std::shared_ptr<const cache::LocalDiskStore> packages,
            prometheus::Registry& registry, const Clock* clock);

  // I/O thread.
  void IoMain();
  void IoLoop();
  void Receive();

  const NodeOptions options_;
  std::unique_ptr<SystemClock> own_clock_;  // when no clock was given
  const Clock& clock_;
  std::unique_ptr<ModelCatalog> catalog_;
  std::shared_ptr<const cache::LocalDiskStore> packages_;
  NodeMetrics metrics_;
  std::unique_ptr<DiskHealth> disk_;       // probes package_dir; its thread joined on destruction
  std::unique_ptr<Outbox> outbox_;
  std::unique_ptr<Worker> worker_;
  std::unique_ptr<Channel> channel_;       // owns the ZeroMQ context and socket
  std::unique_ptr<NodeSession> session_;   // I/O thread only once Start() has run

  std::atomic<bool> stop_requested_{false};
  std::atomic<bool> abort_{false};
  std::atomic<bool> registered_once_{false};
  std::atomic<bool> done_{false};
  mutable absl::Mutex mu_;
  absl::Status status_ ABSL_GUARDED_BY(mu_);

  std::thread io_thread_;  // runs IoMain(); joined by Wait() / the destructor
  bool started_ = false;
};

}  // namespace kiln::node
