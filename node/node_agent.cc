#include "node/node_agent.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <iostream>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cache/package_dir.h"
#include "cache/package_provider.h"
#include "common/wire.h"
#include "node/device_probe.h"

namespace kiln::node {
namespace fs = std::filesystem;
namespace {

constexpr int64_t kMaxPollMs = 200;        // upper bound on one poll: Stop/abort are also woken
constexpr int kDeregisterLingerMs = 2000;  // how long a closing socket may flush Deregister

void Log(const std::string& line) { std::cerr << "kiln-node: " << line << std::endl; }

bool ValidNodeId(const std::string& id) {
  if (id.empty() || id.size() > 128) return false;
  for (char c : id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != ':' &&
        c != '-') {
      return false;
    }
  }
  return true;
}

std::string ExecutableDir() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : p.parent_path().string();
}

std::string HostName() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "unknown";
  return buf;
}

std::string BodyName(const kiln::v1::Envelope& env) {
  const auto* field = env.GetDescriptor()->FindFieldByNumber(env.body_case());
  return field ? field->name() : "none";
}

}  // namespace

absl::Status NodeOptions::Validate() const {
  if (!ValidNodeId(node_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("node_id '", node_id, "': want 1..128 characters of [A-Za-z0-9._:-]"));
  }
  if (coordinator.rfind("tcp://", 0) != 0 && coordinator.rfind("ipc://", 0) != 0 &&
      coordinator.rfind("inproc://", 0) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("coordinator '", coordinator, "': want tcp://HOST:PORT"));
  }
  for (const auto& [name, dir] : models) {
    if (name.empty() || name.find('/') != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("models: bad model name '", name, "'"));
    }
    if (dir.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("models: ", name, " has no directory"));
    }
  }
  if (device != "cpu" && !CudaOrdinal(device).ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("device '", device, "': want cpu, cuda or cuda:N"));
  }
  auto check_precision = [&](const std::string& p, const char* field) -> absl::Status {
    if (std::find(cache::kPrecisions.begin(), cache::kPrecisions.end(), p) ==
        cache::kPrecisions.end()) {
      return absl::InvalidArgumentError(absl::StrCat(field, " '", p, "': want ",
                                                     absl::StrJoin(cache::kPrecisions, ", ")));
    }
    if (p == "fp8" && device == "cpu") {
      return absl::InvalidArgumentError(absl::StrCat(field, " fp8: needs a cuda device"));
    }
    return absl::OkStatus();
  };
  if (auto s = check_precision(precision, "precision"); !s.ok()) return s;
  for (const auto& p : precisions) {
    if (auto s = check_precision(p, "precisions"); !s.ok()) return s;
  }
  if (!precisions.empty() &&
      std::find(precisions.begin(), precisions.end(), precision) == precisions.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("precision '", precision, "': must be one of the served precisions"));
  }
  if (resolutions.empty()) return absl::InvalidArgumentError("resolutions: empty");
  if (package_dir.empty()) return absl::InvalidArgumentError("package_dir: required");
  if (auto s = link.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("link.", s.message()));
  }
  if (package_dir_max_bytes < 0) {
    return absl::InvalidArgumentError("package_dir_max_bytes: must be >= 0");
  }
  if (drain_timeout_ms < 0) return absl::InvalidArgumentError("drain_timeout_ms: must be >= 0");
  return absl::OkStatus();
}

std::vector<std::string> ListPackageDigests(const std::string& package_dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (fs::directory_iterator it(package_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (cache::IsDigest(name) && fs::exists(it->path() / "manifest.json", ec)) out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

absl::StatusOr<std::unique_ptr<NodeAgent>> NodeAgent::Create(NodeOptions options,
                                                             prometheus::Registry& registry,
                                                             const Clock* clock) {
  if (auto s = options.Validate(); !s.ok()) return s;
  if (options.models.empty()) return absl::InvalidArgumentError("models: at least one is required");
  if (options.hostname.empty()) options.hostname = HostName();
  // One provider for every pipeline (thread-safe; the worker runs one Generate() at a time).
  cache::TieredProviderConfig config;
  config.local.root = options.package_dir;
  config.local.max_bytes = options.package_dir_max_bytes;
  config.local.clock = clock;
  config.shared_root = options.shared_cache_dir;
  config.shared_host = options.hostname;
  if (options.allow_compile) {
    config.compiler_path =
        options.compiler_path.empty() ? ExecutableDir() + "/kiln-compile" : options.compiler_path;
  }
  config.tiered.node_id = options.node_id;
  config.tiered.clock = clock;
  auto provider = cache::OpenTieredProvider(std::move(config), &registry);
  if (!provider.ok()) return provider.status();
  std::shared_ptr<cache::PackageProvider> shared_provider = *std::move(provider);

  std::vector<std::string> precisions = options.precisions;
  if (precisions.empty()) precisions.push_back(options.precision);
  auto catalog = std::make_unique<ModelCatalog>(options.precision, options.resolutions);
  for (const auto& [name, dir] : options.models) {
    for (const auto& precision : precisions) {
      pipeline::PipelineOptions po;
      po.model_dir = dir;
      po.device = options.device;
      po.precision = precision;
      po.resolutions = options.resolutions;
      auto p = pipeline::FluxPipeline::Create(po, shared_provider);
      if (!p.ok()) {
        return absl::Status(p.status().code(),
                            absl::StrCat("model ", name, " (", dir, ", ", precision,
                                         "): ", p.status().message()));
      }
      catalog->Add(name, precision, std::make_unique<PipelineGenerator>(*std::move(p)));
    }
  }
  return CreateWithCatalog(std::move(options), std::move(catalog), registry, clock);
}

absl::StatusOr<std::unique_ptr<NodeAgent>> NodeAgent::CreateWithCatalog(
    NodeOptions options, std::unique_ptr<ModelCatalog> catalog, prometheus::Registry& registry,
    const Clock* clock) {
  if (auto s = options.Validate(); !s.ok()) return s;
  if (catalog == nullptr || catalog->models().empty()) {
    return absl::InvalidArgumentError("models: at least one is required");
  }
  if (options.hostname.empty()) options.hostname = HostName();
  if (options.device_info.kind().empty()) {
    options.device_info.set_kind(options.device == "cpu" ? "cpu" : "cuda");
  }
  std::unique_ptr<NodeAgent> agent(
      new NodeAgent(std::move(options), std::move(catalog), registry, clock));
  auto outbox = Outbox::Create();
  if (!outbox.ok()) return outbox.status();
  agent->outbox_ = *std::move(outbox);
  agent->worker_ =
      std::make_unique<Worker>(*agent->catalog_, *agent->outbox_, agent->metrics_, agent->clock_);
  try {
    agent->context_ = std::make_unique<zmq::context_t>(1);
  } catch (const zmq::error_t& e) {
    return absl::InternalError(absl::StrCat("zeromq context: ", e.what()));
  }
  return agent;
}

NodeAgent::NodeAgent(NodeOptions options, std::unique_ptr<ModelCatalog> catalog,
                     prometheus::Registry& registry, const Clock* clock)
    : options_(std::move(options)),
      own_clock_(clock ? nullptr : std::make_unique<SystemClock>()),
      clock_(clock ? *clock : *own_clock_),
      catalog_(std::move(catalog)),
      package_sets_(catalog_->PackageSets()),
      metrics_(registry, options_.node_id, options_.device, options_.device_info),
      link_(options_.link, clock_) {}

NodeAgent::~NodeAgent() {
  abort_ = true;
  if (outbox_) outbox_->Wake();
  if (io_thread_.joinable()) io_thread_.join();
  if (worker_) worker_->Shutdown(/*cancel_running=*/true);
}

absl::Status NodeAgent::Start() {
  if (started_) return absl::FailedPreconditionError("NodeAgent::Start: already started");
  started_ = true;
  worker_->Start();
  io_thread_ = std::thread([this] { IoMain(); });
  return absl::OkStatus();
}

void NodeAgent::Stop() {
  stop_requested_ = true;
  outbox_->Wake();
}

void NodeAgent::Wait() {
  if (io_thread_.joinable()) io_thread_.join();
  worker_->Shutdown(/*cancel_running=*/true);  // idle after a graceful stop
}

absl::Status NodeAgent::status() const {
  absl::MutexLock lock(&mu_);
  return status_;
}

void NodeAgent::IoMain() {
  absl::Status s;
  try {
    s = IoLoop();
  } catch (const zmq::error_t& e) {
    s = absl::InternalError(absl::StrCat("zeromq: ", e.what()));
  }
  try {
    // Linger only to flush a Deregister; anything else queued is for a coordinator that is gone.
    CloseSocket(deregistered_ ? kDeregisterLingerMs : 0);
  } catch (const zmq::error_t& e) {
    Log(absl::StrCat("closing the socket: ", e.what()));
  }
  if (!s.ok()) Log(absl::StrCat("stopped: ", s.ToString()));
  {
    absl::MutexLock lock(&mu_);
    status_ = s;
  }
  done_ = true;
}

absl::Status NodeAgent::IoLoop() {
  while (!abort_) {
    if (stop_requested_ && !draining_) BeginDrain();
    if (socket_ == nullptr && link_.ShouldConnect()) Connect();

    // Read idle() before draining the outbox: an idle worker has queued its last result.
    const bool worker_idle = worker_->idle();
    for (auto& env : outbox_->Drain()) Route(std::move(env));
    FlushResults();
    if (draining_ && worker_idle) {
      if (results_.empty()) {
        if (link_.registered()) {
          kiln::v1::Envelope bye;
          bye.mutable_deregister()->set_reason("shutting down");
          deregistered_ = Send(std::move(bye));
          Log("deregistered; exiting");
        } else {
          Log("stopped while not registered; exiting");
        }
        return absl::OkStatus();
      }
      if (clock_.NowMs() - drain_started_ms_ > options_.drain_timeout_ms) {
        Log(absl::StrCat("giving up: ", results_.size(),
                         " job result(s) could not be delivered, no coordinator registered us"));
        return absl::OkStatus();
      }
    }

    zmq_pollitem_t items[2] = {{nullptr, outbox_->fd(), ZMQ_POLLIN, 0},
                               {socket_ ? socket_->handle() : nullptr, 0, ZMQ_POLLIN, 0}};
    const int64_t timeout = std::min(link_.MsUntilNextEvent(), kMaxPollMs);
    try {
      zmq::poll(items, socket_ ? 2 : 1, std::chrono::milliseconds(timeout));
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) throw;
      continue;  // interrupted by a signal: go round again
    }
    if (socket_ && (items[1].revents & ZMQ_POLLIN)) Receive();

    if (link_.HeartbeatDue()) {
      // Results the worker finished since the top of the loop go out first: its running list no
      // longer names those jobs, and a heartbeat without them (and without their results) would
      // make the coordinator requeue a job that is done.
      for (auto& env : outbox_->Drain()) Route(std::move(env));
      FlushResults();
      Send(HeartbeatMessage());
      link_.OnHeartbeatSent();
    }
    if (socket_ && link_.PeerDead()) {
      Log(absl::StrCat("coordinator ", options_.coordinator, " silent for ",
                       options_.link.missed_heartbeats, " heartbeat intervals; reconnecting in ",
                       link_.next_backoff_ms(), " ms"));
      metrics_.reconnects.Increment();
      CloseSocket(0);
      link_.OnDisconnected();
    }
  }
  return absl::OkStatus();
}

void NodeAgent::Connect() {
  socket_ = std::make_unique<zmq::socket_t>(*context_, zmq::socket_type::dealer);
  socket_->set(zmq::sockopt::routing_id, options_.node_id);
  socket_->set(zmq::sockopt::linger, 0);
  socket_->connect(options_.coordinator);
  Send(RegisterMessage());
  link_.OnRegisterSent();
  Log(absl::StrCat("registering with ", options_.coordinator, " as ", options_.node_id));
}

void NodeAgent::CloseSocket(int linger_ms) {
  if (socket_ == nullptr) return;
  socket_->set(zmq::sockopt::linger, linger_ms);
  socket_->close();
  socket_.reset();
}

bool NodeAgent::Send(kiln::v1::Envelope env) {
  if (socket_ == nullptr) return false;
  const std::string bytes = Encode(std::move(env));
  // dontwait: a DEALER blocks when its queue is full; the I/O thread must never block.
  auto sent = socket_->send(zmq::buffer(bytes), zmq::send_flags::dontwait);
  if (!sent) Log("send queue to the coordinator is full; message dropped");
  return sent.has_value();
}

void NodeAgent::Receive() {
  while (socket_ != nullptr) {
    std::vector<zmq::message_t> frames;
    auto got = zmq::recv_multipart(*socket_, std::back_inserter(frames), zmq::recv_flags::dontwait);
    if (!got) return;
    link_.OnHeard();
    Handle(frames.empty() ? std::string() : frames.front().to_string(), frames.size());
  }
}

void NodeAgent::ProtocolError(const absl::Status& error, const std::string& request_id) {
  Log(absl::StrCat("protocol error from the coordinator: ", error.message()));
  metrics_.protocol_errors.Increment();
  Send(ErrorEnvelope(error, request_id));
}

void NodeAgent::Handle(const std::string& frame, size_t frames) {
  if (frames != 1) {
    ProtocolError(absl::InvalidArgumentError(absl::StrCat(
                      "expected one frame holding an Envelope, got ", frames)),
                  "");
    return;
  }
  auto env = Decode(frame);
  if (!env.ok()) {
    ProtocolError(env.status(), "");
    return;
  }
  switch (env->body_case()) {
    case kiln::v1::Envelope::kRegisterAck:
      if (link_.state() == CoordinatorLink::State::kRegistering) {
        link_.OnRegistered(env->register_ack().heartbeat_interval_ms());
        registered_once_ = true;
        Log(absl::StrCat("registered; heartbeat every ", link_.heartbeat_interval_ms(), " ms"));
        FlushResults();
      }
      return;
    case kiln::v1::Envelope::kHeartbeat:
      return;  // liveness only; OnHeard() has counted it
    case kiln::v1::Envelope::kAssign:
      OnAssign(env->assign());
      return;
    case kiln::v1::Envelope::kCancelJob:
      OnCancel(env->cancel_job());
      return;
    case kiln::v1::Envelope::kError: {
      const auto& e = env->error();
      Log(absl::StrCat("coordinator error reply: ", e.code(), " ", e.field(), " ", e.message()));
      // Never answer an error with one.
      if (link_.state() == CoordinatorLink::State::kRegistering) {
        Log(absl::StrCat("registration refused; retrying in ", link_.next_backoff_ms(), " ms"));
        CloseSocket(0);
        link_.OnDisconnected();
      } else if (link_.registered() && e.code() == "FAILED_PRECONDITION") {
        // The coordinator no longer knows this node (it restarted, or declared the node dead).
        Log("the coordinator does not know this node; registering again");
        Send(RegisterMessage());
        link_.OnRegisterSent();
      }
      return;
    }
    default:
      ProtocolError(absl::InvalidArgumentError(absl::StrCat(
                        "unexpected message '", BodyName(*env), "' on the node socket")),
                    env->request_id());
  }
}

void NodeAgent::OnAssign(const kiln::v1::AssignJob& assign) {
  const auto& spec = assign.spec();
  if (draining_) {
    metrics_.jobs_rejected.Increment();
    QueueResult(ErrorResult(spec.job_id(), assign.attempt(),
                            absl::UnavailableError("node is shutting down")));
    return;
  }
  auto plan = catalog_->Plan(spec);
  if (!plan.ok()) {
    Log(absl::StrCat("job ", spec.job_id(), " rejected: ", plan.status().message()));
    metrics_.jobs_rejected.Increment();
    QueueResult(ErrorResult(spec.job_id(), assign.attempt(), plan.status()));
    return;
  }
  Job job;
  job.spec = spec;
  job.attempt = assign.attempt();
  job.plan = *std::move(plan);
  if (!worker_->Enqueue(std::move(job))) {
    Log(absl::StrCat("job ", spec.job_id(), " is already running or queued here; ignored"));
    return;
  }
  Log(absl::StrCat("job ", spec.job_id(), " assigned (attempt ", assign.attempt(), ")"));
}

void NodeAgent::OnCancel(const kiln::v1::CancelJob& cancel) {
  switch (worker_->Cancel(cancel.job_id())) {
    case Worker::CancelOutcome::kStopping:
      Log(absl::StrCat("job ", cancel.job_id(), ": cancelling after its current step"));
      break;
    case Worker::CancelOutcome::kDequeued:
      Log(absl::StrCat("job ", cancel.job_id(), ": cancelled before it started"));
      break;
    case Worker::CancelOutcome::kNotFound:
      Log(absl::StrCat("job ", cancel.job_id(), ": cancel for a job not here; ignored"));
      break;
  }
}

void NodeAgent::Route(kiln::v1::Envelope env) {
  if (env.has_result()) {
    QueueResult(std::move(env));
  } else if (link_.registered()) {
    Send(std::move(env));  // progress: only useful now; dropped while disconnected
  }
}

void NodeAgent::QueueResult(kiln::v1::Envelope env) {
  results_.push_back(std::move(env));
  FlushResults();
}

void NodeAgent::FlushResults() {
  while (link_.registered() && !results_.empty()) {
    const std::string id = results_.front().result().job_id();
    const bool ok = results_.front().result().ok();
    if (!Send(results_.front())) return;  // queue full: retry on the next loop
    Log(absl::StrCat("job ", id, ok ? " done" : " failed", "; result sent"));
    results_.pop_front();
  }
}

void NodeAgent::BeginDrain() {
  draining_ = true;
  drain_started_ms_ = clock_.NowMs();
  for (Job& job : worker_->TakeQueued()) {
    metrics_.jobs_rejected.Increment();
    QueueResult(ErrorResult(job.spec.job_id(), job.attempt,
                            absl::UnavailableError("node is shutting down")));
  }
  const auto active = worker_->ActiveJobIds();
  Log(active.empty() ? std::string("stopping")
                     : absl::StrCat("stopping after job ", active.front(), " finishes"));
}

kiln::v1::Envelope NodeAgent::RegisterMessage() const {
  kiln::v1::Envelope env;
  auto* info = env.mutable_register_node()->mutable_info();
  info->set_node_id(options_.node_id);
  *info->mutable_device() = options_.device_info;
  *info->mutable_toolchain() = BuildToolchain();
  for (const auto& m : catalog_->models()) info->add_models(m);
  for (const auto& d : ListPackageDigests(options_.package_dir)) info->add_packages(d);
  for (const auto& d : worker_->LoadedPackages()) info->add_loaded_packages(d);
  info->set_can_compile(options_.allow_compile);
  info->set_metrics_url(options_.metrics_url);
  info->set_pid(static_cast<uint32_t>(getpid()));
  info->set_hostname(options_.hostname);
  for (const auto& [key, digests] : package_sets_) {
    auto& set = (*info->mutable_package_sets())[key];
    for (const auto& d : digests) set.add_digests(d);
  }
  return env;
}

kiln::v1::Envelope NodeAgent::HeartbeatMessage() const {
  kiln::v1::Envelope env;
  auto* hb = env.mutable_heartbeat();
  for (const auto& id : worker_->ActiveJobIds()) hb->add_running_jobs(id);
  // A job whose result is waiting to be delivered (e.g. during a reconnect) is still ours.
  for (const auto& r : results_) {
    if (r.has_result()) hb->add_running_jobs(r.result().job_id());
  }
  for (const auto& d : worker_->LoadedPackages()) hb->add_loaded_packages(d);
  for (const auto& d : ListPackageDigests(options_.package_dir)) hb->add_packages(d);
  return env;
}

}  // namespace kiln::node
