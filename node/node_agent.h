// NodeAgent: a kiln node's service loop. It registers with the coordinator, heartbeats, takes
// AssignJob/CancelJob, runs jobs on its worker and streams JobProgress/JobResult back, and on
// Stop() drains gracefully and deregisters (../shared/DESIGN.md "Processes",
// common/proto/kiln.proto).
//
// Threads (both owned and joined here):
//  - the I/O thread owns the ZeroMQ DEALER socket (routing id = node id) and everything about the
//    connection (CoordinatorLink): connect + RegisterNode, wait for RegisterAck, heartbeats,
//    dead-coordinator detection after LinkOptions.missed_heartbeats silent intervals, close and
//    reconnect with exponential backoff, re-register. Jobs keep running across reconnects; their
//    results wait until the node is registered again. Malformed or unexpected frames are logged,
//    counted (kiln_protocol_errors_total{socket="coordinator"}) and answered with an ErrorReply.
//  - the worker thread (node/worker.h) runs one job at a time; it talks to the I/O thread only
//    through the Outbox (worker → I/O) and Worker's locked methods (I/O → worker).
//
// Graceful stop (Stop(), e.g. on SIGTERM): jobs assigned but not started and every AssignJob
// arriving from then on are answered with JobResult UNAVAILABLE "node is shutting down" (the
// coordinator requeues them); the running job finishes and its result is sent; then Deregister
// goes out and the I/O thread ends. Results that cannot be delivered (no coordinator) are given
// up after NodeOptions.drain_timeout_ms.
//
// Who calls what: main creates the agent, Start()s it, calls Stop() from its signal loop and
// Wait()s. Stop(), done(), registered_once() and status() are thread-safe.
#pragma once

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/clock.h"
#include "common/proto/kiln.pb.h"
#include "node/catalog.h"
#include "node/coordinator_link.h"
#include "node/node_metrics.h"
#include "node/outbox.h"
#include "node/worker.h"
#include "pipeline/flux_pipeline.h"
#include "prometheus/registry.h"

namespace zmq {
class context_t;
class socket_t;
}  // namespace zmq

namespace kiln::node {

struct NodeOptions {
  std::string node_id;      // routing identity and NodeInfo.node_id: 1..128 of [A-Za-z0-9._:-]
  std::string coordinator;  // the coordinator's node socket: "tcp://HOST:PORT" (ipc://, inproc://)
  std::map<std::string, std::string> models;  // served model name → diffusers-layout repository
  std::string device = "cpu";                 // pipeline device: "cpu", "cuda", "cuda:N"
  std::string precision = "fp32";             // for jobs whose precision is ""
  std::vector<std::string> precisions;        // served precisions; empty = {precision}
  std::vector<pipeline::Resolution> resolutions = pipeline::DefaultResolutions();  // allowed
  std::string package_dir = ".kiln/packages";  // node-local package directory (created)
  int64_t package_dir_max_bytes = 0;           // LRU bound on package_dir in bytes; 0 = none
  std::string shared_cache_dir;                // shared package tier; "" = none
  bool allow_compile = true;                   // false: a package no tier holds fails the job
  std::string compiler_path;  // kiln-compile; "" = beside the running binary
  LinkOptions link;           // heartbeat interval, dead-after count, reconnect backoff
  int64_t drain_timeout_ms = 30000;  // after Stop(): how long results wait for a coordinator
  kiln::v1::DeviceInfo device_info;  // from ProbeDevice() (main); kind filled from device if ""
  std::string metrics_url;           // advertised in NodeInfo; "" = none
  std::string hostname;              // advertised; "" = gethostname()

  absl::Status Validate() const;  // InvalidArgument naming the field
};

class NodeAgent {
 public:
  // Makes one FluxPipeline per served (model, precision), all over one TieredPackageProvider:
  // package_dir → the SharedFsStore on shared_cache_dir (if set) → kiln-compile under the shared
  // store's compile lease (unless !allow_compile); its kiln_artifact_* metrics go to `registry`.
  // Computes the package sets; reads configs and tokenizers only. Connects nothing yet.
  // InvalidArgument for bad options; the pipeline's error (naming the model) for an unusable
  // repository. `registry` must outlive the agent; `clock` null = the system clock.
  static absl::StatusOr<std::unique_ptr<NodeAgent>> Create(NodeOptions options,
                                                           prometheus::Registry& registry,
                                                           const Clock* clock = nullptr);
  // Same with a ready catalog (tests serve fakes); options.models is ignored.
  static absl::StatusOr<std::unique_ptr<NodeAgent>> CreateWithCatalog(
      NodeOptions options, std::unique_ptr<ModelCatalog> catalog, prometheus::Registry& registry,
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
  // "<model>/<precision>/<W>x<H>" → digests, as sent in RegisterNode.
  const std::map<std::string, std::vector<std::string>>& package_sets() const {
    return package_sets_;
  }

 private:
  NodeAgent(NodeOptions options, std::unique_ptr<ModelCatalog> catalog,
            prometheus::Registry& registry, const Clock* clock);

  // I/O thread.
  void IoMain();
  absl::Status IoLoop();
  void Connect();
  void CloseSocket(int linger_ms);
  bool Send(kiln::v1::Envelope env);
  void Receive();
  void Handle(const std::string& frame, size_t frames);
  void OnAssign(const kiln::v1::AssignJob& assign);
  void OnCancel(const kiln::v1::CancelJob& cancel);
  void ProtocolError(const absl::Status& error, const std::string& request_id);
  void Route(kiln::v1::Envelope env);
  void QueueResult(kiln::v1::Envelope env);
  void FlushResults();
  void BeginDrain();
  kiln::v1::Envelope RegisterMessage() const;
  kiln::v1::Envelope HeartbeatMessage() const;

  const NodeOptions options_;
  std::unique_ptr<SystemClock> own_clock_;  // when no clock was given
  const Clock& clock_;
  std::unique_ptr<ModelCatalog> catalog_;
  std::map<std::string, std::vector<std::string>> package_sets_;  // computed once in Create
  NodeMetrics metrics_;
  std::unique_ptr<Outbox> outbox_;
  std::unique_ptr<Worker> worker_;
  std::unique_ptr<zmq::context_t> context_;

  std::atomic<bool> stop_requested_{false};
  std::atomic<bool> abort_{false};
  std::atomic<bool> registered_once_{false};
  std::atomic<bool> done_{false};
  mutable absl::Mutex mu_;
  absl::Status status_ ABSL_GUARDED_BY(mu_);

  // Owned by the I/O thread (touched by no other thread once Start() has run).
  std::unique_ptr<zmq::socket_t> socket_;
  CoordinatorLink link_;
  std::deque<kiln::v1::Envelope> results_;  // JobResults waiting for a registered coordinator
  bool draining_ = false;
  int64_t drain_started_ms_ = 0;
  bool deregistered_ = false;  // Deregister queued: the closing socket lingers to flush it

  std::thread io_thread_;  // runs IoMain(); joined by Wait() / the destructor
  bool started_ = false;
};

// Digests of the packages in a node-local package directory (ROOT/<64 hex>/manifest.json),
// sorted; unreadable or missing directory = none. Temporary and quarantined entries are skipped.
std::vector<std::string> ListPackageDigests(const std::string& package_dir);

}  // namespace kiln::node
