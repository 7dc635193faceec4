#include "node/node_agent.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/wire.h"

namespace kiln::node {
namespace {

constexpr int64_t kMaxPollMs = 200;        // upper bound on one poll: Stop/abort are also woken
constexpr int kDeregisterLingerMs = 2000;  // how long a closing socket may flush Deregister

constexpr char kComponent[] = "node";

std::string HostName() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "unknown";
  return buf;
}

}  // namespace

// The session's CoordinatorChannel: one DEALER socket at a time, used only by the I/O thread.
// zmq::error_t from connect/close propagates to IoMain (fatal); sends never block.
class NodeAgent::Channel : public CoordinatorChannel {
 public:
  Channel(std::string node_id, CurveClient curve)
      : node_id_(std::move(node_id)), curve_(std::move(curve)) {}

  void Connect(const std::string& endpoint) override {
    Close(0);
    socket_ = std::make_unique<zmq::socket_t>(context_, zmq::socket_type::dealer);
    socket_->set(zmq::sockopt::routing_id, node_id_);
    socket_->set(zmq::sockopt::linger, 0);
    // Validated in NodeOptions; a failure here is a bug, reported like other zmq errors.
    if (auto s = ApplyCurveClient(socket_->handle(), curve_); !s.ok()) {
      throw zmq::error_t();
    }
    socket_->connect(endpoint);
  }
  void Disconnect() override { Close(0); }
  bool Send(const kiln::v1::Envelope& env) override {
    if (socket_ == nullptr) return false;
    const std::string bytes = Encode(env);
    // dontwait: a DEALER blocks when its queue is full; the I/O thread must never block.
    auto sent = socket_->send(zmq::buffer(bytes), zmq::send_flags::dontwait);
    if (!sent) LogWarning(kComponent, "send queue to the coordinator is full; message dropped");
    return sent.has_value();
  }

  // Closes the socket, letting it flush for up to `linger_ms`.
  void Close(int linger_ms) {
    if (socket_ == nullptr) return;
    socket_->set(zmq::sockopt::linger, linger_ms);
    socket_->close();
    socket_.reset();
  }
  zmq::socket_t* socket() { return socket_.get(); }

 private:
  const std::string node_id_;
  const CurveClient curve_;
  zmq::context_t context_{1};
  std::unique_ptr<zmq::socket_t> socket_;
};

absl::StatusOr<std::unique_ptr<NodeAgent>> NodeAgent::Create(
    NodeOptions options, std::unique_ptr<ModelCatalog> catalog,
    std::shared_ptr<const cache::LocalDiskStore> packages, prometheus::Registry& registry,
    const Clock* clock) {
  if (auto s = options.Validate(); !s.ok()) return s;
  if (catalog == nullptr || catalog->models().empty()) {
    return absl::InvalidArgumentError("models: at least one is required");
  }
  if (options.hostname.empty()) options.hostname = HostName();
  if (options.device_info.kind().empty()) {
    options.device_info.set_kind(options.device == "cpu" ? "cpu" : "cuda");
  }
  // A multi-GPU node (--gpus) is one placement target over all its devices.
  if (!options.gpus.empty()) options.device_info.set_gpu_count(options.gpus.size());
  auto outbox = Outbox::Create();
  if (!outbox.ok()) return outbox.status();
  std::unique_ptr<NodeAgent> agent(new NodeAgent(std::move(options), std::move(catalog),
                                                 std::move(packages), registry, clock));
  agent->outbox_ = *std::move(outbox);
  DiskHealthOptions disk;
  disk.dir = agent->options_.package_dir;
  disk.interval_ms = agent->options_.disk_check_interval_ms;
  agent->disk_ = std::make_unique<DiskHealth>(std::move(disk));
  agent->worker_ =
      std::make_unique<Worker>(*agent->catalog_, *agent->outbox_, agent->metrics_, agent->clock_,
                               agent->options_.batching);
  agent->worker_->set_disk_health(agent->disk_.get(), agent->options_.node_id);
  try {
    agent->channel_ = std::make_unique<Channel>(agent->options_.node_id, agent->options_.curve);
  } catch (const zmq::error_t& e) {
    return absl::InternalError(absl::StrCat("zeromq context: ", e.what()));
  }
  agent->session_ = std::make_unique<NodeSession>(
      agent->options_, *agent->catalog_, *agent->worker_, *agent->outbox_, agent->packages_.get(),
      agent->metrics_, agent->clock_, *agent->channel_, LineLogger(kComponent));
  agent->session_->set_disk_health(agent->disk_.get());
  return agent;
}

NodeAgent::NodeAgent(NodeOptions options, std::unique_ptr<ModelCatalog> catalog,
                     std::shared_ptr<const cache::LocalDiskStore> packages,
                     prometheus::Registry& registry, const Clock* clock)
    : options_(std::move(options)),
      own_clock_(clock ? nullptr : std::make_unique<SystemClock>()),
      clock_(clock ? *clock : *own_clock_),
      catalog_(std::move(catalog)),
      packages_(std::move(packages)),
      metrics_(registry, options_.node_id, options_.device, options_.device_info) {}

NodeAgent::~NodeAgent() {
  abort_ = true;
  if (outbox_) outbox_->Wake();
  if (io_thread_.joinable()) io_thread_.join();
  if (worker_) worker_->Shutdown(/*cancel_running=*/true);
  if (disk_) disk_->Stop();
}

absl::Status NodeAgent::Start() {
  if (started_) return absl::FailedPreconditionError("NodeAgent::Start: already started");
  started_ = true;
  disk_->Start();
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
    IoLoop();
  } catch (const zmq::error_t& e) {
    s = absl::InternalError(absl::StrCat("zeromq: ", e.what()));
  }
  try {
    // Linger only to flush a Deregister; anything else queued is for a coordinator that is gone.
    channel_->Close(session_->deregistered() ? kDeregisterLingerMs : 0);
  } catch (const zmq::error_t& e) {
    LogWarning(kComponent, absl::StrCat("closing the socket: ", e.what()));
  }
  if (!s.ok()) LogError(kComponent, absl::StrCat("stopped: ", s.ToString()));
  {
    absl::MutexLock lock(&mu_);
    status_ = s;
  }
  done_ = true;
}

void NodeAgent::IoLoop() {
  while (!abort_) {
    if (stop_requested_) session_->Drain();
    session_->Tick();
    registered_once_ = session_->registered_once();
    if (session_->finished()) return;

    zmq::socket_t* socket = channel_->socket();
    zmq_pollitem_t items[2] = {{nullptr, outbox_->fd(), ZMQ_POLLIN, 0},
                               {socket ? socket->handle() : nullptr, 0, ZMQ_POLLIN, 0}};
    const int64_t timeout = std::min(session_->MsUntilNextEvent(), kMaxPollMs);
    try {
      zmq::poll(items, socket ? 2 : 1, std::chrono::milliseconds(timeout));
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) throw;
      continue;  // interrupted by a signal: go round again
    }
    if (socket && (items[1].revents & ZMQ_POLLIN)) Receive();
  }
}

void NodeAgent::Receive() {
  // The session may close the socket while handling a message (a refused registration).
  while (zmq::socket_t* socket = channel_->socket()) {
    std::vector<zmq::message_t> frames;
    auto got = zmq::recv_multipart(*socket, std::back_inserter(frames), zmq::recv_flags::dontwait);
    if (!got) return;
    if (frames.size() != 1) {
      session_->OnBadFrame(absl::InvalidArgumentError(
          absl::StrCat("expected one frame holding an Envelope, got ", frames.size())));
      continue;
    }
    auto env = Decode(frames.front().to_string_view());
    if (env.ok()) {
      session_->OnMessage(*env);
    } else {
      session_->OnBadFrame(env.status());
    }
  }
}

}  // namespace kiln::node
