#include "metrics/metrics_server.h"

#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <cerrno>
#include <exception>
#include <mutex>
#include <string>
#include <utility>

#include "CivetServer.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "prometheus/gauge.h"
#include "prometheus/text_serializer.h"

#ifndef KILN_VERSION
#define KILN_VERSION "0.0.0"
#endif
#ifndef KILN_GIT_COMMIT
#define KILN_GIT_COMMIT "unknown"
#endif
#ifndef KILN_BUILD_TORCH_VERSION
#define KILN_BUILD_TORCH_VERSION ""
#endif
#ifndef KILN_BUILD_CUDA_VERSION
#define KILN_BUILD_CUDA_VERSION ""
#endif

// Debian's civetweb (1.15) makes its threads with a fixed 100 KiB stack
// (pthread_attr_setstacksize(attr, 102400)). glibc puts a process's static TLS inside every
// thread's stack, and a process that links a CUDA LibTorch at load time (kiln-node, kiln-run) has
// more static TLS than that: pthread_create fails, and civetweb says "Cannot create threads" (every
// kiln-node on the GPU host, 2026-12-06). This definition, exported by the executable
// (CMakeLists.txt), takes the place of libc's for civetweb: a stack smaller than the default a
// thread gets (RLIMIT_STACK, usually 8 MiB; address space, touched only as used) is raised to it.
// Larger requests and every other caller pass through unchanged.
extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t size) noexcept {
  using Fn = int (*)(pthread_attr_t*, size_t);
  static const Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  static const size_t floor = [] {
    pthread_attr_t defaults;
    size_t bytes = 0;
    if (pthread_attr_init(&defaults) == 0) {
      pthread_attr_getstacksize(&defaults, &bytes);
      pthread_attr_destroy(&defaults);
    }
    return bytes;
  }();
  if (real == nullptr) return ENOSYS;
  return real(attr, std::max(size, floor));
}

namespace kiln::metrics {

// The one civetweb handler: every GET goes through MetricsServer::Serve.
class MetricsServer::Dispatcher : public CivetHandler {
 public:
  explicit Dispatcher(MetricsServer& owner) : owner_(owner) {}

  bool handleGet(CivetServer*, mg_connection* conn) override {
    const mg_request_info* req = mg_get_request_info(conn);
    const std::string path = req->local_uri ? req->local_uri : "/";
    const std::string query = req->query_string ? req->query_string : "";
    HttpResponse r;
    try {
      r = owner_.Serve(path, query);
    } catch (const std::exception& e) {  // a handler bug must not take the process down
      r = {500, "text/plain; charset=utf-8", absl::StrCat("internal error: ", e.what(), "\n")};
    }
    mg_response_header_start(conn, r.status);
    mg_response_header_add(conn, "Content-Type", r.content_type.c_str(), -1);
    mg_response_header_add(conn, "Content-Length", std::to_string(r.body.size()).c_str(), -1);
    mg_response_header_add(conn, "Cache-Control", "no-store", -1);
    mg_response_header_add(conn, "Access-Control-Allow-Origin", "*", -1);
    mg_response_header_send(conn);
    if (req->request_method == nullptr || std::string(req->request_method) != "HEAD") {
      mg_write(conn, r.body.data(), r.body.size());
    }
    return true;
  }
  bool handleHead(CivetServer* s, mg_connection* conn) override { return handleGet(s, conn); }

 private:
  MetricsServer& owner_;
};

namespace {
// civetweb says why it could not start (a port in use, an option it refuses, a socket it could
// not make) only through its log_message callback; CivetServer's exception just says "null
// context". Start() collects those lines, one start at a time, so that its error names the cause.
std::mutex start_mu;                     // held through one CivetServer construction
std::string* start_messages = nullptr;  // that start's collected lines (guarded by start_mu)
std::mutex messages_mu;                 // guards start_messages against civetweb's threads

int CollectStartMessage(const mg_connection*, const char* message) {
  std::lock_guard<std::mutex> lock(messages_mu);
  if (start_messages == nullptr || message == nullptr) return 0;  // civetweb's default handling
  if (start_messages->size() < 2000) {
    if (!start_messages->empty()) start_messages->append("; ");
    start_messages->append(message);
  }
  return 1;
}
}  // namespace

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& bind) {
  auto colon = bind.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("metrics address '", bind, "': want HOST:PORT"));
  }
  std::unique_ptr<MetricsServer> s(new MetricsServer());
  s->registry_ = std::make_shared<prometheus::Registry>();
  const BuildInfo& build = ThisBuild();
  prometheus::BuildGauge()
      .Name("kiln_build_info")
      .Help("Always 1; labels describe the kiln build this process runs")
      .Register(*s->registry_)
      .Add({{"version", build.version},
            {"git_commit", build.git_commit},
            {"torch", build.torch},
            {"cuda", build.cuda}})
      .Set(1);
  s->dispatcher_ = std::make_unique<Dispatcher>(*s);
  try {
    // Scrapes, probes and a status page are light and rare, but a civetweb worker is held by
    // each open connection until its request arrives: idle or slow connections (a port scan, a
    // load balancer's pre-opened sockets) must not starve /metrics. So: more workers than
    // plausible idle peers, a short limit on waiting for a request, no keep-alive (a scraper
    // reconnects each time; an idle kept-alive connection would hold a worker too).
    const std::vector<std::string> options = {
        "listening_ports", bind,  "num_threads",       "16", "request_timeout_ms", "2000",
        "enable_keep_alive", "no"};
    // No `linger_timeout_ms` of 0: that closes with a reset, which discards what the socket has
    // not sent yet, so a client reading a large body (a status-page PNG) lost its end.
    CivetCallbacks callbacks;
    callbacks.log_message = CollectStartMessage;
    std::lock_guard<std::mutex> one_start(start_mu);
    std::string messages;
    {
      std::lock_guard<std::mutex> lock(messages_mu);
      start_messages = &messages;
    }
    std::string failure;
    try {
      s->server_ = std::make_unique<CivetServer>(options, &callbacks);
    } catch (const std::exception& e) {  // CivetException: "null context ..."
      failure = e.what();
    }
    {
      std::lock_guard<std::mutex> lock(messages_mu);
      start_messages = nullptr;
    }
    if (s->server_ == nullptr) {
      return absl::UnavailableError(absl::StrCat(
          "cannot serve metrics on ", bind, ": ",
          messages.empty() ? failure : absl::StrCat(messages, " (civetweb)")));
    }
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", bind, ": ", e.what()));
  }
  s->server_->addHandler("/", s->dispatcher_.get());
  auto ports = s->server_->getListeningPorts();
  if (ports.empty()) return absl::UnavailableError(absl::StrCat("metrics: not listening on ", bind));
  s->port_ = ports.front();
  std::string host = bind.substr(0, colon);
  if (host == "0.0.0.0" || host.empty() || host == "*") host = "127.0.0.1";
  s->base_url_ = absl::StrCat("http://", host, ":", s->port_);
  s->url_ = absl::StrCat(s->base_url_, "/metrics");
  return s;
}

MetricsServer::~MetricsServer() {
  // Join civetweb's threads before the handlers and the registry they read go away.
  if (server_) server_->close();
  server_.reset();
}

void MetricsServer::SetReadiness(std::function<absl::Status()> ready) {
  absl::MutexLock lock(&mu_);
  ready_ = std::move(ready);
}

void MetricsServer::Handle(const std::string& path, HttpHandler handler) {
  absl::MutexLock lock(&mu_);
  handlers_[path] = std::move(handler);
}

HttpResponse MetricsServer::Serve(const std::string& path, const std::string& query) {
  if (path == "/metrics") {
    return {200, "text/plain; version=0.0.4; charset=utf-8",
            prometheus::TextSerializer().Serialize(registry_->Collect())};
  }
  if (path == "/healthz") return {200, "text/plain; charset=utf-8", "ok\n"};
  HttpHandler handler;
  {
    absl::MutexLock lock(&mu_);
    // Longest registered path that is `path` itself or a folder ("…/") above it.
    for (const auto& [route, h] : handlers_) {
      const bool match = route == path || (absl::EndsWith(route, "/") &&
                                           absl::StartsWith(path, route));
      if (match) handler = h;  // std::map order: a longer match of the same prefix comes later
    }
  }
  if (path == "/readyz") {
    // Called under mu_, so that SetReadiness() waits for a call in flight: a process may then
    // destroy what its old callback read.
    absl::Status s;
    {
      absl::MutexLock lock(&mu_);
      s = ready_ ? ready_() : absl::OkStatus();
    }
    if (s.ok()) return {200, "text/plain; charset=utf-8", "ready\n"};
    return {503, "text/plain; charset=utf-8", absl::StrCat("not ready: ", s.message(), "\n")};
  }
  if (handler) return handler(path, query);
  return {404, "text/plain; charset=utf-8",
          absl::StrCat("not found: ", path, " (try /metrics, /healthz, /readyz)\n")};
}

std::vector<double> DurationBuckets() {
  return {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800};
}

const BuildInfo& ThisBuild() {
  static const BuildInfo info{KILN_VERSION, KILN_GIT_COMMIT, KILN_BUILD_TORCH_VERSION,
                              KILN_BUILD_CUDA_VERSION};
  return info;
}

}  // namespace kiln::metrics
