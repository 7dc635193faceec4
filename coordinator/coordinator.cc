#include "coordinator/coordinator.h"

#include <algorithm>
#include <array>
#include <functional>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/container/inlined_vector.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/job_state.h"
#include "common/log.h"
#include "common/wire.h"
#include "coordinator/placement.h"

namespace kiln::coordinator {
namespace {

using kiln::v1::JobInfo;
using kiln::v1::JobState;
using kiln::v1::NodeState;

constexpr char kRequeuedPrefix[] = "waiting: requeued";
// A queued job whose best node (or every capable one) has no free slot now.
constexpr char kBusyReason[] = "waiting: the nodes that can run it are busy";

// "queued", "succeeded", ...: the state name for messages to people.
std::string StateName(JobState s) { return absl::AsciiStrToLower(kiln::JobStateName(s)); }

bool IsRetryableNodeError(const std::string& code) {
  return code == "UNAVAILABLE" || code == "RESOURCE_EXHAUSTED" || code == "ABORTED";
}

bool IsLive(NodeState s) {
  return s == kiln::v1::NODE_STATE_READY || s == kiln::v1::NODE_STATE_DRAINING;
}

template <typename Repeated>
bool SameList(const Repeated& a, const Repeated& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

}  // namespace

absl::Status CoordinatorOptions::Validate() const {
  if (heartbeat_interval_ms < 10 || heartbeat_interval_ms > 3'600'000) {
    return InvalidField("heartbeat_interval_ms",
                        absl::StrCat(heartbeat_interval_ms, " is not in 10..3600000"));
  }
  if (dead_after_missed_heartbeats < 1) {
    return InvalidField("dead_after_missed_heartbeats",
                        absl::StrCat(dead_after_missed_heartbeats, " is less than 1"));
  }
  if (max_attempts < 1) return InvalidField("max_attempts", "must be at least 1");
  if (max_jobs_per_node < 1) {
    return InvalidField("max_jobs_per_node", absl::StrCat(max_jobs_per_node, " is less than 1"));
  }
  if (max_job_slots_per_node < 1) return InvalidField("max_job_slots_per_node", "must be at least 1");
  if (limits.max_image_side < 16) {
    return InvalidField("limits.max_image_side",
                        absl::StrCat(limits.max_image_side, " is less than 16"));
  }
  if (limits.max_steps < 1) return InvalidField("limits.max_steps", "must be at least 1");
  if (limits.max_prompt_bytes < 1) {
    return InvalidField("limits.max_prompt_bytes", "must be at least 1");
  }
  if (max_pending_waits < 1) return InvalidField("max_pending_waits", "must be at least 1");
  if (max_queued_jobs < 1) return InvalidField("max_queued_jobs", "must be at least 1");
  if (max_nodes < 1) return InvalidField("max_nodes", "must be at least 1");
  if (placement_lookahead < 1) return InvalidField("placement_lookahead", "must be at least 1");
  if (max_waits_per_client < 1) return InvalidField("max_waits_per_client", "must be at least 1");
  if (max_queued_jobs_per_client < 1) {
    return InvalidField("max_queued_jobs_per_client", "must be at least 1");
  }
  if (max_wait_timeout_ms < 1) return InvalidField("max_wait_timeout_ms", "must be at least 1");
  if (max_package_sets_per_node < 1) {
    return InvalidField("max_package_sets_per_node", "must be at least 1");
  }
  if (max_digests_per_package_set < 1) {
    return InvalidField("max_digests_per_package_set", "must be at least 1");
  }
  if (run_timeout_factor < 0) return InvalidField("run_timeout_factor", "must not be negative");
  if (run_timeout_min_ms < 0) return InvalidField("run_timeout_min_ms", "must not be negative");
  if (auto s = costs.Validate(); !s.ok()) {
    return kiln::WithField(absl::InvalidArgumentError(absl::StrCat("costs.", s.message())),
                     absl::StrCat("costs.", ErrorField(s)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Create(const CoordinatorOptions& options,
                                                                 JobStore& store,
                                                                 const Clock& clock,
                                                                 CoordinatorMetrics& metrics,
                                                                 EventLog log) {
  if (auto s = options.Validate(); !s.ok()) return s;
  std::unique_ptr<Coordinator> c(new Coordinator(options, store, clock, metrics, std::move(log)));
  if (auto s = c->Recover(); !s.ok()) return s;
  return c;
}

Coordinator::Coordinator(const CoordinatorOptions& options, JobStore& store, const Clock& clock,
                         CoordinatorMetrics& metrics, EventLog log)
    : options_(options),
      store_(store),
      clock_(clock),
      metrics_(metrics),
      log_(log ? std::move(log) : kiln::LineLogger("coordinator")),
      costs_(options.costs) {
  next_heartbeat_ms_ = clock_.NowMs();
  UpdateNodeGauges();
  metrics_.queue_depth.Set(0);
}

absl::Status Coordinator::Recover() {
  // Jobs that were running were ahead of the queued ones: they go first.
  auto running = store_.List(kiln::v1::JOB_STATE_RUNNING);
  if (!running.ok()) return running.status();
  auto queued = store_.List(kiln::v1::JOB_STATE_QUEUED);
  if (!queued.ok()) return queued.status();
  size_t kept = 0;
  for (const auto* jobs : {&*running, &*queued}) {
    for (const JobInfo& info : *jobs) {
      const std::string& id = info.spec().job_id();
      if (active_.count(id)) continue;  // listed twice (its state changed between the lists)
      ActiveJob job;
      job.spec = info.spec();
      job.seq = next_seq_++;
      job.submitted_ms = job.enqueued_ms = clock_.NowMs();
      job.attempt = info.attempts();
      job.owner = info.owner();
      if (info.state() == kiln::v1::JOB_STATE_RUNNING && !info.node_id().empty()) {
        // It may still be running: its node keeps it if it comes back and lists it within the
        // grace (RegisterNode claims it, Heartbeat reconciles); else Tick requeues it.
        job.node_id = info.node_id();
        job.assigned_ms = clock_.NowMs();
        unclaimed_[info.node_id()].insert(id);
        active_[id] = std::move(job);
        ++kept;
        continue;
      }
      job.waiting_reason = info.error();
      Enqueue(id, active_[id] = std::move(job));
    }
  }
  unclaimed_deadline_ms_ =
      clock_.NowMs() + options_.heartbeat_interval_ms * options_.dead_after_missed_heartbeats;
  if (!active_.empty()) {
    Log(absl::StrCat("recovered ", active_.size(), " unfinished jobs (", queue_.size(),
                     " queued, ", kept, " running: kept on their nodes if they come back)"));
  }
  return absl::OkStatus();
}

void Coordinator::RequeueUnclaimed() {
  const auto unclaimed = std::move(unclaimed_);
  unclaimed_.clear();
  for (const auto& [node_id, jobs] : unclaimed) {
    for (const auto& job_id : jobs) {
      RequeueOrFail(job_id, "UNAVAILABLE",
                    absl::StrCat("node ", node_id,
                                 " did not come back after a coordinator restart"));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Client requests

absl::StatusOr<kiln::v1::JobReply> Coordinator::Submit(const kiln::v1::SubmitRequest& request,
                                                       const Caller& caller) {
  const kiln::v1::JobSpec& spec = request.spec();
  if (auto s = ValidateJobSpec(spec, options_.limits); !s.ok()) return CountRejected(s);

  auto existing = store_.Get(spec.job_id());
  if (existing.ok()) {
    Adopt(*existing);
    return DuplicateReply(spec, *existing, caller);
  }
  if (!absl::IsNotFound(existing.status())) return NotAccepted(spec, existing.status());
  if (auto s = Admit(spec, 0, caller, 0); !s.ok()) return CountRejected(s);

  JobInfo job;
  *job.mutable_spec() = spec;
  job.set_state(kiln::v1::JOB_STATE_QUEUED);
  job.set_total_steps(spec.steps());
  job.set_submitted_unix_ms(clock_.UnixMs());
  job.set_phase("queued");
  job.set_owner(caller.key);
  auto created = store_.Create(job);
  if (!created.ok()) return NotAccepted(spec, created.status());
  if (!created->created) {  // stored by an earlier attempt whose reply was lost, or another writer
    Adopt(created->job);
    return DuplicateReply(spec, created->job, caller);
  }

  EnqueueCreated(spec, caller.key);
  PlaceJobs();
  if (auto it = active_.find(spec.job_id());
      !placement_dirty_ && it != active_.end() && it->second.node_id.empty() &&
      it->second.waiting_reason.empty()) {
    // Not placed, and the pass said nothing (it stops early when no node has a free slot; a
    // pass the store interrupted runs again on the next event).
    SetWaitingReason(spec.job_id(), it->second, WaitingReasonFor(spec));
  }

  auto now = store_.Get(spec.job_id());
  if (!now.ok()) return now.status();
  kiln::v1::JobReply reply;
  *reply.mutable_job() = std::move(*now);
  reply.mutable_job()->clear_png();
  reply.set_created(true);
  reply.set_final(true);
  return reply;
}

std::vector<absl::StatusOr<kiln::v1::JobReply>> Coordinator::SubmitBatch(
    const std::vector<const kiln::v1::SubmitRequest*>& requests,
    const std::vector<Caller>& callers) {
  auto caller_of = [&](size_t i) -> Caller { return i < callers.size() ? callers[i] : Caller{}; };
  std::vector<absl::StatusOr<kiln::v1::JobReply>> out(
      requests.size(), absl::InternalError("submit: not handled"));
  // Valid requests, each job_id once; a job_id repeated within the batch is submitted after the
  // batch (it then finds the first).
  std::vector<size_t> valid;
  std::vector<size_t> repeats;
  std::vector<std::string> ids;
  absl::flat_hash_set<std::string> seen;
  for (size_t i = 0; i < requests.size(); ++i) {
    const kiln::v1::JobSpec& spec = requests[i]->spec();
    if (auto s = ValidateJobSpec(spec, options_.limits); !s.ok()) {
      out[i] = CountRejected(s);
      continue;
    }
    if (!seen.insert(spec.job_id()).second) {
      repeats.push_back(i);
      continue;
    }
    valid.push_back(i);
    ids.push_back(spec.job_id());
  }

  // Which exist already (one read), which are admitted, then one write for the new ones.
  auto existing = store_.GetMany(ids);
  std::vector<size_t> to_create;
  std::vector<JobInfo> jobs;
  std::map<std::string, size_t> pending_by_owner;  // new jobs of this batch per client key
  const int64_t now_unix = clock_.UnixMs();
  for (size_t n = 0; n < valid.size(); ++n) {
    const size_t i = valid[n];
    const kiln::v1::JobSpec& spec = requests[i]->spec();
    if (existing[n].ok()) {
      Adopt(*existing[n]);
      out[i] = DuplicateReply(spec, *existing[n], caller_of(i));
      continue;
    }
    if (!absl::IsNotFound(existing[n].status())) {
      out[i] = NotAccepted(spec, existing[n].status());
      continue;
    }
    const Caller caller = caller_of(i);
    if (auto s = Admit(spec, to_create.size(), caller, pending_by_owner[caller.key]); !s.ok()) {
      out[i] = CountRejected(s);
      continue;
    }
    ++pending_by_owner[caller.key];
    JobInfo job;
    *job.mutable_spec() = spec;
    job.set_state(kiln::v1::JOB_STATE_QUEUED);
    job.set_total_steps(spec.steps());
    job.set_submitted_unix_ms(now_unix);
    job.set_phase("queued");
    job.set_owner(caller.key);
    jobs.push_back(std::move(job));
    to_create.push_back(i);
  }
  auto created = store_.CreateMany(jobs);
  std::vector<size_t> fresh;
  std::vector<std::string> fresh_ids;
  for (size_t n = 0; n < to_create.size(); ++n) {
    const size_t i = to_create[n];
    const kiln::v1::JobSpec& spec = requests[i]->spec();
    if (!created[n].ok()) {
      out[i] = NotAccepted(spec, created[n].status());
    } else if (!created[n]->created) {
      Adopt(created[n]->job);
      out[i] = DuplicateReply(spec, created[n]->job, caller_of(i));
    } else {
      EnqueueCreated(spec, caller_of(i).key);
      fresh.push_back(i);
      fresh_ids.push_back(spec.job_id());
    }
  }
  PlaceJobs();
  for (const std::string& id : fresh_ids) {
    if (auto it = active_.find(id); !placement_dirty_ && it != active_.end() &&
                                    it->second.node_id.empty() && it->second.waiting_reason.empty()) {
      SetWaitingReason(id, it->second, WaitingReasonFor(it->second.spec));
    }
  }

  // The replies show each new job as stored now (it may have been assigned).
  auto now = store_.GetMany(fresh_ids);
  for (size_t n = 0; n < fresh.size(); ++n) {
    if (!now[n].ok()) {
      out[fresh[n]] = now[n].status();
      continue;
    }
    kiln::v1::JobReply reply;
    *reply.mutable_job() = std::move(*now[n]);
    reply.mutable_job()->clear_png();
    reply.set_created(true);
    reply.set_final(true);
    out[fresh[n]] = std::move(reply);
  }
  for (size_t i : repeats) out[i] = Submit(*requests[i], caller_of(i));
  return out;
}

absl::Status Coordinator::CountRejected(absl::Status s) {
  metrics_.submissions_rejected.Increment();
  return s;
}

absl::StatusOr<kiln::v1::JobReply> Coordinator::DuplicateReply(const kiln::v1::JobSpec& spec,
                                                               const JobInfo& existing,
                                                               const Caller& caller) {
  if (auto s = CheckOwner(caller, existing); !s.ok()) return CountRejected(s);
  const std::string diff = FirstDifference(existing.spec(), spec);
  if (!diff.empty()) {
    return CountRejected(FieldError(absl::StatusCode::kAlreadyExists, "spec.job_id",
                                    absl::StrCat("job ", spec.job_id(),
                                                 " already exists with a different spec (", diff,
                                                 " differs)")));
  }
  metrics_.submissions_duplicate.Increment();
  kiln::v1::JobReply reply;
  *reply.mutable_job() = existing;
  reply.mutable_job()->clear_png();
  reply.set_created(false);
  reply.set_final(true);
  return reply;
}

// A store that cannot be reached, or that refuses this coordinator's writes (fenced: another
// coordinator leads now): nothing was stored, and the client is told so with UNAVAILABLE (try
// again, or elsewhere), never acknowledged.
absl::Status Coordinator::NotAccepted(const kiln::v1::JobSpec& spec, const absl::Status& s) {
  if (!absl::IsUnavailable(s) && !absl::IsFailedPrecondition(s)) return CountRejected(s);
  return CountRejected(absl::UnavailableError(absl::StrCat(
      "job ", spec.job_id(), " was not accepted: ", s.message(), "; submit it again later")));
}

absl::Status Coordinator::Admit(const kiln::v1::JobSpec& spec, size_t pending,
                               const Caller& caller, size_t pending_of_caller) {
  if (auto s = CheckServable(spec); !s.ok()) {
    metrics_.submissions_unservable.Increment();
    const bool model_listed = std::any_of(nodes_.begin(), nodes_.end(), [&](const auto& n) {
      const auto& models = n.second.info.models();
      return n.second.state != kiln::v1::NODE_STATE_LEFT &&
             std::find(models.begin(), models.end(), spec.model()) != models.end();
    });
    return model_listed ? s : FieldError(s.code(), "spec.model", s.message());
  }
  const int64_t now_unix = clock_.UnixMs();
  if (spec.deadline_unix_ms() > 0 && spec.deadline_unix_ms() <= now_unix) {
    return InvalidField("spec.deadline_unix_ms",
                        absl::StrCat(spec.deadline_unix_ms(), " is in the past (now ", now_unix,
                                     ")"));
  }
  if (queue_.size() + pending >= options_.max_queued_jobs) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the queue is full (", queue_.size(), " jobs); try again later"));
  }
  if (!caller.key.empty()) {
    auto it = queued_by_owner_.find(caller.key);
    const size_t queued = (it == queued_by_owner_.end() ? 0 : it->second) + pending_of_caller;
    if (queued >= options_.max_queued_jobs_per_client) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "this client has ", queued, " queued jobs (the limit per client); try again later"));
    }
  }
  return absl::OkStatus();
}

void Coordinator::EnqueueCreated(const kiln::v1::JobSpec& spec, const std::string& owner) {
  metrics_.submissions_created.Increment();
  ActiveJob active;
  active.spec = spec;
  active.owner = owner;
  active.seq = next_seq_++;
  active.submitted_ms = active.enqueued_ms = clock_.NowMs();
  Enqueue(spec.job_id(), active_[spec.job_id()] = std::move(active));
}

std::vector<kiln::v1::JobSpec> Coordinator::QueuedSpecs(size_t max) const {
  std::vector<kiln::v1::JobSpec> out;
  out.reserve(max > 0 ? std::min(max, queue_.size()) : queue_.size());
  for (const auto& key : queue_) {
    if (max > 0 && out.size() >= max) break;
    auto it = active_.find(std::get<2>(key));
    if (it != active_.end()) out.push_back(it->second.spec);
  }
  return out;
}

void Coordinator::Adopt(const JobInfo& job) {
  const std::string& id = job.spec().job_id();
  if (job.state() != kiln::v1::JOB_STATE_QUEUED || active_.count(id)) return;
  ActiveJob active;
  active.spec = job.spec();
  active.seq = next_seq_++;
  active.submitted_ms = active.enqueued_ms = clock_.NowMs();
  active.attempt = job.attempts();
  active.owner = job.owner();
  active.waiting_reason = job.error();
  Enqueue(id, active_[id] = std::move(active));
  PlaceJobs();
}

absl::StatusOr<kiln::v1::JobReply> Coordinator::Status(const kiln::v1::StatusRequest& request,
                                                       const Caller& caller) {
  if (auto s = ValidateId("job_id", request.job_id()); !s.ok()) return s;
  auto job = store_.Get(request.job_id());
  if (!job.ok()) return job.status();
  if (auto s = CheckOwner(caller, *job); !s.ok()) return s;
  kiln::v1::JobReply reply;
  *reply.mutable_job() = std::move(*job);
  if (!request.include_png()) reply.mutable_job()->clear_png();
  reply.set_final(true);
  return reply;
}

absl::StatusOr<std::optional<kiln::v1::JobReply>> Coordinator::Wait(
    const kiln::v1::WaitRequest& request, const ReplyTo& reply_to, const Caller& caller) {
  if (auto s = ValidateId("job_id", request.job_id()); !s.ok()) return s;
  auto job = store_.Get(request.job_id());
  if (!job.ok()) return job.status();
  if (auto s = CheckOwner(caller, *job); !s.ok()) return s;
  kiln::v1::JobReply reply;
  if (IsTerminal(job->state()) || request.timeout_ms() == 0) {
    *reply.mutable_job() = std::move(*job);
    if (!request.include_png()) reply.mutable_job()->clear_png();
    reply.set_final(true);
    return std::optional<kiln::v1::JobReply>(std::move(reply));
  }
  if (waits_.size() >= options_.max_pending_waits) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "too many pending waits (", waits_.size(), "); poll with timeout_ms 0 or retry later"));
  }
  // One client's waits are bounded on their own, so a client that floods waits (or leaves them
  // behind when it goes away) crowds out only itself: its oldest wait is answered and dropped.
  const std::string client = caller.key.empty() ? reply_to.peer : caller.key;
  // Looked up each time: dropping a client's last wait erases its entry.
  for (auto mine = waits_by_client_.find(client);
       mine != waits_by_client_.end() && mine->second.size() >= options_.max_waits_per_client;
       mine = waits_by_client_.find(client)) {
    AnswerWait(*mine->second.begin());
    metrics_.waits_dropped_client_cap.Increment();
  }
  const uint64_t id = next_wait_id_++;
  PendingWait wait;
  wait.job_id = request.job_id();
  wait.reply_to = reply_to;
  wait.client = client;
  wait.deadline_ms =
      clock_.NowMs() + std::min<int64_t>(request.timeout_ms(), options_.max_wait_timeout_ms);
  waits_by_client_[client].insert(id);
  waits_by_peer_[reply_to.peer].insert(id);
  wait.include_png = request.include_png();
  wait.stream = request.stream_progress();
  waits_by_job_.emplace(wait.job_id, id);
  waits_by_deadline_.emplace(wait.deadline_ms, id);
  waits_.emplace(id, std::move(wait));
  metrics_.waits_pending.Set(static_cast<double>(waits_.size()));
  if (!request.stream_progress()) return std::optional<kiln::v1::JobReply>();
  *reply.mutable_job() = std::move(*job);
  reply.mutable_job()->clear_png();
  reply.set_final(false);
  return std::optional<kiln::v1::JobReply>(std::move(reply));
}

absl::StatusOr<kiln::v1::JobReply> Coordinator::Cancel(const kiln::v1::CancelRequest& request,
                                                       const Caller& caller) {
  const std::string& id = request.job_id();
  if (auto s = ValidateId("job_id", id); !s.ok()) return s;
  auto job = store_.Get(id);
  if (!job.ok()) return job.status();
  if (auto s = CheckOwner(caller, *job); !s.ok()) return s;
  switch (job->state()) {
    case kiln::v1::JOB_STATE_SUCCEEDED:
    case kiln::v1::JOB_STATE_FAILED:
      return absl::FailedPreconditionError(
          absl::StrCat("job ", id, " already ", StateName(job->state()), "; nothing to cancel"));
    case kiln::v1::JOB_STATE_CANCELLED:
      break;
    default: {
      auto it = active_.find(id);
      const std::string node_id = it == active_.end() ? "" : it->second.node_id;
      if (!node_id.empty()) {
        kiln::v1::Envelope env;
        env.mutable_cancel_job()->set_job_id(id);
        SendToNode(node_id, std::move(env));
        Finish(id, kiln::v1::JOB_STATE_CANCELLED,
               absl::StrCat("CANCELLED: cancelled by a client while running on ", node_id));
      } else {
        Finish(id, kiln::v1::JOB_STATE_CANCELLED, "CANCELLED: cancelled by a client");
      }
      job = store_.Get(id);
      if (!job.ok()) return job.status();
    }
  }
  kiln::v1::JobReply reply;
  *reply.mutable_job() = std::move(*job);
  reply.mutable_job()->clear_png();
  reply.set_final(true);
  return reply;
}

kiln::v1::ListNodesReply Coordinator::ListNodes() const {
  kiln::v1::ListNodesReply reply;
  for (const auto& [id, node] : nodes_) *reply.add_nodes() = NodeStatusOf(node);
  return reply;
}

absl::StatusOr<kiln::v1::DrainReply> Coordinator::Drain(const kiln::v1::DrainRequest& request) {
  if (auto s = ValidateId("node_id", request.node_id()); !s.ok()) return s;
  NodeRecord* node = FindNode(request.node_id());
  if (node == nullptr) {
    return absl::NotFoundError(absl::StrCat("node ", request.node_id(), " not found"));
  }
  if (!IsLive(node->state)) {
    return absl::FailedPreconditionError(
        absl::StrCat("node ", request.node_id(), " is ",
                     node->state == kiln::v1::NODE_STATE_DEAD ? "dead" : "gone (deregistered)"));
  }
  if (node->state != kiln::v1::NODE_STATE_DRAINING) {
    node->state = kiln::v1::NODE_STATE_DRAINING;
    MarkPlacementNode(request.node_id());
    UpdateNodeGauges();
    Log(absl::StrCat("node ", request.node_id(), " draining (", node->jobs.size(),
                     " job(s) still running)"));
    RefreshWaitingReasons();
  }
  kiln::v1::DrainReply reply;
  *reply.mutable_node() = NodeStatusOf(*node);
  return reply;
}

absl::StatusOr<kiln::v1::UncordonReply> Coordinator::Uncordon(
    const kiln::v1::UncordonRequest& request) {
  if (auto s = ValidateId("node_id", request.node_id()); !s.ok()) return s;
  NodeRecord* node = FindNode(request.node_id());
  if (node == nullptr) {
    return absl::NotFoundError(absl::StrCat("node ", request.node_id(), " not found"));
  }
  if (!IsLive(node->state)) {
    return absl::FailedPreconditionError(
        absl::StrCat("node ", request.node_id(), " is ",
                     node->state == kiln::v1::NODE_STATE_DEAD ? "dead" : "gone (deregistered)"));
  }
  if (node->state == kiln::v1::NODE_STATE_DRAINING) {
    node->state = kiln::v1::NODE_STATE_READY;
    MarkPlacementNode(request.node_id());
    UpdateNodeGauges();
    Log(absl::StrCat("node ", request.node_id(), " uncordoned: it takes jobs again"));
    placement_dirty_ = true;
    PlaceJobs();
  }
  kiln::v1::UncordonReply reply;
  *reply.mutable_node() = NodeStatusOf(*node);
  return reply;
}

absl::StatusOr<kiln::v1::RemoveNodeReply> Coordinator::RemoveNode(
    const kiln::v1::RemoveNodeRequest& request) {
  const std::string& id = request.node_id();
  if (auto s = ValidateId("node_id", id); !s.ok()) return s;
  NodeRecord* node = FindNode(id);
  if (node == nullptr) return absl::NotFoundError(absl::StrCat("node ", id, " not found"));
  // Jobs cancelled while on it hold its slot only; they are not work to protect.
  std::vector<std::string> running;
  for (const auto& job_id : node->jobs) {
    auto it = active_.find(job_id);
    if (it != active_.end() && !it->second.cancelled) running.push_back(job_id);
  }
  if (!running.empty() && !request.force()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "node ", id, " is running ", running.size(), " job(s) (", absl::StrJoin(running, ", "),
        "); drain it and wait for them, or force the removal to requeue them"));
  }
  kiln::v1::RemoveNodeReply reply;
  *reply.mutable_node() = NodeStatusOf(*node);
  const std::set<std::string> jobs = node->jobs;
  for (const auto& job_id : jobs) {
    if (IsLive(node->state)) {
      kiln::v1::Envelope env;
      env.mutable_cancel_job()->set_job_id(job_id);
      SendToNode(id, std::move(env));
    }
    auto it = active_.find(job_id);
    const bool cancelled = it != active_.end() && it->second.cancelled;
    RequeueOrFail(job_id, "UNAVAILABLE", absl::StrCat("node ", id, " was removed"));
    if (!cancelled) reply.add_requeued_jobs(job_id);
  }
  // Recovered jobs it never claimed: requeued now rather than at the claim deadline.
  if (auto claimed = unclaimed_.find(id); claimed != unclaimed_.end()) {
    const std::set<std::string> unclaimed = claimed->second;
    unclaimed_.erase(claimed);
    for (const auto& job_id : unclaimed) {
      auto it = active_.find(job_id);
      if (it == active_.end() || it->second.node_id != id) continue;
      RequeueOrFail(job_id, "UNAVAILABLE", absl::StrCat("node ", id, " was removed"));
      reply.add_requeued_jobs(job_id);
    }
  }
  Log(absl::StrCat("node ", id, " removed from the node table",
                   reply.requeued_jobs().empty()
                       ? ""
                       : absl::StrCat("; requeued ", absl::StrJoin(reply.requeued_jobs(), ", "))));
  MarkPlacementNode(id);
  index_.Remove(id);
  costs_.ForgetNode(id);
  nodes_.erase(id);
  UpdateNodeGauges();
  placement_dirty_ = true;
  FailUnservableQueued();
  RefreshWaitingReasons();
  PlaceJobs();
  return reply;
}

// ---------------------------------------------------------------------------------------------
// Node messages

absl::StatusOr<kiln::v1::RegisterAck> Coordinator::RegisterNode(
    const std::string& node_id, const kiln::v1::RegisterNode& message) {
  if (auto s = ValidateId("node identity", node_id); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(s.message(), " (set the DEALER's routing id to the node id)"));
  }
  kiln::v1::NodeInfo info = message.info();
  if (info.node_id().empty()) info.set_node_id(node_id);
  if (info.node_id() != node_id) {
    return InvalidField("register_node.info.node_id",
                        absl::StrCat("'", info.node_id(), "' differs from the socket identity '",
                                     node_id, "'"));
  }
  const std::string& kind = info.device().kind();
  if (kind != "cpu" && kind != "cuda") {
    return InvalidField("register_node.info.device.kind",
                        absl::StrCat("'", kind, "' is not cpu or cuda"));
  }
  if (info.models().empty()) {
    return InvalidField("register_node.info.models", "a node must serve at least one model");
  }
  for (const auto& model : info.models()) {
    if (auto s = ValidateModelName("register_node.info.models", model); !s.ok()) return s;
  }
  if (info.device().gpu_count() > kMaxGpusPerNode) {
    return InvalidField("register_node.info.device.gpu_count",
                        absl::StrCat(info.device().gpu_count(), " is more than ", kMaxGpusPerNode));
  }
  // On a cpu device gpu_count is the node's CPU ranks (kiln-node --device cpu --gpus 0,1: tests
  // and development of the multi-GPU node); placed like GPUs.
  if (info.job_slots() > options_.max_job_slots_per_node) {
    return InvalidField("register_node.info.job_slots",
                        absl::StrCat(info.job_slots(), " is more than ",
                                     options_.max_job_slots_per_node));
  }
  if (info.package_sets_size() > static_cast<int>(options_.max_package_sets_per_node)) {
    return InvalidField("register_node.info.package_sets",
                        absl::StrCat(info.package_sets_size(), " sets is more than ",
                                     options_.max_package_sets_per_node));
  }
  for (const auto& [key, set] : info.package_sets()) {
    if (set.digests_size() > static_cast<int>(options_.max_digests_per_package_set)) {
      return InvalidField("register_node.info.package_sets",
                          absl::StrCat("set ", key, " has more than ",
                                       options_.max_digests_per_package_set, " digests"));
    }
  }

  NodeRecord* node = FindNode(node_id);
  const bool again = node != nullptr;
  if (node == nullptr) {
    MakeRoomForNode();
    if (nodes_.size() >= options_.max_nodes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("node table full (", nodes_.size(), " live nodes)"));
    }
    node = &nodes_[node_id];
  }
  // A live node that registers again (it reconnected, or restarted under the same id) keeps its
  // assignments for now: a node that reconnected still runs them, and the heartbeats that follow
  // say which ones it really holds (Heartbeat requeues the others). A DEAD or LEFT node's jobs
  // were requeued when it was declared so.
  node->info = std::move(info);
  node->state = kiln::v1::NODE_STATE_READY;
  node->device_class = DeviceClass(node->info.device());
  index_.Update(node->info);
  if (auto claimed = unclaimed_.find(node_id); claimed != unclaimed_.end()) {
    // Jobs it ran before a coordinator restart: assigned to it again; its heartbeats must list
    // them within the usual grace, counted from now.
    for (const auto& job_id : claimed->second) {
      auto it = active_.find(job_id);
      if (it == active_.end() || it->second.node_id != node_id) continue;
      it->second.assigned_ms = clock_.NowMs();
      node->jobs.insert(job_id);
    }
    unclaimed_.erase(claimed);
  }
  MarkPlacementNode(node_id);
  node->last_seen_ms = clock_.NowMs();
  node->last_seen_unix_ms = clock_.UnixMs();
  UpdateNodeGauges();
  const auto& device = node->info.device();
  Log(absl::StrCat("node ", node_id, again ? " registered again" : " registered", " (",
                   device.kind(), device.name().empty() ? "" : " ", device.name(),
                   device.mig_profile().empty() ? "" : " MIG ", device.mig_profile(),
                   "; models ", absl::StrJoin(node->info.models(), ","), "; ",
                   node->info.loaded_packages_size(), " packages loaded, ",
                   node->info.packages_size(), " on disk",
                   node->info.can_compile() ? "; can compile" : "",
                   node->info.can_fetch() ? "; can fetch" : "", ")"));
  placement_dirty_ = true;
  PlaceJobs();
  kiln::v1::RegisterAck ack;
  ack.set_heartbeat_interval_ms(static_cast<uint32_t>(options_.heartbeat_interval_ms));
  return ack;
}

absl::Status Coordinator::Heartbeat(const std::string& node_id,
                                    const kiln::v1::Heartbeat& message) {
  auto live = LiveNode(node_id);
  if (!live.ok()) return live.status();
  NodeRecord& node = **live;
  kiln::v1::NodeInfo& info = node.info;
  // loaded_packages and packages are snapshots; package_sets entries add to what the node
  // declared at registration.
  bool changed = !SameList(info.loaded_packages(), message.loaded_packages()) ||
                 !SameList(info.packages(), message.packages());
  *info.mutable_loaded_packages() = message.loaded_packages();
  *info.mutable_packages() = message.packages();
  if (!SameList(info.loras(), message.loras()) ||
      info.applied_loras().size() != message.applied_loras().size() ||
      !std::all_of(message.applied_loras().begin(), message.applied_loras().end(),
                   [&](const auto& kv) {
                     auto it = info.applied_loras().find(kv.first);
                     return it != info.applied_loras().end() && it->second == kv.second;
                   })) {
    *info.mutable_loras() = message.loras();
    *info.mutable_applied_loras() = message.applied_loras();
    changed = true;
  }
  int ignored_sets = 0;  // entries past the bounds: ignored, the rest of the heartbeat counts
  for (const auto& [key, set] : message.package_sets()) {
    auto* sets = info.mutable_package_sets();
    if (set.digests_size() > static_cast<int>(options_.max_digests_per_package_set) ||
        (!sets->contains(key) && sets->size() >= options_.max_package_sets_per_node)) {
      ++ignored_sets;
      continue;
    }
    kiln::v1::PackageSet& mine = (*sets)[key];
    if (SameList(mine.digests(), set.digests())) continue;
    mine = set;
    changed = true;
  }
  if (changed) {
    index_.Update(info);
    placement_dirty_ = true;
  }
  if (message.unhealthy() != node.unhealthy) {
    Log(message.unhealthy().empty()
            ? absl::StrCat("node ", node_id, " is healthy again; placing jobs on it")
            : absl::StrCat("node ", node_id, " takes no jobs: ", message.unhealthy()));
    node.unhealthy = message.unhealthy();
    MarkPlacementNode(node_id);
    placement_dirty_ = true;
  }

  // Reconcile what the node says it runs with what it was given.
  const std::set<std::string> running(message.running_jobs().begin(),
                                      message.running_jobs().end());
  const int64_t grace = options_.heartbeat_interval_ms * options_.dead_after_missed_heartbeats;
  const std::set<std::string> assigned = node.jobs;
  for (const auto& job_id : assigned) {
    if (running.count(job_id)) continue;
    auto it = active_.find(job_id);
    if (it != active_.end() && clock_.NowMs() - it->second.assigned_ms <= grace) continue;
    RequeueOrFail(job_id, "UNAVAILABLE",
                  absl::StrCat("node ", node_id, " stopped reporting it"));
  }
  for (const auto& job_id : running) {
    if (node.jobs.count(job_id)) continue;
    // Work nobody is waiting for (it was requeued, or cancelled and released): stop it.
    kiln::v1::Envelope env;
    env.mutable_cancel_job()->set_job_id(job_id);
    SendToNode(node_id, std::move(env));
  }
  PlaceJobs();
  if (ignored_sets > 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "heartbeat.package_sets: ", ignored_sets, " entries of node ", node_id,
        " ignored: more than ", options_.max_package_sets_per_node,
        " package sets per node, or more than ", options_.max_digests_per_package_set,
        " digests in a set"));
  }
  return absl::OkStatus();
}

absl::Status Coordinator::Progress(const std::string& node_id,
                                   const kiln::v1::JobProgress& message) {
  auto live = LiveNode(node_id);
  if (!live.ok()) return live.status();
  auto it = active_.find(message.job_id());
  if (it == active_.end() || it->second.node_id != node_id) {
    metrics_.stale_progress.Increment();
    return absl::OkStatus();
  }
  if (it->second.cancelled) return absl::OkStatus();
  if (message.phase() == "denoising" || message.phase() == "decoding") {
    it->second.denoising = true;
  }
  auto job = store_.Update(message.job_id(), [&](JobInfo& j) {
    j.set_step(message.step());
    if (message.total_steps() > 0) j.set_total_steps(message.total_steps());
    if (!message.phase().empty()) j.set_phase(message.phase());
    return absl::OkStatus();
  });
  if (!job.ok()) return job.status();
  NotifyWaiters(*job, /*final=*/false);
  return absl::OkStatus();
}

absl::Status Coordinator::Result(const std::string& node_id, const kiln::v1::JobResult& message) {
  const std::string& job_id = message.job_id();
  if (FindNode(node_id) == nullptr) {
    // After a coordinator restart a node may deliver a result before it registers again: a job
    // recovered as running on it is accepted.
    auto claimed = unclaimed_.find(node_id);
    if (claimed != unclaimed_.end() && claimed->second.count(job_id) && message.ok()) {
      auto s = ApplyResult(nullptr, node_id, message);
      if (active_.count(job_id) == 0) {  // applied (else the store refused: still unclaimed)
        claimed->second.erase(job_id);
        if (claimed->second.empty()) unclaimed_.erase(claimed);
      }
      return s;
    }
  }
  auto live = LiveNode(node_id);
  if (!live.ok()) {
    // Its jobs were requeued when it was declared dead or left: whatever it sends is stale.
    metrics_.stale_results.Increment();
    return live.status();
  }
  return ApplyResult(*live, node_id, message);
}

absl::Status Coordinator::ApplyResult(NodeRecord* node, const std::string& node_id,
                                      const kiln::v1::JobResult& message) {
  const std::string& job_id = message.job_id();
  auto it = active_.find(job_id);
  // A success from the assignee counts whatever attempt it reports (the same spec and seed give
  // the same image; a node that was reassigned a job it was still running reports the first
  // attempt). A failure counts only for the attempt it names (0: unspecified).
  if (it == active_.end() || it->second.node_id != node_id ||
      (!message.ok() && message.attempt() != 0 && message.attempt() != it->second.attempt)) {
    metrics_.stale_results.Increment();
    Log(absl::StrCat("ignored a stale result for job ", job_id, " from node ", node_id,
                     " (attempt ", message.attempt(), "; the job is no longer assigned to it)"));
    return absl::OkStatus();
  }
  ActiveJob& job = it->second;
  if (node != nullptr) node->jobs_done++;
  const double run_seconds = SecondsSince(job.assigned_ms);
  if (node != nullptr && message.ok() && !job.cancelled) {
    costs_.Observe(node_id, node->info.device(), job.spec, message, run_seconds);
  }
  metrics_.run_seconds.Observe(run_seconds);
  if (job.cancelled) {
    ReleaseFromNode(job_id, job);
    active_.erase(it);
    PlaceJobs();
    return absl::OkStatus();
  }
  auto fill = [&](JobInfo& j) {
    j.set_run_seconds(run_seconds);
    *j.mutable_packages() = message.packages();
    *j.mutable_cold_start() = message.cold_start();
  };
  if (message.ok()) {
    // If the store refuses the result (Redis unreachable) the job stays assigned: the node no
    // longer lists it, so it is requeued after the grace and runs again rather than being lost.
    Finish(job_id, kiln::v1::JOB_STATE_SUCCEEDED, "", [&](JobInfo& j) {
      fill(j);
      j.set_png(message.png());
      j.set_step(j.total_steps());
    });
  } else {
    const std::string code = message.error_code().empty() ? "UNKNOWN" : message.error_code();
    if (IsRetryableNodeError(code)) {
      RequeueOrFail(job_id, code,
                    absl::StrCat("node ", node_id, " failed it: ", code, ": ", message.error()));
    } else {
      Finish(job_id, kiln::v1::JOB_STATE_FAILED,
             absl::StrCat(code, ": ", message.error(), " (on node ", node_id, ")"), fill);
    }
  }
  PlaceJobs();
  return absl::OkStatus();
}

absl::Status Coordinator::Deregister(const std::string& node_id,
                                     const kiln::v1::Deregister& message) {
  auto live = LiveNode(node_id);
  if (!live.ok()) return live.status();
  Log(absl::StrCat("node ", node_id, " deregistered",
                   message.reason().empty() ? "" : absl::StrCat(": ", message.reason())));
  NodeLost(**live, kiln::v1::NODE_STATE_LEFT, "left");
  FailUnservableQueued();
  RefreshWaitingReasons();
  PlaceJobs();
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Time

void Coordinator::Tick() {
  const int64_t now = clock_.NowMs();
  if (now >= next_heartbeat_ms_) {
    next_heartbeat_ms_ = now + options_.heartbeat_interval_ms;
    for (const auto& [id, node] : nodes_) {
      if (!IsLive(node.state)) continue;
      kiln::v1::Envelope env;
      auto* hb = env.mutable_heartbeat();
      for (const auto& job_id : node.jobs) hb->add_running_jobs(job_id);
      SendToNode(id, std::move(env));
    }
  }

  if (!unclaimed_.empty() && now >= unclaimed_deadline_ms_) RequeueUnclaimed();
  if (jobs_held_ && now >= next_held_pass_ms_) {
    // Jobs kept for busy nodes: look again as the nodes' expected finish times pass.
    next_held_pass_ms_ = now + options_.heartbeat_interval_ms;
    placement_dirty_ = true;
  }

  const int64_t dead_after = options_.heartbeat_interval_ms * options_.dead_after_missed_heartbeats;
  bool any_died = false;
  for (auto& [id, node] : nodes_) {
    if (!IsLive(node.state) || now - node.last_seen_ms <= dead_after) continue;
    Log(absl::StrCat("node ", id, " is dead (nothing heard for ", now - node.last_seen_ms,
                     " ms)"));
    NodeLost(node, kiln::v1::NODE_STATE_DEAD, "died");
    any_died = true;
  }
  if (any_died) RefreshWaitingReasons();

  if (now >= next_run_timeout_check_ms_) {
    next_run_timeout_check_ms_ = now + 250;
    CheckRunTimeouts(now);
  }

  const int64_t now_unix = clock_.UnixMs();
  while (!deadlines_.empty() && deadlines_.begin()->first <= now_unix) {
    const auto [deadline, job_id] = *deadlines_.begin();
    deadlines_.erase(deadlines_.begin());
    auto it = active_.find(job_id);
    if (it == active_.end() || !it->second.node_id.empty()) continue;  // only queued jobs
    Finish(job_id, kiln::v1::JOB_STATE_FAILED,
           absl::StrCat("DEADLINE_EXCEEDED: not started before its deadline (", deadline,
                        " unix ms)"));
  }

  while (!waits_by_deadline_.empty() && waits_by_deadline_.begin()->first <= now) {
    AnswerWait(waits_by_deadline_.begin()->second);
  }
  PlaceJobs();
}

std::vector<Outgoing> Coordinator::TakeOutgoing() {
  std::vector<Outgoing> out;
  out.swap(outgoing_);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Queue and placement

void Coordinator::Enqueue(const std::string& job_id, ActiveJob& job) {
  job.node_id.clear();
  if (job.kind.empty()) {
    job.kind = PackageSetKey(job.spec.model(), job.spec.precision(), job.spec.width(),
                             job.spec.height());
  }
  if (queue_.emplace(-static_cast<int64_t>(job.spec.priority()), job.seq, job_id).second &&
      !job.owner.empty()) {
    ++queued_by_owner_[job.owner];
  }
  if (job.spec.deadline_unix_ms() > 0) deadlines_.emplace(job.spec.deadline_unix_ms(), job_id);
  metrics_.queue_depth.Set(static_cast<double>(queue_.size()));
  placement_dirty_ = true;
}

void Coordinator::Dequeue(const std::string& job_id, const ActiveJob& job) {
  if (queue_.erase(QueueKey(-static_cast<int64_t>(job.spec.priority()), job.seq, job_id)) > 0 &&
      !job.owner.empty()) {
    auto it = queued_by_owner_.find(job.owner);
    if (it != queued_by_owner_.end() && --it->second == 0) queued_by_owner_.erase(it);
  }
  if (job.spec.deadline_unix_ms() > 0) deadlines_.erase({job.spec.deadline_unix_ms(), job_id});
  metrics_.queue_depth.Set(static_cast<double>(queue_.size()));
}

void Coordinator::PlaceJobs() {
  if (!placement_dirty_) return;
  placement_dirty_ = false;
  jobs_held_ = false;
  if (queue_.empty()) return;
  RefreshPlacementView();
  // Cheap when no slot is free (a Submit while the fleet is busy).
  if (view_free_total_ == 0) return;
  const int64_t now = clock_.NowMs();
  const double floor_s = costs_.options().overrun_floor_seconds;

  // The READY nodes this pass looks at, made from view_ when first needed: when each slot frees
  // (seconds from now, a min-heap), and a version that changes whenever a job is given to or
  // kept for the node.
  struct PassNode {
    NodeRecord* node = nullptr;
    absl::InlinedVector<double, 2> slots;
    std::optional<std::array<double, 4>> cold;  // CostModel::ColdStarts, when first needed
    size_t cls = 0;                             // run-time class (view_classes_)
    uint32_t slot = 0;                          // NodeIndex slot
    int free = 0;
    uint32_t version = 0;
    double avail0 = 0;                          // avail() when the pass began
    double avail() const { return slots.front(); }
  };
  std::vector<PassNode> pass;
  pass.reserve(view_.size());  // at most one per slot: references stay valid
  std::vector<int> by_slot(view_.size(), -1);  // NodeIndex slot → index into pass
  // The pass node of a slot view_ holds a node for.
  auto touch = [&](uint32_t slot) -> uint32_t {
    int& pi = by_slot[slot];
    if (pi >= 0) return static_cast<uint32_t>(pi);
    const ViewNode& v = view_[slot];
    PassNode p;
    p.node = v.node;
    p.slot = slot;
    p.cls = v.cls;
    p.free = v.free;
    // Its running slots: free ones now, then the ends of the jobs it holds. A job in a prefetch
    // slot runs once a running one frees, so of a node holding more jobs than it runs, the
    // latest `running` ends are when its running slots free for the next job.
    p.slots.assign(std::max(0, v.running - static_cast<int>(v.ends.size())), 0.0);
    for (double end_ms : v.ends) p.slots.push_back(std::max(floor_s, (end_ms - now) / 1000.0));
    std::sort(p.slots.begin(), p.slots.end());
    p.slots.erase(p.slots.begin(), p.slots.end() - v.running);
    p.avail0 = p.slots.front();
    pi = static_cast<int>(pass.size());
    pass.push_back(std::move(p));
    return static_cast<uint32_t>(pi);
  };
  int free_total = view_free_total_;
  auto reserve = [&](PassNode& p, double seconds) {
    std::pop_heap(p.slots.begin(), p.slots.end(), std::greater<>());
    p.slots.back() += seconds;
    std::push_heap(p.slots.begin(), p.slots.end(), std::greater<>());
    ++p.version;
  };
  // The nodes of each class by when a slot frees (free nodes first; view_ keeps the order in
  // absolute time, and (end − now) is monotonic in it). A pass only ever makes a node's wait
  // longer, so avail0 in this order bounds the wait of every node after a point: a kind's scan
  // of a class stops where no later node of it can beat the best found.
  const size_t class_count = view_classes_.size();
  auto order_of = [&](size_t c) -> const std::vector<uint32_t>& {
    return view_classes_[c].order;
  };

  // Per job kind met in this pass: its capable READY nodes scanned so far, in heaps by run-time
  // class, ordered by (ready in: slot wait + cold start, active jobs, last assignment, node id).
  struct HeapEntry {
    double ready_s = 0;
    int active = 0;
    int64_t last_assigned_ms = 0;
    absl::string_view id;
    size_t node = 0;  // into pass
    uint32_t version = 0;
    double cold_s = 0;
    auto Key() const { return std::make_tuple(ready_s, active, last_assigned_ms, id); }
  };
  auto later = [](const HeapEntry& a, const HeapEntry& b) { return a.Key() > b.Key(); };
  struct Group {
    CostModel::RunEstimate run;
    std::vector<HeapEntry> heap;
  };
  struct KindState {
    std::vector<Group> groups;  // by class
    const NodeIndex::KindNodes* nodes = nullptr;
    bool shared = false;        // cold nodes fetch from the shared store instead of compiling
    // By stream (class × 3 + kStream*): where the scan of the class's order for the nodes of
    // that warmth stands; the nodes of the stream before it are in the heaps.
    std::vector<size_t> scanned;
    std::optional<std::string> no_node_reason;  // computed when no READY node can run it
    kiln::v1::JobSpec lora_spec;  // model, precision and LoRAs of its jobs (LoraWarmthFor)
  };
  absl::flat_hash_map<std::string, KindState> kinds;
  auto fill = [&](HeapEntry& e) {
    const PassNode& p = pass[e.node];
    e.ready_s = p.avail() + e.cold_s;
    e.active = static_cast<int>(p.node->jobs.size());
    e.last_assigned_ms = p.node->last_assigned_ms;
    e.version = p.version;
  };
  auto init = [&](const ActiveJob& job, KindState& state) {
    state.nodes = &index_.ForKind(job.kind, job.spec);
    state.shared = costs_.InSharedStore(job.kind) || state.nodes->warm > 0;
    state.groups.resize(class_count);
    state.scanned.assign(3 * class_count, 0);
    for (size_t c = 0; c < class_count; ++c) {
      state.groups[c].run = costs_.Run(view_classes_[c].device_class, view_classes_[c].device,
                                       job.kind, job.spec.width(), job.spec.height());
    }
  };
  // Puts pass node `pi` in the kind's heaps if it can run the kind.
  auto add = [&](uint32_t pi, KindState& state, bool heapify) {
    PassNode& p = pass[pi];
    const int w = state.nodes->WarmthAt(p.slot);
    if (w < 0) return;
    const Warmth warmth = static_cast<Warmth>(w);
    const ColdTier tier = warmth == Warmth::kLoaded      ? ColdTier::kResident
                          : warmth == Warmth::kLocalDisk ? ColdTier::kLocalDisk
                          : state.shared                 ? ColdTier::kSharedStore
                                                         : ColdTier::kCompile;
    if (!p.cold) p.cold = costs_.ColdStarts(p.node->info.node_id(), p.node->device_class);
    HeapEntry e;
    e.id = p.node->info.node_id();
    e.node = pi;
    // Plus the LoRA term: a node whose weights hold the job's LoRA set needs no switch.
    e.cold_s = (*p.cold)[static_cast<int>(tier)] +
               costs_.LoraSeconds(LoraWarmthFor(p.node->info, state.lora_spec));
    fill(e);
    auto& heap = state.groups[p.cls].heap;
    heap.push_back(e);
    if (heapify) std::push_heap(heap.begin(), heap.end(), later);
  };
  // The reference (CoordinatorOptions::placement_full_scan): every capable node in the heaps at
  // the kind's first job.
  auto build_all = [&](KindState& state) {
    for (size_t c = 0; c < class_count; ++c) {
      for (uint32_t slot : order_of(c)) add(touch(slot), state, false);
      for (size_t w = 0; w < 3; ++w) state.scanned[3 * c + w] = order_of(c).size();
    }
    for (Group& g : state.groups) std::make_heap(g.heap.begin(), g.heap.end(), later);
  };

  // A node's stream for a kind: 0 loaded, 1 on local disk, 2 cold; -1 when it cannot run it.
  auto stream_of = [](const KindState& state, uint32_t slot) {
    const int w = state.nodes->WarmthAt(slot);
    return w < 0 ? -1 : 2 - w;
  };
  // The least cold start of a stream's tier on any node (CostModel::MinColdStarts, once a pass).
  std::optional<std::array<double, 4>> min_cold;
  auto stream_floor = [&](const KindState& state, size_t w) {
    if (w == 0) return 0.0;
    if (!min_cold) min_cold = costs_.MinColdStarts();
    const ColdTier tier = w == 1 ? ColdTier::kLocalDisk
                          : state.shared ? ColdTier::kSharedStore
                                         : ColdTier::kCompile;
    return (*min_cold)[static_cast<int>(tier)];
  };

  // Batches: per BatchKey, the READY batching nodes (NodeInfo.max_batch > 1) holding jobs of
  // that key not yet denoising — how many, and when the last of them is expected to end. Made
  // when the pass first needs it (one look at each READY node), then kept up to date as the
  // pass assigns.
  struct Mates {
    int count = 0;
    int64_t end_ms = 0;  // monotonic
  };
  std::optional<absl::flat_hash_map<std::string, absl::flat_hash_map<uint32_t, Mates>>> mates;
  auto batch_mates = [&]() -> auto& {
    if (mates) return *mates;
    mates.emplace();
    for (uint32_t slot = 0; slot < view_.size(); ++slot) {
      const NodeRecord* node = view_[slot].node;
      if (node == nullptr || node->info.max_batch() < 2) continue;
      for (const auto& id : node->jobs) {
        auto a = active_.find(id);
        if (a == active_.end() || a->second.denoising || a->second.cancelled) continue;
        Mates& m = (*mates)[BatchKey(a->second.spec)][slot];
        ++m.count;
        m.end_ms = std::max(m.end_ms, a->second.expected_end_ms);
      }
    }
    return *mates;
  };
  auto joined = [&](const PassNode& p, const ActiveJob& job) {
    if (!mates || p.node->info.max_batch() < 2) return;
    Mates& m = (*mates)[BatchKey(job.spec)][p.slot];
    ++m.count;
    m.end_ms = std::max(m.end_ms, job.expected_end_ms);
  };

  const int64_t now_unix = clock_.UnixMs();
  // Assign() erases the job's own queue entry only: step past it first.
  size_t examined = 0;
  for (auto q = queue_.begin(); q != queue_.end() && free_total > 0;) {
    if (examined++ == options_.placement_lookahead) {
      jobs_held_ = true;  // the jobs behind are looked at again once these move
      break;
    }
    const std::string job_id = std::get<2>(*q);
    ++q;
    auto it = active_.find(job_id);
    if (it == active_.end()) continue;
    ActiveJob& job = it->second;
    if (job.spec.deadline_unix_ms() > 0 && job.spec.deadline_unix_ms() <= now_unix) continue;
    // Jobs of a kind with different LoRA sets rank nodes differently: one state per set.
    auto [kind_it, inserted] =
        kinds.try_emplace(absl::StrCat(job.kind, "|", kiln::LoraSetKey(kiln::LorasOf(job.spec))));
    KindState& state = kind_it->second;
    if (inserted) {
      state.lora_spec.set_model(job.spec.model());
      state.lora_spec.set_precision(job.spec.precision());
      *state.lora_spec.mutable_loras() = job.spec.loras();
    }
    if (inserted && options_.placement == PlacementPolicy::kExpectedFinish) {
      init(job, state);
      if (options_.placement_full_scan) build_all(state);
    }

    // The node where this job is expected to finish first: the top of each class's heap, once
    // no node not yet scanned can beat it. A class's nodes are scanned in three streams by
    // their warmth for the kind (loaded, on local disk, cold), each in the class's order, so an
    // unscanned node's key is at least its avail0 + the least cold start of its stream's tier
    // on any node + its class's run: a cold node that frees early is not looked at while a warm
    // one that frees a little later wins.
    Group* best_group = nullptr;
    std::tuple<double, int, int64_t, absl::string_view> best_key;
    const bool latency_critical = job.spec.priority() >= options_.latency_priority;
    while (options_.placement == PlacementPolicy::kExpectedFinish) {
      best_group = nullptr;
      int next = -1;  // the stream whose next unscanned node could finish soonest
      double next_bound = 0;
      for (size_t c = 0; c < state.groups.size(); ++c) {
        Group& g = state.groups[c];
        const double run = g.run.For(job.spec.steps());
        // Throughput work ranks a node by its expected finish x its GPUs (latency_priority);
        // the factor is the class's, so each stream's bound stays a lower bound of its keys.
        const double gpus = latency_critical ? 1.0 : view_classes_[c].gpus;
        const auto& o = order_of(c);
        for (size_t w = 0; w < 3; ++w) {
          size_t& i = state.scanned[3 * c + w];
          while (i < o.size() && stream_of(state, o[i]) != static_cast<int>(w)) ++i;
          if (i == o.size()) continue;
          const double bound = ((pass[touch(o[i])].avail0 + stream_floor(state, w)) + run) * gpus;
          if (next < 0 || bound < next_bound) {
            next = static_cast<int>(3 * c + w);
            next_bound = bound;
          }
        }
        while (!g.heap.empty() && g.heap.front().version != pass[g.heap.front().node].version) {
          std::pop_heap(g.heap.begin(), g.heap.end(), later);
          fill(g.heap.back());
          std::push_heap(g.heap.begin(), g.heap.end(), later);
        }
        if (g.heap.empty()) continue;
        const HeapEntry& top = g.heap.front();
        auto k = std::make_tuple((top.ready_s + run) * gpus, top.active, top.last_assigned_ms,
                                 top.id);
        if (best_group == nullptr || k < best_key) {
          best_group = &g;
          best_key = k;
        }
      }
      if (next < 0) break;
      if (best_group != nullptr && std::get<0>(best_key) < next_bound) break;
      // Scan every node of that stream that frees at the same time, then look again.
      const auto& o = order_of(next / 3);
      const int w = next % 3;
      size_t& i = state.scanned[next];
      const double avail0 = pass[touch(o[i])].avail0;
      for (; i < o.size(); ++i) {
        if (stream_of(state, o[i]) != w) continue;
        const uint32_t pi = touch(o[i]);
        if (pass[pi].avail0 != avail0) break;
        add(pi, state, true);
      }
    }
    if (options_.placement != PlacementPolicy::kExpectedFinish) {
      // Baselines: a free capable node by a fixed rule, no costs.
      NodeRecord* chosen = nullptr;
      auto better = [&](NodeRecord* a, NodeRecord* b, Warmth wa, Warmth wb) {
        const auto ka = std::make_tuple(a->jobs.size(), a->last_assigned_ms, a->info.node_id());
        const auto kb = std::make_tuple(b->jobs.size(), b->last_assigned_ms, b->info.node_id());
        if (options_.placement == PlacementPolicy::kWarmthFirst && wa != wb) return wa > wb;
        if (options_.placement == PlacementPolicy::kRoundRobin) {
          // The first id after the last one given a job, wrapping around.
          const bool a_after = a->info.node_id() > round_robin_last_;
          const bool b_after = b->info.node_id() > round_robin_last_;
          if (a_after != b_after) return a_after;
          return a->info.node_id() < b->info.node_id();
        }
        return ka < kb;
      };
      Warmth chosen_warmth = Warmth::kCold;
      bool any = false;
      int chosen_pass = -1;
      for (const auto& entry : index_.Capable(job.kind, job.spec)) {
        if (entry.slot >= view_.size() || view_[entry.slot].node == nullptr) continue;
        const int pi = static_cast<int>(touch(entry.slot));
        any = true;
        if (pass[pi].free == 0) continue;
        NodeRecord* node = pass[pi].node;
        if (chosen == nullptr || better(node, chosen, entry.warmth, chosen_warmth)) {
          chosen = node;
          chosen_warmth = entry.warmth;
          chosen_pass = pi;
        }
      }
      if (!any) {
        if (!state.no_node_reason) state.no_node_reason = WaitingReasonFor(job.spec);
        SetWaitingReason(job_id, job, *state.no_node_reason);
        continue;
      }
      if (chosen == nullptr) {
        SetWaitingReason(job_id, job, kBusyReason);
        continue;
      }
      SetWaitingReason(job_id, job, "");
      PassNode& p = pass[chosen_pass];
      if (!Assign(job_id, job, *chosen, costs_.RunSeconds(chosen->info.device(), job.spec))) {
        placement_dirty_ = true;
        break;
      }
      round_robin_last_ = chosen->info.node_id();
      --p.free;
      --free_total;
      continue;
    }
    // A batching node with a free slot that holds jobs this one can join (same BatchKey, not
    // yet denoising, fewer than its max_batch) runs it with them: it finishes when they do. It
    // wins unless a node is expected to finish the job sooner. Jobs are still taken in queue
    // order, so this starves none: it only picks where a job goes.
    int host = -1;
    double host_s = 0, host_key = 0;
    if (auto found = batch_mates().find(BatchKey(job.spec)); found != mates->end()) {
      for (const auto& [slot, m] : found->second) {
        const uint32_t pi = touch(slot);
        const PassNode& p = pass[pi];
        if (p.free == 0 || m.count >= static_cast<int>(p.node->info.max_batch())) continue;
        const double finish_s = std::max(floor_s, (m.end_ms - now) / 1000.0);
        const double key = finish_s * (latency_critical ? 1.0 : view_classes_[p.cls].gpus);
        if (host < 0 || std::tie(key, p.node->info.node_id()) <
                            std::tie(host_key, pass[host].node->info.node_id())) {
          host = static_cast<int>(pi);
          host_s = finish_s;
          host_key = key;
        }
      }
    }
    if (host >= 0 && (best_group == nullptr || host_key <= std::get<0>(best_key))) {
      PassNode& p = pass[host];
      SetWaitingReason(job_id, job, "");
      if (!Assign(job_id, job, *p.node, host_s)) {
        placement_dirty_ = true;
        break;
      }
      joined(p, job);
      ++p.version;  // one more job held; its running slots' times are the batch's, unchanged
      --p.free;
      --free_total;
      continue;
    }
    if (best_group == nullptr) {
      if (!state.no_node_reason) state.no_node_reason = WaitingReasonFor(job.spec);
      SetWaitingReason(job_id, job, *state.no_node_reason);
      continue;
    }
    HeapEntry& top = best_group->heap.front();
    PassNode& p = pass[top.node];
    const double cost = top.cold_s + best_group->run.For(job.spec.steps());
    top.cold_s = 0;  // the next job of this kind there finds the packages loaded
    SetWaitingReason(job_id, job, p.free == 0 ? kBusyReason : "");
    if (p.free == 0) {
      // Expected to finish sooner by waiting for this busy node than anywhere free now.
      reserve(p, cost);
      jobs_held_ = true;
      continue;
    }
    // Its expected end counts the wait for a running slot (a job taken into a prefetch slot).
    if (!Assign(job_id, job, *p.node, p.avail() + cost)) {
      placement_dirty_ = true;  // the store refused; try again on the next event
      break;
    }
    joined(p, job);
    reserve(p, cost);
    --p.free;
    --free_total;
  }
}

int Coordinator::JobSlots(const NodeRecord& node) const {
  const uint32_t declared = node.info.job_slots();
  return declared > 0 ? static_cast<int>(declared) : options_.max_jobs_per_node;
}

int Coordinator::RunningSlots(const NodeRecord& node) const {
  return std::min(options_.max_jobs_per_node, JobSlots(node));
}

void Coordinator::MarkPlacementNode(const std::string& node_id) {
  view_marked_.insert(node_id);
}

void Coordinator::RefreshPlacementView() {
  if (options_.placement_full_scan) {
    // The reference: the view made again from the node table.
    view_.clear();
    view_slot_.clear();
    view_volatile_.clear();
    for (ViewClass& c : view_classes_) c.order.clear();
    view_free_total_ = 0;
    view_marked_.clear();
    for (const auto& [id, node] : nodes_) view_marked_.insert(id);
  }
  for (const auto& id : view_volatile_) view_marked_.insert(id);
  view_volatile_.clear();
  if (view_marked_.empty()) return;
  auto before = [this](uint32_t a, uint32_t b) {
    return std::tie(view_[a].order_key, a) < std::tie(view_[b].order_key, b);
  };
  // Out first, then in: a slot freed by one marked node may be taken by another.
  for (const auto& id : view_marked_) {
    auto it = view_slot_.find(id);
    if (it == view_slot_.end()) continue;
    const uint32_t slot = it->second;
    auto& order = view_classes_[view_[slot].cls].order;
    auto pos = std::lower_bound(order.begin(), order.end(), slot, before);
    if (pos != order.end() && *pos == slot) order.erase(pos);
    view_free_total_ -= view_[slot].free;
    view_[slot] = ViewNode();
    view_slot_.erase(it);
  }
  for (const auto& id : view_marked_) {
    auto it = nodes_.find(id);
    if (it == nodes_.end()) continue;
    NodeRecord& node = it->second;
    if (node.state != kiln::v1::NODE_STATE_READY || !node.unhealthy.empty()) continue;
    const int index_slot = index_.Slot(id);
    if (index_slot < 0) continue;
    const uint32_t slot = static_cast<uint32_t>(index_slot);
    if (slot >= view_.size()) view_.resize(slot + 1);
    ViewNode& v = view_[slot];
    v.node = &node;
    // Nodes share a run-time estimate when they share device class, kind and SM count (the
    // prior scales by the SMs).
    const auto& device = node.info.device();
    auto [cls, added] = view_class_ids_.try_emplace(
        absl::StrCat(node.device_class, "|", device.kind(), "|", device.sm_count()),
        view_classes_.size());
    if (added) {
      ViewClass c;
      c.device_class = node.device_class;
      c.device = device;
      c.gpus = GpuCount(device);
      view_classes_.push_back(std::move(c));
    }
    v.cls = cls->second;
    v.free = std::max(0, JobSlots(node) - static_cast<int>(node.jobs.size()));
    v.running = RunningSlots(node);
    for (const auto& job_id : node.jobs) {
      auto job = active_.find(job_id);
      double end_ms = 0;
      if (job != active_.end()) {
        if (job->second.expected_end_ms > 0) {
          end_ms = job->second.expected_end_ms;
        } else {
          // Recovered or claimed: estimated from what the cost model says now.
          end_ms = job->second.assigned_ms +
                   1000 * costs_.RunSeconds(node.info.device(), job->second.spec);
          v.volatile_end = true;
        }
      }
      v.ends.push_back(end_ms);
    }
    if (static_cast<int>(v.ends.size()) < v.running) {
      v.order_key = -std::numeric_limits<double>::infinity();
    } else {
      // The earliest of the latest `running` ends: when touch() finds its first running slot
      // free (the same order, in absolute time).
      std::vector<double> ends(v.ends.begin(), v.ends.end());
      auto first = ends.end() - v.running;
      std::nth_element(ends.begin(), first, ends.end());
      v.order_key = *first;
    }
    auto& order = view_classes_[v.cls].order;
    order.insert(std::lower_bound(order.begin(), order.end(), slot, before), slot);
    view_slot_[id] = slot;
    view_free_total_ += v.free;
    if (v.volatile_end) view_volatile_.insert(id);
  }
  view_marked_.clear();
}

bool Coordinator::Assign(const std::string& job_id, ActiveJob& job, NodeRecord& node,
                         double expected_s) {
  const std::string& node_id = node.info.node_id();
  const Warmth warmth = WarmthFor(node.info, job.spec);
  auto updated = store_.Update(job_id, [&](JobInfo& j) {
    j.set_state(kiln::v1::JOB_STATE_RUNNING);
    j.set_node_id(node_id);
    j.set_attempts(j.attempts() + 1);
    j.set_step(0);
    j.set_total_steps(job.spec.steps());
    j.clear_error();
    j.set_phase("assigned");
    j.set_queue_seconds(SecondsSince(job.submitted_ms));
    return absl::OkStatus();
  });
  if (!updated.ok()) {
    metrics_.store_errors.Increment();
    Log(absl::StrCat("cannot assign job ", job_id, ": job store: ", updated.status().message()));
    return false;
  }
  Dequeue(job_id, job);
  metrics_.queue_seconds.Observe(SecondsSince(job.enqueued_ms));
  metrics_.ObserveQueueWait(job.spec, SecondsSince(job.enqueued_ms));
  job.node_id = node_id;
  job.attempt = updated->attempts();
  job.assigned_ms = clock_.NowMs();
  job.expected_end_ms = job.assigned_ms + static_cast<int64_t>(1000 * expected_s);
  job.denoising = false;
  job.waiting_reason.clear();
  node.jobs.insert(job_id);
  node.last_assigned_ms = job.assigned_ms;
  MarkPlacementNode(node_id);

  kiln::v1::Envelope env;
  *env.mutable_assign()->mutable_spec() = job.spec;
  env.mutable_assign()->set_attempt(job.attempt);
  SendToNode(node_id, std::move(env));
  Log(absl::StrCat("job ", job_id, " assigned to node ", node_id, " (attempt ", job.attempt,
                   ", packages ", WarmthName(warmth), ")",
                   absl::StrFormat("; expected to take %.1f s", expected_s)));
  NotifyWaiters(*updated, /*final=*/false);
  return true;
}

std::string Coordinator::WaitingReasonFor(const kiln::v1::JobSpec& spec) const {
  std::vector<std::string> why, draining, dead;
  int ready = 0, registered = 0;
  for (const auto& [id, node] : nodes_) {
    if (node.state == kiln::v1::NODE_STATE_LEFT) continue;
    ++registered;
    absl::Status s = CheckCapable(node.info, spec);
    if (node.state != kiln::v1::NODE_STATE_READY || !node.unhealthy.empty()) {
      if (!s.ok()) continue;
      // An unhealthy READY node (its disk check fails) is counted with the draining ones.
      auto& list = node.state == kiln::v1::NODE_STATE_DEAD ? dead : draining;
      if (list.size() < 3) list.push_back(id);
      continue;
    }
    ++ready;
    if (s.ok()) return kBusyReason;
    if (why.size() < 3) why.emplace_back(s.message());
  }
  if (registered == 0) {
    return "waiting: no node has registered yet (it runs when one that serves it does)";
  }
  if (!draining.empty() || !dead.empty()) {
    std::string s = "waiting: the nodes that can run it are ";
    if (!draining.empty()) absl::StrAppend(&s, "draining (", absl::StrJoin(draining, ", "), ")");
    if (!draining.empty() && !dead.empty()) absl::StrAppend(&s, " or ");
    if (!dead.empty()) absl::StrAppend(&s, "dead (", absl::StrJoin(dead, ", "), ")");
    return s;
  }
  return ready == 0 ? "waiting: no node is ready"
                    : absl::StrCat("waiting: no ready node can run it (", absl::StrJoin(why, "; "),
                                   ready > 3 ? "; ..." : "", ")");
}

void Coordinator::RefreshWaitingReasons() {
  absl::flat_hash_map<std::string, std::string> by_kind;  // WaitingReasonFor, once per kind
  size_t examined = 0;
  for (const auto& [priority, seq, job_id] : queue_) {
    if (examined++ == options_.placement_lookahead) break;
    auto it = active_.find(job_id);
    if (it == active_.end() || !it->second.node_id.empty()) continue;
    auto [reason, fresh] = by_kind.try_emplace(it->second.kind);
    if (fresh) reason->second = WaitingReasonFor(it->second.spec);
    SetWaitingReason(job_id, it->second, reason->second);
  }
}

std::vector<const kiln::v1::NodeInfo*> Coordinator::RegisteredNodes() const {
  std::vector<const kiln::v1::NodeInfo*> nodes;
  for (const auto& [id, node] : nodes_) {
    if (node.state != kiln::v1::NODE_STATE_LEFT) nodes.push_back(&node.info);
  }
  return nodes;
}

absl::Status Coordinator::CheckServable(const kiln::v1::JobSpec& spec) {
  const std::vector<const kiln::v1::NodeInfo*> registered = RegisteredNodes();
  if (registered.empty()) return absl::OkStatus();  // waits for the first node
  // The index answers for kinds already seen; it is consulted only for a model some registered
  // node lists, so that unservable submissions do not add kinds to it.
  const bool model_listed =
      std::any_of(registered.begin(), registered.end(), [&](const kiln::v1::NodeInfo* n) {
        return std::find(n->models().begin(), n->models().end(), spec.model()) !=
               n->models().end();
      });
  if (model_listed) {
    const std::string kind =
        PackageSetKey(spec.model(), spec.precision(), spec.width(), spec.height());
    for (const auto& entry : index_.Capable(kind, spec)) {
      auto it = nodes_.find(entry.node_id);
      if (it != nodes_.end() && it->second.state != kiln::v1::NODE_STATE_LEFT) {
        return absl::OkStatus();
      }
    }
  }
  return CheckAnyServes(registered, spec);
}

void Coordinator::FailUnservableQueued() {
  if (RegisteredNodes().empty()) return;  // scaled to zero: the jobs wait for nodes
  std::vector<std::pair<std::string, std::string>> unservable;  // (job id, why)
  for (const auto& [priority, seq, job_id] : queue_) {
    auto it = active_.find(job_id);
    if (it == active_.end() || !it->second.node_id.empty()) continue;
    if (absl::Status s = CheckServable(it->second.spec); !s.ok()) {
      unservable.emplace_back(job_id, std::string(s.message()));
    }
  }
  for (const auto& [job_id, why] : unservable) {
    metrics_.submissions_unservable.Increment();
    Finish(job_id, kiln::v1::JOB_STATE_FAILED, absl::StrCat("FAILED_PRECONDITION: ", why));
  }
}

void Coordinator::SetWaitingReason(const std::string& job_id, ActiveJob& job,
                                   const std::string& reason) {
  if (absl::StartsWith(job.waiting_reason, kRequeuedPrefix)) return;  // kept until assigned
  if (reason == job.waiting_reason) return;
  job.waiting_reason = reason;
  auto s = store_.Update(job_id, [&](JobInfo& j) {
    j.set_error(reason);
    return absl::OkStatus();
  });
  if (!s.ok()) {
    metrics_.store_errors.Increment();
    Log(absl::StrCat("job store: ", s.status().message()));
    return;
  }
  NotifyWaiters(*s, /*final=*/false);  // streamed to clients that wait with progress
}

// ---------------------------------------------------------------------------------------------
// Transitions

void Coordinator::RequeueOrFail(const std::string& job_id, const std::string& code,
                                const std::string& why) {
  auto it = active_.find(job_id);
  if (it == active_.end()) return;
  ActiveJob& job = it->second;
  ReleaseFromNode(job_id, job);
  if (job.cancelled) {  // already CANCELLED in the store; only the slot was held
    active_.erase(it);
    return;
  }
  if (job.attempt >= options_.max_attempts) {
    Finish(job_id, kiln::v1::JOB_STATE_FAILED,
           absl::StrCat(code, ": ", why, " (", job.attempt, " attempts)"));
    return;
  }
  metrics_.jobs_requeued.Increment();
  job.waiting_reason = absl::StrCat(kRequeuedPrefix, " after ", why, " (attempt ", job.attempt,
                                    " of ", options_.max_attempts, ")");
  Log(absl::StrCat("job ", job_id, " requeued: ", why, " (attempt ", job.attempt, " of ",
                   options_.max_attempts, ")"));
  auto updated = store_.Update(job_id, [&](JobInfo& j) {
    j.set_state(kiln::v1::JOB_STATE_QUEUED);
    j.clear_node_id();
    j.set_step(0);
    j.set_error(job.waiting_reason);
    j.set_phase("queued");
    return absl::OkStatus();
  });
  job.enqueued_ms = clock_.NowMs();
  Enqueue(job_id, job);
  if (updated.ok()) {
    NotifyWaiters(*updated, /*final=*/false);
  } else {
    metrics_.store_errors.Increment();
    Log(absl::StrCat("job store: ", updated.status().message()));
  }
}

bool Coordinator::Finish(const std::string& job_id, JobState state, const std::string& error,
                         const std::function<void(JobInfo&)>& mutate) {
  auto it = active_.find(job_id);
  std::string node_id;
  if (it != active_.end()) node_id = it->second.node_id;
  auto updated = store_.Update(job_id, [&](JobInfo& j) {
    j.set_state(state);
    j.set_error(error);
    j.set_finished_unix_ms(clock_.UnixMs());
    j.clear_phase();
    if (mutate) mutate(j);
    return absl::OkStatus();
  });
  if (!updated.ok()) {
    // Nothing changed in the store, so nothing changes here either: a queued job stays queued,
    // a running one stays on its node (and is requeued if the node lets go of it).
    metrics_.store_errors.Increment();
    Log(absl::StrCat("job ", job_id, " ", StateName(state), " (", error,
                     ") but the job store refused it: ", updated.status().message()));
    return false;
  }
  if (it != active_.end() && node_id.empty()) Dequeue(job_id, it->second);
  switch (state) {
    case kiln::v1::JOB_STATE_SUCCEEDED:
      metrics_.jobs_succeeded.Increment();
      break;
    case kiln::v1::JOB_STATE_CANCELLED:
      metrics_.jobs_cancelled.Increment();
      break;
    default:
      metrics_.jobs_failed.Increment();
  }
  metrics_.ObserveFinished(*updated);
  if (state == kiln::v1::JOB_STATE_SUCCEEDED) {
    Log(absl::StrFormat("job %s succeeded on node %s (queued %.3f s, ran %.3f s, %d-byte PNG)",
                        job_id, updated->node_id(), updated->queue_seconds(),
                        updated->run_seconds(), updated->png().size()));
  } else {
    Log(absl::StrCat("job ", job_id, " ", StateName(state), ": ", error));
  }
  NotifyWaiters(*updated, /*final=*/true);
  if (it == active_.end()) return true;
  if (state == kiln::v1::JOB_STATE_CANCELLED && !node_id.empty()) {
    it->second.cancelled = true;  // the node's slot stays taken until it lets go of the job
  } else {
    ReleaseFromNode(job_id, it->second);
    active_.erase(it);
  }
  return true;
}

void Coordinator::ReleaseFromNode(const std::string& job_id, ActiveJob& job) {
  if (job.node_id.empty()) return;
  if (NodeRecord* node = FindNode(job.node_id)) node->jobs.erase(job_id);
  MarkPlacementNode(job.node_id);
  job.node_id.clear();
  placement_dirty_ = true;
}

void Coordinator::NodeLost(NodeRecord& node, NodeState new_state, const std::string& why) {
  node.state = new_state;
  MarkPlacementNode(node.info.node_id());
  // What a gone node held is no use to placement; dropping it bounds the memory of dead entries.
  node.info.clear_package_sets();
  node.info.clear_loaded_packages();
  node.info.clear_packages();
  index_.Update(node.info);
  UpdateNodeGauges();
  const std::set<std::string> jobs = node.jobs;
  for (const auto& job_id : jobs) {
    RequeueOrFail(job_id, "UNAVAILABLE",
                  absl::StrCat("node ", node.info.node_id(), " ", why, " while running it"));
  }
}

// ---------------------------------------------------------------------------------------------
// Waits

void Coordinator::NotifyWaiters(const JobInfo& job, bool final) {
  auto [begin, end] = waits_by_job_.equal_range(job.spec().job_id());
  std::vector<uint64_t> ids;
  for (auto it = begin; it != end; ++it) ids.push_back(it->second);
  for (uint64_t id : ids) {
    const PendingWait& wait = waits_.at(id);
    if (!final && !wait.stream) continue;
    Outgoing out;
    out.socket = Outgoing::Socket::kClient;
    out.peer = wait.reply_to.peer;
    out.envelope =
        JobReplyEnvelope(wait.reply_to.request_id, job, final && wait.include_png, final);
    outgoing_.push_back(std::move(out));
    if (final) EraseWait(id);
  }
}

absl::Status Coordinator::CheckOwner(const Caller& caller, const JobInfo& job) {
  if (caller.admin || job.owner() == caller.key) return absl::OkStatus();
  return absl::PermissionDeniedError(
      absl::StrCat("job ", job.spec().job_id(), " belongs to another client"));
}

bool Coordinator::NodeIsLive(const std::string& node_id) const {
  auto it = nodes_.find(node_id);
  return it != nodes_.end() && IsLive(it->second.state);
}

void Coordinator::CheckRunTimeouts(int64_t now) {
  if (options_.run_timeout_factor <= 0) return;
  std::vector<std::pair<std::string, std::string>> late;  // (job id, node id)
  for (const auto& [job_id, job] : active_) {
    if (job.node_id.empty() || job.cancelled || job.assigned_ms == 0) continue;
    const int64_t expected = std::max<int64_t>(0, job.expected_end_ms - job.assigned_ms);
    const int64_t limit = std::max<int64_t>(
        options_.run_timeout_min_ms, static_cast<int64_t>(options_.run_timeout_factor * expected));
    if (now - job.assigned_ms > limit) late.emplace_back(job_id, job.node_id);
  }
  for (const auto& [job_id, node_id] : late) {
    auto it = active_.find(job_id);
    if (it == active_.end()) continue;
    const int64_t ran = now - it->second.assigned_ms;
    Log(absl::StrCat("job ", job_id, " has run ", ran, " ms on node ", node_id,
                     " without a result (past its run timeout); requeued, node marked suspect"));
    metrics_.run_timeouts.Increment();
    kiln::v1::Envelope env;
    env.mutable_cancel_job()->set_job_id(job_id);
    SendToNode(node_id, std::move(env));
    if (NodeRecord* node = FindNode(node_id); node != nullptr && IsLive(node->state)) {
      node->suspect = true;
      if (node->state == kiln::v1::NODE_STATE_READY) {
        node->state = kiln::v1::NODE_STATE_DRAINING;
        MarkPlacementNode(node_id);
        UpdateNodeGauges();
      }
    }
    RequeueOrFail(job_id, "DEADLINE_EXCEEDED",
                  absl::StrCat("no result from node ", node_id, " within its run timeout (",
                               ran, " ms)"));
  }
  if (!late.empty()) PlaceJobs();
}

void Coordinator::AnswerWait(uint64_t id) {
  const PendingWait& wait = waits_.at(id);
  auto job = store_.Get(wait.job_id);
  Outgoing out;
  out.socket = Outgoing::Socket::kClient;
  out.peer = wait.reply_to.peer;
  out.envelope = job.ok() ? JobReplyEnvelope(wait.reply_to.request_id, std::move(*job),
                                             wait.include_png, /*final=*/true)
                          : ErrorEnvelope(job.status(), wait.reply_to.request_id);
  outgoing_.push_back(std::move(out));
  EraseWait(id);
}

void Coordinator::EraseWait(uint64_t id) {
  auto it = waits_.find(id);
  if (it == waits_.end()) return;
  waits_by_deadline_.erase({it->second.deadline_ms, id});
  if (auto c = waits_by_client_.find(it->second.client); c != waits_by_client_.end()) {
    c->second.erase(id);
    if (c->second.empty()) waits_by_client_.erase(c);
  }
  if (auto p = waits_by_peer_.find(it->second.reply_to.peer); p != waits_by_peer_.end()) {
    p->second.erase(id);
    if (p->second.empty()) waits_by_peer_.erase(p);
  }
  auto [begin, end] = waits_by_job_.equal_range(it->second.job_id);
  for (auto j = begin; j != end; ++j) {
    if (j->second == id) {
      waits_by_job_.erase(j);
      break;
    }
  }
  waits_.erase(it);
  metrics_.waits_pending.Set(static_cast<double>(waits_.size()));
}

size_t Coordinator::DropWaitsOf(const std::string& peer) {
  auto it = waits_by_peer_.find(peer);
  if (it == waits_by_peer_.end()) return 0;
  const std::vector<uint64_t> ids(it->second.begin(), it->second.end());  // EraseWait edits the set
  for (uint64_t id : ids) EraseWait(id);
  metrics_.waits_dropped_client_gone.Increment(static_cast<double>(ids.size()));
  return ids.size();
}

kiln::v1::Envelope Coordinator::JobReplyEnvelope(const std::string& request_id, JobInfo job,
                                                 bool include_png, bool final) const {
  kiln::v1::Envelope env;
  env.set_request_id(request_id);
  auto* reply = env.mutable_job();
  if (!include_png) job.clear_png();
  *reply->mutable_job() = std::move(job);
  reply->set_final(final);
  return env;
}

// ---------------------------------------------------------------------------------------------
// Nodes

Coordinator::NodeRecord* Coordinator::FindNode(const std::string& node_id) {
  auto it = nodes_.find(node_id);
  return it == nodes_.end() ? nullptr : &it->second;
}

absl::StatusOr<Coordinator::NodeRecord*> Coordinator::LiveNode(const std::string& node_id) {
  NodeRecord* node = FindNode(node_id);
  if (node == nullptr || !IsLive(node->state)) {
    const char* why = node == nullptr                               ? "is not registered"
                      : node->state == kiln::v1::NODE_STATE_DEAD ? "was declared dead"
                                                                    : "has deregistered";
    return absl::FailedPreconditionError(
        absl::StrCat("node ", node_id, " ", why, "; send RegisterNode"));
  }
  node->last_seen_ms = clock_.NowMs();
  node->last_seen_unix_ms = clock_.UnixMs();
  return node;
}

kiln::v1::NodeStatus Coordinator::NodeStatusOf(const NodeRecord& node) const {
  kiln::v1::NodeStatus status;
  *status.mutable_info() = node.info;
  status.set_state(node.state);
  for (const auto& job_id : node.jobs) status.add_running_jobs(job_id);
  status.set_queued_jobs(0);  // v1 queues jobs at the coordinator, not per node
  status.set_last_seen_unix_ms(node.last_seen_unix_ms);
  status.set_jobs_done(node.jobs_done);
  return status;
}

void Coordinator::MakeRoomForNode() {
  while (nodes_.size() >= options_.max_nodes) {
    auto oldest = nodes_.end();
    for (auto it = nodes_.begin(); it != nodes_.end(); ++it) {
      if (IsLive(it->second.state)) continue;
      if (oldest == nodes_.end() || it->second.last_seen_ms < oldest->second.last_seen_ms) {
        oldest = it;
      }
    }
    if (oldest == nodes_.end()) return;
    MarkPlacementNode(oldest->first);
    index_.Remove(oldest->first);
    costs_.ForgetNode(oldest->first);
    nodes_.erase(oldest);
  }
  UpdateNodeGauges();
}

void Coordinator::UpdateNodeGauges() {
  int ready = 0, draining = 0, dead = 0, left = 0;
  for (const auto& [id, node] : nodes_) {
    switch (node.state) {
      case kiln::v1::NODE_STATE_READY:
        ++ready;
        break;
      case kiln::v1::NODE_STATE_DRAINING:
        ++draining;
        break;
      case kiln::v1::NODE_STATE_DEAD:
        ++dead;
        break;
      default:
        ++left;
    }
  }
  metrics_.nodes_ready.Set(ready);
  metrics_.nodes_draining.Set(draining);
  metrics_.nodes_dead.Set(dead);
  metrics_.nodes_left.Set(left);
}

void Coordinator::SendToNode(const std::string& node_id, kiln::v1::Envelope env) {
  Outgoing out;
  out.socket = Outgoing::Socket::kNode;
  out.peer = node_id;
  out.envelope = std::move(env);
  outgoing_.push_back(std::move(out));
}

void Coordinator::Log(const std::string& line) {
  if (log_) log_(line);
}

}  // namespace kiln::coordinator
