// NodeSession: a kiln node's side of the coordinator protocol, as a plain class. No sockets and
// no threads: NodeAgent (or a test) hands it decoded Envelopes and calls Tick(); it reads time
// only from the injected Clock and does its socket work through a CoordinatorChannel (connect,
// send, close). The coordinator has the same shape (coordinator/coordinator.h + its server).
//
// What it owns:
//  - the link state (CoordinatorLink): connect and send RegisterNode, wait for RegisterAck,
//    heartbeat, declare the coordinator dead after LinkOptions.missed_heartbeats silent intervals,
//    close and reconnect with backoff to the next of NodeOptions.coordinator's endpoints (a comma
//    list: an active coordinator and its standbys), register again (also when the coordinator answers
//    FAILED_PRECONDITION "not registered", or refuses a registration).
//  - the results outbox: JobResults wait here until a registered coordinator has taken them
//    (a result leaves only once the channel accepted it), across reconnects. Results go out
//    before any heartbeat that no longer lists their job. Progress is only sent while registered.
//  - AssignJob / CancelJob: the spec is planned against the ModelCatalog (a bad one is answered
//    with a JobResult INVALID_ARGUMENT naming the field) and queued on the JobRunner.
//  - RegisterNode and Heartbeat contents: models, package sets, on-disk packages (from the
//    node-local LocalDiskStore's listing), loaded packages, running jobs.
//  - the generators' health (Generator::Health: a multi-GPU node's rank group whose collective
//    failed): heartbeats carry the reason naming the group and the failure (one goes out before
//    any result it explains), AssignJob for that model and precision is answered UNAVAILABLE
//    (the coordinator requeues it elsewhere), and each failure is logged and counted once.
//  - the graceful drain (Drain()): heartbeats carry Heartbeat.unhealthy "node is shutting down"
//    (one goes out first, so the coordinator places nothing more here); jobs not started (queued,
//    prefetched or being encoded: JobRunner::TakeQueued) and every later AssignJob are answered
//    UNAVAILABLE "node is shutting down" (the coordinator requeues them elsewhere at once); the
//    job denoising finishes; once the runner is idle and every result delivered,
//    Deregister goes out and the session is finished; results no coordinator takes are given up
//    after NodeOptions.drain_timeout_ms.
// Bad frames (the agent could not decode them) and messages not meant for a node are logged,
// counted in kiln_protocol_errors_total{socket="coordinator"} and answered with an ErrorReply;
// an ErrorReply is never answered.
//
// Thread-compatible: one thread calls it (the agent's I/O thread). The JobRunner and Outbox it
// uses are thread-safe and shared with the worker thread.
#pragma once

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/clock.h"
#include "common/proto/kiln.pb.h"
#include "node/catalog.h"
#include "node/coordinator_link.h"
#include "node/disk_health.h"
#include "node/job_runner.h"
#include "node/node_metrics.h"
#include "node/node_options.h"
#include "node/outbox.h"

namespace kiln::cache {
class LocalDiskStore;
}  // namespace kiln::cache

namespace kiln::node {

// The transport as the session sees it: one connection to the coordinator at a time.
// NodeAgent implements it over a ZeroMQ DEALER; tests record what is sent.
class CoordinatorChannel {
 public:
  virtual ~CoordinatorChannel() = default;
  // Opens a fresh connection to `endpoint` (the previous one is closed).
  virtual void Connect(const std::string& endpoint) = 0;
  // Closes the connection and drops whatever it still queues.
  virtual void Disconnect() = 0;
  // Queues `env` for the coordinator without blocking. False when nothing is connected or the
  // send queue is full: the message was not taken.
  virtual bool Send(const kiln::v1::Envelope& env) = 0;
};

// Receives one human-readable line per notable event (registered, job assigned, reconnecting).
using NodeLog = std::function<void(const std::string& line)>;

class NodeSession {
 public:
  // Every reference must outlive the session. `packages` is the node-local package store whose
  // listing is advertised (null: none). `options` must be valid (NodeOptions::Validate) and name
  // the hostname and device kind to advertise.
  NodeSession(const NodeOptions& options, const ModelCatalog& catalog, JobRunner& jobs,
              Outbox& from_worker, const cache::LocalDiskStore* packages, NodeMetrics& metrics,
              const Clock& clock, CoordinatorChannel& channel, NodeLog log = nullptr);
  NodeSession(const NodeSession&) = delete;
  NodeSession& operator=(const NodeSession&) = delete;

  // Time- and worker-driven work due at clock.NowMs(): connect (and register) when due, route
  // the worker's progress and results, deliver held results, finish a drain, heartbeat, declare
  // a silent coordinator dead. Call it before every wait and after every message.
  void Tick();

  // A decoded message from the coordinator.
  void OnMessage(const kiln::v1::Envelope& env);
  // Something arrived that is not one decodable Envelope; `error` says what (InvalidArgument).
  void OnBadFrame(const absl::Status& error);

  // Starts the graceful drain (see the file comment). Idempotent.
  void Drain();

  // The drain is complete (or gave up): nothing more will be sent; the agent closes the channel.
  bool finished() const { return finished_; }
  // A Deregister was handed to the channel (a closing socket should linger to flush it).
  bool deregistered() const { return deregistered_; }
  // True once the first RegisterAck has arrived.
  bool registered_once() const { return registered_once_; }
  bool draining() const { return draining_; }
  const CoordinatorLink& link() const { return link_; }
  // Milliseconds until Tick() has time-driven work (the poll timeout), >= 0.
  int64_t MsUntilNextEvent() const { return link_.MsUntilNextEvent(); }
  // JobResults waiting for a registered coordinator.
  size_t held_results() const { return results_.size(); }

  // "<model>/<precision>/<W>x<H>" → digests, as sent in RegisterNode (computed once).
  const std::map<std::string, std::vector<std::string>>& package_sets() const {
    return package_sets_;
  }
  kiln::v1::Envelope RegisterMessage() const;
  kiln::v1::Envelope HeartbeatMessage() const;

  // The node's disk health (null: not checked; must outlive the session). While its directory
  // cannot be written, heartbeats carry the reason (the coordinator places nothing here), a
  // changed reason goes out in a heartbeat before any result, and AssignJob is answered with the
  // disk's code (the coordinator requeues it elsewhere).
  void set_disk_health(const DiskHealth* disk) { disk_ = disk; }

 private:
  void SendHeartbeat();
  void Connect();
  void OnAssign(const kiln::v1::AssignJob& assign);
  void OnCancel(const kiln::v1::CancelJob& cancel);
  void OnError(const kiln::v1::ErrorReply& error);
  void ProtocolError(const absl::Status& error, const std::string& request_id);
  // Routes what the worker queued: results to the outbox, progress out (while registered).
  void RouteFromWorker();
  void QueueResult(kiln::v1::Envelope env);
  void FlushResults();
  void FinishDrain();
  std::vector<std::string> DiskPackages() const;
  // Heartbeat.unhealthy: "node is shutting down" while draining, else the disk's reason, else
  // the generators that can run no more jobs (node/health.h GeneratorsReason; "" = healthy).
  std::string UnhealthyReason() const;
  // Logs and counts (kiln_node_rank_group_failures_total) each generator seen unhealthy for
  // the first time.
  void NoteUnhealthyGenerators();
  void Log(const std::string& line) const;

  const NodeOptions& options_;
  const ModelCatalog& catalog_;
  JobRunner& jobs_;
  Outbox& from_worker_;
  const cache::LocalDiskStore* packages_;
  NodeMetrics& metrics_;
  const Clock& clock_;
  CoordinatorChannel& channel_;
  NodeLog log_;
  const std::map<std::string, std::vector<std::string>> package_sets_;

  const DiskHealth* disk_ = nullptr;
  std::string unhealthy_sent_;  // Heartbeat.unhealthy of the last heartbeat sent
  std::set<std::string> failed_generators_;  // "<model>/<precision>" already logged and counted

  CoordinatorLink link_;
  std::deque<kiln::v1::Envelope> results_;  // JobResults waiting for a registered coordinator
  bool registered_once_ = false;
  bool draining_ = false;
  int64_t drain_started_ms_ = 0;
  bool finished_ = false;
  bool deregistered_ = false;
};

}  // namespace kiln::node
