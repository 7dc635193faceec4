#include "node/node_session.h"

#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cache/local_disk_store.h"
#include "common/wire.h"
#include "node/device_probe.h"
#include "node/health.h"
#include "node/worker.h"

namespace kiln::node {
namespace {

std::string BodyName(const kiln::v1::Envelope& env) {
  const auto* field = env.GetDescriptor()->FindFieldByNumber(env.body_case());
  return field ? field->name() : "none";
}

}  // namespace

NodeSession::NodeSession(const NodeOptions& options, const ModelCatalog& catalog, JobRunner& jobs,
                         Outbox& from_worker, const cache::LocalDiskStore* packages,
                         NodeMetrics& metrics, const Clock& clock, CoordinatorChannel& channel,
                         NodeLog log)
    : options_(options),
      catalog_(catalog),
      jobs_(jobs),
      from_worker_(from_worker),
      packages_(packages),
      metrics_(metrics),
      clock_(clock),
      channel_(channel),
      log_(std::move(log)),
      package_sets_(catalog.PackageSets()),
      link_(options.link, clock, SplitEndpoints(options.coordinator)) {}

void NodeSession::Log(const std::string& line) const {
  if (log_) log_(line);
}

void NodeSession::Tick() {
  if (finished_) return;
  if (link_.ShouldConnect()) Connect();
  NoteUnhealthyGenerators();

  // Read idle() before taking the worker's messages: an idle runner has queued its last result.
  const bool worker_idle = jobs_.idle();
  RouteFromWorker();
  FlushResults();
  if (draining_ && worker_idle) {
    if (results_.empty()) {
      FinishDrain();
      return;
    }
    if (clock_.NowMs() - drain_started_ms_ > options_.drain_timeout_ms) {
      Log(absl::StrCat("giving up: ", results_.size(),
                       " job result(s) could not be delivered, no coordinator registered us"));
      finished_ = true;
      return;
    }
  }

  if (link_.HeartbeatDue()) {
    // Results the worker finished since the top of this call go out first: its running list no
    // longer names those jobs, and a heartbeat without them (and without their results) would
    // make the coordinator requeue a job that is done.
    RouteFromWorker();
    FlushResults();
    SendHeartbeat();
  }
  if (link_.PeerDead()) {
    Log(absl::StrCat("coordinator ", link_.endpoint(), " silent for ",
                     options_.link.missed_heartbeats, " heartbeat intervals; reconnecting in ",
                     link_.next_backoff_ms(), " ms"));
    metrics_.reconnects.Increment();
    channel_.Disconnect();
    link_.OnDisconnected();
  }
}

void NodeSession::SendHeartbeat() {
  kiln::v1::Envelope hb = HeartbeatMessage();
  const std::string reason = hb.heartbeat().unhealthy();
  if (channel_.Send(hb)) unhealthy_sent_ = reason;
  link_.OnHeartbeatSent();
}

void NodeSession::Connect() {
  channel_.Connect(link_.endpoint());
  channel_.Send(RegisterMessage());
  link_.OnRegisterSent();
  Log(absl::StrCat("registering with ", link_.endpoint(), " as ", options_.node_id));
}

void NodeSession::FinishDrain() {
  if (link_.registered()) {
    kiln::v1::Envelope bye;
    bye.mutable_deregister()->set_reason("shutting down");
    deregistered_ = channel_.Send(bye);
    Log("deregistered; exiting");
  } else {
    Log("stopped while not registered; exiting");
  }
  finished_ = true;
}

void NodeSession::OnBadFrame(const absl::Status& error) {
  link_.OnHeard();  // any frame, well-formed or not, shows the coordinator is alive
  ProtocolError(error, "");
}

void NodeSession::ProtocolError(const absl::Status& error, const std::string& request_id) {
  Log(absl::StrCat("protocol error from the coordinator: ", error.message()));
  metrics_.protocol_errors.Increment();
  channel_.Send(ErrorEnvelope(error, request_id));
}

void NodeSession::OnMessage(const kiln::v1::Envelope& env) {
  link_.OnHeard();
  switch (env.body_case()) {
    case kiln::v1::Envelope::kRegisterAck:
      if (link_.state() == CoordinatorLink::State::kRegistering) {
        link_.OnRegistered(env.register_ack().heartbeat_interval_ms());
        registered_once_ = true;
        Log(absl::StrCat("registered; heartbeat every ", link_.heartbeat_interval_ms(), " ms"));
        FlushResults();
      }
      return;
    case kiln::v1::Envelope::kHeartbeat:
      return;  // liveness only; OnHeard() has counted it
    case kiln::v1::Envelope::kAssign:
      OnAssign(env.assign());
      return;
    case kiln::v1::Envelope::kCancelJob:
      OnCancel(env.cancel_job());
      return;
    case kiln::v1::Envelope::kError:
      OnError(env.error());  // never answered
      return;
    default:
      ProtocolError(absl::InvalidArgumentError(absl::StrCat(
                        "unexpected message '", BodyName(env), "' on the node socket")),
                    env.request_id());
  }
}

void NodeSession::OnError(const kiln::v1::ErrorReply& e) {
  Log(absl::StrCat("coordinator error reply: ", e.code(), " ", e.field(), " ", e.message()));
  if (link_.state() == CoordinatorLink::State::kRegistering) {
    Log(absl::StrCat("registration refused; retrying in ", link_.next_backoff_ms(), " ms"));
    channel_.Disconnect();
    link_.OnDisconnected();
  } else if (link_.registered() && e.code() == "FAILED_PRECONDITION") {
    // The coordinator no longer knows this node (it restarted, or declared the node dead).
    Log("the coordinator does not know this node; registering again");
    channel_.Send(RegisterMessage());
    link_.OnRegisterSent();
  }
}

void NodeSession::OnAssign(const kiln::v1::AssignJob& assign) {
  const auto& spec = assign.spec();
  if (draining_) {
    metrics_.jobs_rejected.Increment();
    QueueResult(ErrorResult(spec.job_id(), assign.attempt(),
                            absl::UnavailableError("node is shutting down")));
    return;
  }
  if (disk_ != nullptr) {
    if (absl::Status disk = disk_->status(); !disk.ok()) {
      metrics_.jobs_rejected.Increment();
      Log(absl::StrCat("job ", spec.job_id(), " refused: ", disk.message()));
      QueueResult(ErrorResult(
          spec.job_id(), assign.attempt(),
          absl::Status(disk.code(), absl::StrCat("node ", options_.node_id, ": ",
                                                 disk_->reason(),
                                                 "; the job moves to another node"))));
      return;
    }
  }
  auto plan = catalog_.Plan(spec);
  if (!plan.ok()) {
    Log(absl::StrCat("job ", spec.job_id(), " rejected: ", plan.status().message()));
    metrics_.jobs_rejected.Increment();
    QueueResult(ErrorResult(spec.job_id(), assign.attempt(), plan.status()));
    return;
  }
  if (!plan->generator->Health().ok()) {  // its rank group failed: the job goes elsewhere
    NoteUnhealthyGenerators();
    metrics_.jobs_rejected.Increment();
    const absl::Status refused = GeneratorFailure(absl::OkStatus(), *plan->generator, plan->model,
                                                  plan->precision, options_.node_id);
    Log(absl::StrCat("job ", spec.job_id(), " refused: ", refused.message()));
    QueueResult(ErrorResult(spec.job_id(), assign.attempt(), refused));
    return;
  }
  Job job;
  job.spec = spec;
  job.attempt = assign.attempt();
  job.plan = *std::move(plan);
  if (!jobs_.Enqueue(std::move(job))) {
    Log(absl::StrCat("job ", spec.job_id(), " is already running or queued here; ignored"));
    return;
  }
  Log(absl::StrCat("job ", spec.job_id(), " assigned (attempt ", assign.attempt(), ")"));
}

void NodeSession::OnCancel(const kiln::v1::CancelJob& cancel) {
  switch (jobs_.Cancel(cancel.job_id())) {
    case JobRunner::CancelOutcome::kStopping:
      Log(absl::StrCat("job ", cancel.job_id(), ": cancelling after its current step"));
      break;
    case JobRunner::CancelOutcome::kDequeued:
      Log(absl::StrCat("job ", cancel.job_id(), ": cancelled before it started"));
      break;
    case JobRunner::CancelOutcome::kNotFound:
      Log(absl::StrCat("job ", cancel.job_id(), ": cancel for a job not here; ignored"));
      break;
  }
}

void NodeSession::RouteFromWorker() {
  for (auto& env : from_worker_.Drain()) {
    if (env.has_result()) {
      QueueResult(std::move(env));
    } else if (link_.registered()) {
      channel_.Send(env);  // progress: only useful now; dropped while disconnected
    }
  }
}

void NodeSession::QueueResult(kiln::v1::Envelope env) {
  results_.push_back(std::move(env));
  FlushResults();
}

void NodeSession::FlushResults() {
  // A disk that broke (or healed) is announced before the results it explains, so the
  // coordinator does not place the requeued job here again.
  if (link_.registered() && !results_.empty() && UnhealthyReason() != unhealthy_sent_) {
    SendHeartbeat();
  }
  while (link_.registered() && !results_.empty()) {
    const std::string id = results_.front().result().job_id();
    const bool ok = results_.front().result().ok();
    if (!channel_.Send(results_.front())) return;  // queue full: retry on the next Tick()
    Log(absl::StrCat("job ", id, ok ? " done" : " failed", "; result sent"));
    results_.pop_front();
  }
}

void NodeSession::Drain() {
  if (draining_) return;
  draining_ = true;
  drain_started_ms_ = clock_.NowMs();
  // Every job not denoising goes back now, to be placed elsewhere. All are queued before the
  // flush: the heartbeat announcing the drain goes out first (FlushResults) and still lists each
  // of them, so the coordinator neither places anything here again nor requeues one twice.
  std::vector<std::string> handed_back;
  for (Job& job : jobs_.TakeQueued()) {
    metrics_.jobs_rejected.Increment();
    handed_back.push_back(job.spec.job_id());
    results_.push_back(ErrorResult(job.spec.job_id(), job.attempt,
                                   absl::UnavailableError("node is shutting down")));
  }
  if (!handed_back.empty()) {
    Log(absl::StrCat("handing back job(s) not started: ", absl::StrJoin(handed_back, ", ")));
  }
  RouteFromWorker();
  FlushResults();
  const auto active = jobs_.ActiveJobIds();
  Log(active.empty() ? std::string("stopping")
                     : absl::StrCat("stopping after job ", active.front(), " finishes"));
}

std::vector<std::string> NodeSession::DiskPackages() const {
  if (packages_ == nullptr) return {};
  std::vector<std::string> digests = packages_->List();  // oldest use first
  std::sort(digests.begin(), digests.end());
  return digests;
}

kiln::v1::Envelope NodeSession::RegisterMessage() const {
  kiln::v1::Envelope env;
  auto* info = env.mutable_register_node()->mutable_info();
  info->set_node_id(options_.node_id);
  *info->mutable_device() = options_.device_info;
  *info->mutable_toolchain() = BuildToolchain();
  for (const auto& m : catalog_.models()) info->add_models(m);
  for (const auto& d : DiskPackages()) info->add_packages(d);
  for (const auto& d : jobs_.LoadedPackages()) info->add_loaded_packages(d);
  info->set_can_compile(options_.allow_compile);
  info->set_can_fetch(!options_.shared_cache_dir.empty());
  info->set_metrics_url(options_.metrics_url);
  info->set_pid(static_cast<uint32_t>(getpid()));
  info->set_hostname(options_.hostname);
  info->set_job_slots(static_cast<uint32_t>(options_.AdvertisedJobSlots()));
  info->set_max_batch(static_cast<uint32_t>(options_.batching.max_batch));
  for (const auto& name : catalog_.AvailableLoras()) info->add_loras(name);
  for (const auto& [key, set] : jobs_.AppliedLoras()) (*info->mutable_applied_loras())[key] = set;
  for (const auto& [key, digests] : package_sets_) {
    auto& set = (*info->mutable_package_sets())[key];
    for (const auto& d : digests) set.add_digests(d);
  }
  return env;
}

kiln::v1::Envelope NodeSession::HeartbeatMessage() const {
  kiln::v1::Envelope env;
  auto* hb = env.mutable_heartbeat();
  for (const auto& id : jobs_.ActiveJobIds()) hb->add_running_jobs(id);
  // A job whose result is waiting to be delivered (e.g. during a reconnect) is still ours.
  for (const auto& r : results_) {
    if (r.has_result()) hb->add_running_jobs(r.result().job_id());
  }
  for (const auto& d : jobs_.LoadedPackages()) hb->add_loaded_packages(d);
  for (const auto& d : DiskPackages()) hb->add_packages(d);
  hb->set_unhealthy(UnhealthyReason());
  for (const auto& name : catalog_.AvailableLoras()) hb->add_loras(name);
  for (const auto& [key, set] : jobs_.AppliedLoras()) (*hb->mutable_applied_loras())[key] = set;
  return env;
}

std::string NodeSession::UnhealthyReason() const {
  if (draining_) return "node is shutting down";
  std::string disk = disk_ != nullptr ? disk_->reason() : "";
  if (!disk.empty()) return disk;
  return GeneratorsReason(catalog_.UnhealthyGenerators());
}

void NodeSession::NoteUnhealthyGenerators() {
  for (const auto& u : catalog_.UnhealthyGenerators()) {
    if (!failed_generators_.insert(u.model + "/" + u.precision).second) continue;
    metrics_.rank_group_failures.Add({{"model", u.model}, {"precision", u.precision}})
        .Increment();
    Log(absl::StrCat("model ", u.model, " (", u.precision, ") takes no more jobs until the node "
                     "is restarted; the node reports itself unhealthy: ", u.health.message()));
  }
}

}  // namespace kiln::node
