// Coordinator: kiln's job queue, node table and placement, as a plain class. No sockets and no
// threads: CoordinatorServer (or a test) calls it with decoded messages, and it reads time only
// from the injected Clock. Replies to a request are return values; everything else it has to say
// (AssignJob / CancelJob / Heartbeat to nodes, Wait replies and progress to clients) is queued as
// Outgoing messages that the caller collects with TakeOutgoing() after each call and sends.
//
// Job lifecycle: Submit → QUEUED → (placed) RUNNING → SUCCEEDED | FAILED, or CANCELLED at any
// point before it finishes. A RUNNING job whose node dies (no message for
// dead_after_missed_heartbeats intervals), deregisters, stops listing it in its heartbeats (e.g.
// restarted under the same id), or fails it with a retryable code (UNAVAILABLE,
// RESOURCE_EXHAUSTED, ABORTED) goes
// back to the queue; once it has been assigned max_attempts times it FAILS with that reason.
// A QUEUED job whose deadline passes FAILS with DEADLINE_EXCEEDED.
//
// JobInfo.error holds "<CODE>: <why>" for FAILED and CANCELLED jobs, and "waiting: <why>" for a
// QUEUED job that is not placed at once (the nodes that can run it are busy, draining or dead,
// no node has registered yet, or it was requeued after a node loss); a change of the reason is
// streamed to clients that wait with stream_progress. Clients must look at JobInfo.state, not
// at whether error is set. JobInfo.phase says what the job does now: "queued", "assigned", then
// the node's JobProgress.phase.
//
// Thread-compatible: one thread calls it (the server's poll thread).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/clock.h"
#include "common/proto/kiln.pb.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/job_store.h"
#include "coordinator/placement.h"
#include "coordinator/validation.h"

namespace kiln::coordinator {

struct CoordinatorOptions {
  int64_t heartbeat_interval_ms = 1000;  // ms; told to nodes in RegisterAck, and how often the
                                         // coordinator heartbeats each node
  int dead_after_missed_heartbeats = 3;  // intervals of silence after which a node is dead; also
                                         // how long a node may omit an assigned job from its
                                         // heartbeats before the job counts as lost
  uint32_t max_attempts = 3;             // assignments per job; a job lost more often fails
  int max_jobs_per_node = 1;             // jobs a node runs at once (its running slots); a node
                                         // may hold more (NodeInfo.job_slots: the next ones
                                         // prefetched), one that declares none holds this many
  uint32_t max_job_slots_per_node = 8;   // NodeInfo.job_slots a node may declare
  SpecLimits limits;                     // what Submit accepts
  size_t max_pending_waits = 10000;      // Wait requests held at once; more: RESOURCE_EXHAUSTED
  size_t max_queued_jobs = 100000;       // jobs waiting for a node; more: RESOURCE_EXHAUSTED
  size_t max_nodes = 1024;               // node table size; DEAD/LEFT entries are evicted first
  CostModelOptions costs;                // priors of placement's expected run and cold-start times
  PlacementPolicy placement = PlacementPolicy::kExpectedFinish;  // others: baselines for bench/
  size_t max_waits_per_client = 1000;   // Wait requests one client (key, or routing id over
                                         // plaintext) holds at once; more evict its oldest
  size_t max_queued_jobs_per_client = 10000;  // queued jobs one client key may have
  int64_t max_wait_timeout_ms = 600000;  // ms; a longer WaitRequest.timeout_ms is cut to this
  size_t max_package_sets_per_node = 256;     // package_sets entries a node may declare
  size_t max_digests_per_package_set = 64;    // digests in one package set
  // Run timeout: a RUNNING job with no result after max(run_timeout_min_ms, run_timeout_factor x
  // its expected cold start + run time (CostModel)) is requeued and its node marked suspect
  // (DRAINING: no new jobs until an admin undrains or it registers again). 0: no timeout.
  double run_timeout_factor = 4.0;
  int64_t run_timeout_min_ms = 600000;
  size_t placement_lookahead = 512;      // queued jobs one placement pass looks at, at most (the
                                         // head of the queue; bounds a pass at a deep queue)
  // Jobs with JobSpec.priority >= this are latency-critical: placed where they are expected to
  // finish first. Others are throughput work: ranked by expected finish x the node's GPUs
  // (DeviceInfo.gpu_count), so a multi-GPU node spends its GPUs on them only when that still
  // pays (single-GPU nodes busy long enough). Identical when every node has one GPU.
  int32_t latency_priority = 1;
  bool placement_full_scan = false;      // each pass puts every capable node of a job kind in
                                         // its heaps at once (the reference the default scan,
                                         // which stops where no later node can win, is tested
                                         // against; same placements, slower at fleet size)

  // InvalidArgument naming the bad field.
  absl::Status Validate() const;
};

// Where an asynchronous reply to a client goes. `peer` is opaque to the coordinator (the
// transport's return address); `request_id` is echoed in each reply.
struct ReplyTo {
  std::string peer;
  std::string request_id;
};

// Who sends a client request, as the transport authenticated it. The default (empty key, admin)
// is the plaintext development mode: everyone may do everything.
struct Caller {
  std::string key;     // the client's CURVE public key (Z85); recorded as JobInfo.owner
  bool admin = true;   // may read, wait for and cancel every job
};

// A message the coordinator wants sent.
struct Outgoing {
  enum class Socket { kNode, kClient };
  Socket socket = Socket::kNode;
  std::string peer;  // kNode: the node id; kClient: ReplyTo::peer
  kiln::v1::Envelope envelope;
};

// Receives one human-readable line per notable event (node registered/dead, job done/failed).
// Null: the process log (common/log.h, component "coordinator"); tests pass one to capture lines.
using EventLog = std::function<void(const std::string& line)>;

class Coordinator {
 public:
  // Validates `options` and rebuilds the queue and assignments from `store`: QUEUED jobs are
  // queued again; RUNNING ones stay assigned to their node, which keeps them if it registers again
  // and lists them in its heartbeats within dead_after_missed_heartbeats intervals (its result is
  // accepted, even one sent before it registers again); otherwise they are requeued. The
  // references must outlive it.
  static absl::StatusOr<std::unique_ptr<Coordinator>> Create(const CoordinatorOptions& options,
                                                             JobStore& store, const Clock& clock,
                                                             CoordinatorMetrics& metrics,
                                                             EventLog log = nullptr);

  // ---- Client requests. Errors carry the most specific code; INVALID_ARGUMENT ones name the
  // field (ErrorField(status)).

  // InvalidArgument for a bad field (or a deadline already past); AlreadyExists when job_id
  // exists with a different spec; FailedPrecondition when no registered node could ever run it
  // (CheckAnyServes: the message names what is missing and what the cluster serves). A node is
  // registered while it is in the node table and has not deregistered: READY, DRAINING, or DEAD
  // (a dead node may come back; `remove-node` forgets it). With no registered node at all (a
  // cluster starting, or scaled to zero) the job is accepted and waits ("waiting: no node has
  // registered yet"). A repeated job_id with the same spec returns the existing job with
  // created=false. With a non-admin caller: PermissionDenied when job_id exists and belongs to
  // another key; ResourceExhausted past max_queued_jobs_per_client.
  absl::StatusOr<kiln::v1::JobReply> Submit(const kiln::v1::SubmitRequest& request,
                                            const Caller& caller = {});
  // Group commit: the replies (in order) that Submit would give each request in turn, with the
  // new jobs written to the store in one JobStore::CreateMany (RedisJobStore: one script, one
  // fsync) and one placement pass after. Nothing is acknowledged before the store holds it: a
  // failed write answers UNAVAILABLE to every request that needed it. The server loop calls this
  // with the Submits that arrive together.
  // callers[i] is request i's caller (missing entries: the default Caller).
  std::vector<absl::StatusOr<kiln::v1::JobReply>> SubmitBatch(
      const std::vector<const kiln::v1::SubmitRequest*>& requests,
      const std::vector<Caller>& callers = {});
  // NotFound for an unknown job. The PNG only when include_png.
  // Status, Wait, Cancel: PermissionDenied for a non-admin caller that does not own the job.
  absl::StatusOr<kiln::v1::JobReply> Status(const kiln::v1::StatusRequest& request,
                                            const Caller& caller = {});
  // A reply to send now: final when the job is finished or timeout_ms is 0; not final (the
  // current state) when stream_progress is set. nullopt: nothing now. While the wait is pending,
  // replies go to `reply_to` as Outgoing: non-final ones on every state change and progress event
  // when stream_progress is set, then a final one when the job finishes or the timeout passes.
  // NotFound for an unknown job; ResourceExhausted when max_pending_waits are pending.
  // timeout_ms is capped at max_wait_timeout_ms. A client's wait past max_waits_per_client
  // evicts its oldest one (answered with the job's current state, final = false).
  absl::StatusOr<std::optional<kiln::v1::JobReply>> Wait(const kiln::v1::WaitRequest& request,
                                                         const ReplyTo& reply_to,
                                                         const Caller& caller = {});
  // The connection behind `peer` (a ReplyTo::peer) is gone: drops its pending waits without an
  // answer (nobody could receive one), so they no longer count against its client's cap nor
  // max_pending_waits. Counted in kiln_coordinator_waits_dropped_total{reason="client_gone"}.
  // Returns how many were dropped. The transport calls it (CoordinatorServer: from its client
  // socket's disconnect events); waits of the same client key on other connections stay.
  size_t DropWaitsOf(const std::string& peer);
  // QUEUED → CANCELLED at once; RUNNING → CancelJob to its node and CANCELLED (the node's
  // slot is freed when it reports back or is found gone). Cancelling a CANCELLED job returns it;
  // a SUCCEEDED or FAILED one is FailedPrecondition. NotFound for an unknown job.
  absl::StatusOr<kiln::v1::JobReply> Cancel(const kiln::v1::CancelRequest& request,
                                            const Caller& caller = {});
  kiln::v1::ListNodesReply ListNodes() const;
  // The node takes no new jobs (NODE_STATE_DRAINING); its running job finishes. Idempotent.
  // NotFound for an unknown node; FailedPrecondition for a dead or departed one.
  absl::StatusOr<kiln::v1::DrainReply> Drain(const kiln::v1::DrainRequest& request);
  // Undoes Drain: a DRAINING node is READY again and placement runs. Idempotent. NotFound for an
  // unknown node; FailedPrecondition for a dead or departed one.
  absl::StatusOr<kiln::v1::UncordonReply> Uncordon(const kiln::v1::UncordonRequest& request);
  // Forgets a node (any state): it leaves the node table, the placement index and the cost
  // model. FailedPrecondition while jobs run on it, unless force: then they are requeued (an
  // attempt each, as after a node loss) and the node is told to cancel them. Queued jobs that
  // no registered node can run any more then fail (as after Deregister). A node process still
  // running is told "not registered" at its next message and registers again. NotFound for an
  // unknown node.
  absl::StatusOr<kiln::v1::RemoveNodeReply> RemoveNode(const kiln::v1::RemoveNodeRequest& request);

  // ---- Node messages. `node_id` is the sender's routing identity. An error is answered to the
  // node with an ErrorReply; FailedPrecondition "not registered" tells it to register again.

  // Adds or refreshes the node (READY). A node that registers again keeps its assignments until
  // a heartbeat shows it no longer runs them. InvalidArgument naming the field for a bad
  // NodeInfo; ResourceExhausted when the node table is full of live nodes.
  absl::StatusOr<kiln::v1::RegisterAck> RegisterNode(const std::string& node_id,
                                                     const kiln::v1::RegisterNode& message);
  absl::Status Heartbeat(const std::string& node_id, const kiln::v1::Heartbeat& message);
  absl::Status Progress(const std::string& node_id, const kiln::v1::JobProgress& message);
  // A result from a node that no longer holds the job (or a failure for another attempt) is
  // ignored, counted in kiln_node_stale_messages_total and OK.
  absl::Status Result(const std::string& node_id, const kiln::v1::JobResult& message);
  absl::Status Deregister(const std::string& node_id, const kiln::v1::Deregister& message);

  // Time-driven work, due at clock.NowMs(): heartbeats to nodes, dead nodes, queued jobs past
  // their deadline, wait timeouts. Call it often (every few tens of ms); it is cheap when idle.
  void Tick();

  // Messages produced since the last call, in order.
  std::vector<Outgoing> TakeOutgoing();

  const CoordinatorOptions& options() const { return options_; }
  // What placement has learned (run times per device class and job kind, cold starts per node).
  const CostModel& costs() const { return costs_; }
  size_t queue_depth() const { return queue_.size(); }
  // The queued jobs' specs in queue order (priority, then submit order), from memory: what the
  // status board reads instead of listing every queued job in the store each second. At most
  // `max` when max > 0.
  std::vector<kiln::v1::JobSpec> QueuedSpecs(size_t max = 0) const;
  size_t pending_waits() const { return waits_.size(); }
  // True while `node_id` is registered and READY or DRAINING (the transport keeps a live node's
  // id bound to the key it registered with).
  bool NodeIsLive(const std::string& node_id) const;

 private:
  struct NodeRecord {
    kiln::v1::NodeInfo info;
    kiln::v1::NodeState state = kiln::v1::NODE_STATE_READY;
    int64_t last_seen_ms = 0;       // monotonic
    int64_t last_seen_unix_ms = 0;
    int64_t last_assigned_ms = 0;   // monotonic; 0 = never
    uint32_t jobs_done = 0;
    std::set<std::string> jobs;     // assigned to it and not yet released
    bool suspect = false;           // a job of it passed its run timeout (drained for that)
    std::string device_class;       // DeviceClass(info.device()): whose run times it shares
    // Heartbeat.unhealthy: why the node takes no job now (its disk is full or read-only); nothing
    // is placed on it while set. "" = healthy.
    std::string unhealthy;
  };
  // The in-memory side of a job that is queued, running, or cancelled while still on a node.
  struct ActiveJob {
    kiln::v1::JobSpec spec;
    uint64_t seq = 0;               // submit order, for the queue
    int64_t submitted_ms = 0;       // monotonic
    int64_t enqueued_ms = 0;        // monotonic: submit or last requeue
    int64_t assigned_ms = 0;        // monotonic: last assignment
    std::string node_id;            // assignee while running; "" while queued
    uint32_t attempt = 0;           // attempt number of the current assignment
    bool cancelled = false;         // cancelled while on node_id; the slot is still taken
    std::string waiting_reason;     // last "waiting: ..." written to the store
    std::string kind;               // PackageSetKey of the spec: what placement indexes by
    int64_t expected_end_ms = 0;    // monotonic: assigned_ms + expected cold start and run
    // Its node reported it denoising or decoding (JobProgress.phase): it can no longer join a
    // batch there. False while queued or assigned and not yet started.
    bool denoising = false;
    std::string owner;              // JobInfo.owner: the submitting client's key
  };
  // Queue order: higher priority first, then submit order.
  using QueueKey = std::tuple<int64_t, uint64_t, std::string>;  // (-priority, seq, job_id)
  struct PendingWait {
    std::string job_id;
    ReplyTo reply_to;
    int64_t deadline_ms = 0;  // monotonic
    bool include_png = false;
    bool stream = false;
    std::string client;       // Caller key, or reply_to.peer over plaintext: whose cap it counts
  };

  Coordinator(const CoordinatorOptions& options, JobStore& store, const Clock& clock,
              CoordinatorMetrics& metrics, EventLog log);
  absl::Status Recover();
  // Queues a QUEUED job the store holds but this coordinator does not (a Create whose reply was
  // lost during a Redis outage, then submitted again).
  void Adopt(const kiln::v1::JobInfo& job);
  // Submit's pieces, shared with SubmitBatch. DuplicateReply: the reply to a Submit of a job_id
  // that exists (created=false, or ALREADY_EXISTS naming the first differing field). Admit: the
  // checks a new job passes before it is stored, with `pending` more jobs about to be queued.
  // NotAccepted: a store error as the client sees it (UNAVAILABLE when it may try again).
  // CountRejected: counts a refused Submit and returns its status.
  absl::StatusOr<kiln::v1::JobReply> DuplicateReply(const kiln::v1::JobSpec& spec,
                                                    const kiln::v1::JobInfo& existing,
                                                    const Caller& caller);
  absl::Status Admit(const kiln::v1::JobSpec& spec, size_t pending, const Caller& caller,
                     size_t pending_of_caller);
  absl::Status NotAccepted(const kiln::v1::JobSpec& spec, const absl::Status& s);
  absl::Status CountRejected(absl::Status s);
  // Queues a job just created in the store.
  void EnqueueCreated(const kiln::v1::JobSpec& spec, const std::string& owner);

  // Queue and placement. PlaceJobs() does nothing unless placement_dirty_. It walks the queue in
  // order and gives each job the READY node where it is expected to finish first (the node's
  // wait for a slot + the job's cold start there + its run time on that device class); a job
  // whose best node is busy stays queued and that node's expected wait grows by it, so the jobs
  // behind it see the node as it will be. Nodes are found through index_ by job kind and kept
  // per run-time class in heaps ordered by (wait + cold start). A kind's heaps are filled
  // lazily: each class's READY nodes are kept ordered by when a slot frees (the view below),
  // and each kind scans that order in three streams by its warmth there (loaded, local disk,
  // cold) only until no node further on can beat the best found (its wait, plus the least cold
  // start of the stream's tier, plus the class's run time, is already worse), so a kind costs
  // the nodes near the front, not every capable node. Placing one job costs
  // O(classes × log scanned) after that.
  void Enqueue(const std::string& job_id, ActiveJob& job);
  void Dequeue(const std::string& job_id, const ActiveJob& job);
  void PlaceJobs();
  // Placement's view of the READY nodes, kept between passes so that a pass does not walk the
  // node table: per node (by NodeIndex slot) its run-time class, free slots and its running
  // jobs' expected ends, and per class the nodes ordered by when a slot frees (free nodes first,
  // then by the earliest expected end, in absolute time, so the order holds as time passes).
  // Every change of a node's state, health, registration or jobs marks it
  // (MarkPlacementNode); a pass re-reads the marked nodes first (RefreshPlacementView). With
  // placement_full_scan the view is rebuilt from the node table every pass: the reference the
  // incremental one is tested against.
  void MarkPlacementNode(const std::string& node_id);
  void RefreshPlacementView();
  // Jobs `node` holds at once: NodeInfo.job_slots, or max_jobs_per_node for a node that
  // declares none. Placement gives it jobs while it holds fewer (its free slots).
  int JobSlots(const NodeRecord& node) const;
  // Jobs it runs at once: min(max_jobs_per_node, JobSlots). The rest of its slots are prefetch:
  // a job there waits for a running slot, and placement counts that wait.
  int RunningSlots(const NodeRecord& node) const;
  bool Assign(const std::string& job_id, ActiveJob& job, NodeRecord& node, double expected_s);
  // Writes `reason` ("" or "waiting: ...") as the job's error unless it was requeued.
  void SetWaitingReason(const std::string& job_id, ActiveJob& job, const std::string& reason);
  // Why no ready node can run `spec`: "waiting: no node has registered yet", "waiting: the
  // nodes that can run it are draining (n1) or dead (n2)", "waiting: no node is ready",
  // "waiting: no ready node can run it (...)", or when a ready node can: "waiting: the nodes
  // that can run it are busy".
  std::string WaitingReasonFor(const kiln::v1::JobSpec& spec) const;
  // Rewrites the waiting reason of the queued jobs a placement pass looks at (when nodes change
  // state in ways a pass may not notice: a pass stops early when no node has a free slot).
  void RefreshWaitingReasons();
  // The registered nodes (in the table and not LEFT), whose capabilities Submit checks.
  std::vector<const kiln::v1::NodeInfo*> RegisteredNodes() const;
  // OK when some registered node could run `spec` (NodeIndex::Capable, else CheckServes), or
  // none is registered; else CheckAnyServes's FailedPrecondition.
  absl::Status CheckServable(const kiln::v1::JobSpec& spec);
  // After a node left the registered set (deregistered, removed): fails the queued jobs that no
  // registered node can run any more with FAILED_PRECONDITION.
  void FailUnservableQueued();

  // Transitions.
  // Frees `job_id` from its node and requeues it, or after max_attempts fails it with
  // "<code>: <why> (<n> attempts)".
  void RequeueOrFail(const std::string& job_id, const std::string& code, const std::string& why);
  // Ends a job (SUCCEEDED, FAILED or CANCELLED) and answers its waits. `mutate` fills in the
  // outcome. Keeps the ActiveJob only if it was cancelled while a node still runs it.
  // False (nothing changed, logged and counted) when the store refused the write.
  bool Finish(const std::string& job_id, kiln::v1::JobState state, const std::string& error,
              const std::function<void(kiln::v1::JobInfo&)>& mutate = nullptr);
  void ReleaseFromNode(const std::string& job_id, ActiveJob& job);
  // A result from `node_id` (null `node`: not registered again yet after a restart).
  absl::Status ApplyResult(NodeRecord* node, const std::string& node_id,
                           const kiln::v1::JobResult& message);
  // Requeues (or fails) the recovered running jobs whose nodes did not register in time.
  void RequeueUnclaimed();
  void NodeLost(NodeRecord& node, kiln::v1::NodeState new_state, const std::string& why);

  // Waits.
  void NotifyWaiters(const kiln::v1::JobInfo& job, bool final);
  // Answers wait `id` with its job as the store has it now (final; an error if the job is gone)
  // and drops it: a wait past its deadline, or a client's oldest beyond its cap.
  void AnswerWait(uint64_t id);
  void EraseWait(uint64_t id);
  // PermissionDenied unless `caller` is admin or owns `job`.
  static absl::Status CheckOwner(const Caller& caller, const kiln::v1::JobInfo& job);
  // Requeues running jobs past their run timeout and marks their nodes suspect.
  void CheckRunTimeouts(int64_t now);
  kiln::v1::Envelope JobReplyEnvelope(const std::string& request_id, kiln::v1::JobInfo job,
                                      bool include_png, bool final) const;

  // Nodes.
  NodeRecord* FindNode(const std::string& node_id);
  absl::StatusOr<NodeRecord*> LiveNode(const std::string& node_id);
  kiln::v1::NodeStatus NodeStatusOf(const NodeRecord& node) const;
  void MakeRoomForNode();
  void UpdateNodeGauges();

  void SendToNode(const std::string& node_id, kiln::v1::Envelope env);
  void Log(const std::string& line);
  double SecondsSince(int64_t ms) const { return (clock_.NowMs() - ms) / 1000.0; }

  const CoordinatorOptions options_;
  JobStore& store_;
  const Clock& clock_;
  CoordinatorMetrics& metrics_;
  EventLog log_;

  std::map<std::string, NodeRecord> nodes_;                 // by node id, for stable listings
  absl::flat_hash_map<std::string, ActiveJob> active_;     // by job id
  std::set<QueueKey> queue_;
  std::set<std::pair<int64_t, std::string>> deadlines_;     // (deadline unix ms, job id), queued
  // Recovered RUNNING jobs (Create with a store) by the node they ran on, until that node
  // registers again (it claims them) or unclaimed_deadline_ms_ passes (they are requeued).
  std::map<std::string, std::set<std::string>> unclaimed_;
  int64_t unclaimed_deadline_ms_ = 0;  // monotonic
  uint64_t next_seq_ = 0;
  int64_t next_heartbeat_ms_ = 0;
  bool placement_dirty_ = false;  // something changed that may let a queued job be placed
  bool jobs_held_ = false;        // the last pass kept a job queued for a busy node
  int64_t next_held_pass_ms_ = 0; // monotonic: when Tick runs a pass again for held jobs
  CostModel costs_;
  NodeIndex index_;
  std::string round_robin_last_;  // kRoundRobin: the node id given the last job
  struct ViewNode {
    NodeRecord* node = nullptr;  // null: no READY healthy node in this slot
    uint32_t cls = 0;            // into view_classes_
    int free = 0;                // free slots: JobSlots − jobs held
    int running = 1;             // RunningSlots
    bool volatile_end = false;   // a job's end is estimated from the cost model: re-read each pass
    absl::InlinedVector<double, 2> ends;  // running jobs' expected ends (monotonic ms)
    double order_key = 0;        // when a running slot frees: -inf while one is free, else
                                 // the earliest of the latest `running` ends
  };
  struct ViewClass {
    std::string device_class;
    kiln::v1::DeviceInfo device;   // kind and SM count: what CostModel::Run's prior reads
    double gpus = 1;               // GpuCount(device): throughput work's cost factor
    std::vector<uint32_t> order;   // slots by (order_key, slot)
  };
  std::vector<ViewNode> view_;                               // by NodeIndex slot
  std::vector<ViewClass> view_classes_;                      // never shrinks
  absl::flat_hash_map<std::string, uint32_t> view_class_ids_;  // "class|kind|sms" → index
  absl::flat_hash_map<std::string, uint32_t> view_slot_;    // node id → slot, nodes in view_
  absl::flat_hash_set<std::string> view_marked_;            // nodes to re-read
  absl::flat_hash_set<std::string> view_volatile_;          // nodes re-read every pass
  int view_free_total_ = 0;

  std::map<uint64_t, PendingWait> waits_;
  std::multimap<std::string, uint64_t> waits_by_job_;
  std::map<std::string, std::set<uint64_t>> waits_by_client_;   // PendingWait.client → ids
  std::map<std::string, std::set<uint64_t>> waits_by_peer_;     // ReplyTo::peer → ids
  std::map<std::string, size_t> queued_by_owner_;               // owner key → queued jobs
  int64_t next_run_timeout_check_ms_ = 0;
  std::set<std::pair<int64_t, uint64_t>> waits_by_deadline_;
  uint64_t next_wait_id_ = 1;

  std::vector<Outgoing> outgoing_;
};

}  // namespace kiln::coordinator
