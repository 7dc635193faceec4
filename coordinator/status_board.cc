#include "coordinator/status_board.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"

namespace kiln::coordinator {
namespace {

using nlohmann::json;

std::string Lower(const std::string& enum_name, absl::string_view prefix) {
  return absl::AsciiStrToLower(absl::StripPrefix(enum_name, prefix));
}

std::string JobStateName(kiln::v1::JobState s) {
  return Lower(kiln::v1::JobState_Name(s), "JOB_STATE_");
}
std::string NodeStateName(kiln::v1::NodeState s) {
  return Lower(kiln::v1::NodeState_Name(s), "NODE_STATE_");
}

// "http://10.0.0.5:9401/metrics" → {"10.0.0.5:9401", "/metrics"}; empty target if unparsable.
std::pair<std::string, std::string> TargetOf(const std::string& url) {
  absl::string_view rest = url;
  if (!absl::ConsumePrefix(&rest, "http://")) return {"", ""};
  const size_t slash = rest.find('/');
  std::string host_port(rest.substr(0, slash));
  std::string path = slash == absl::string_view::npos ? "/metrics" : std::string(rest.substr(slash));
  if (host_port.find(':') == std::string::npos) return {"", ""};
  return {host_port, path};
}

json JobJson(const kiln::v1::JobInfo& j, bool with_image) {
  const kiln::v1::JobSpec& s = j.spec();
  std::string prompt = s.prompt();
  if (prompt.size() > 200) prompt = prompt.substr(0, 200) + "...";
  json packages = json::object();
  for (const auto& [component, source] : j.packages()) packages[component] = source;
  json out = {{"job_id", s.job_id()},
              {"model", s.model()},
              {"prompt", prompt},
              {"width", s.width()},
              {"height", s.height()},
              {"steps", s.steps()},
              {"precision", s.precision()},
              {"priority", s.priority()},
              {"state", JobStateName(j.state())},
              {"node_id", j.node_id()},
              {"attempts", j.attempts()},
              {"step", j.step()},
              {"total_steps", j.total_steps()},
              {"error", j.error()},
              {"queue_seconds", j.queue_seconds()},
              {"run_seconds", j.run_seconds()},
              {"submitted_unix_ms", j.submitted_unix_ms()},
              {"finished_unix_ms", j.finished_unix_ms()},
              {"cold_start_seconds", j.cold_start().total_seconds()},
              {"packages", packages},
              {"thumbnail", nullptr}};
  if (with_image) out["thumbnail"] = absl::StrCat("/status/jobs/", s.job_id(), ".png");
  return out;
}

}  // namespace

absl::Status StatusBoardOptions::Validate() const {
  if (refresh_ms <= 0) return absl::InvalidArgumentError("refresh_ms: must be > 0");
  if (stale_after_ms <= refresh_ms) {
    return absl::InvalidArgumentError("stale_after_ms: must be > refresh_ms");
  }
  return absl::OkStatus();
}

StatusBoard::StatusBoard(const StatusBoardOptions& options, const Clock& clock,
                         CoordinatorMetrics& metrics)
    : options_(options), clock_(clock), metrics_(metrics) {
  metrics_.SetFinishedListener([this](const kiln::v1::JobInfo& job) {
    absl::MutexLock lock(&recent_mu_);
    const std::string& id = job.spec().job_id();
    recent_ids_.erase(std::remove(recent_ids_.begin(), recent_ids_.end(), id), recent_ids_.end());
    recent_ids_.push_front(id);
    if (recent_ids_.size() > options_.recent_jobs) recent_ids_.pop_back();
    scaling_.ObserveFinished(job);
  });
}

StatusBoard::~StatusBoard() { metrics_.SetFinishedListener(nullptr); }

void StatusBoard::MaybeRefresh(const Coordinator& coordinator, const JobStore& store) {
  const int64_t now = clock_.NowMs();
  if (last_refresh_ms_ >= 0 && now - last_refresh_ms_ < options_.refresh_ms) return;
  Refresh(coordinator, store);
}

void StatusBoard::Refresh(const Coordinator& coordinator, const JobStore& store) {
  last_refresh_ms_ = clock_.NowMs();
  auto snap = std::make_shared<Snapshot>();
  snap->taken_ms = last_refresh_ms_;

  // Nodes: the page lists all the coordinator knows; discovery and the busy gauges live ones.
  const kiln::v1::ListNodesReply nodes = coordinator.ListNodes();
  json node_list = json::array(), sd = json::array();
  std::map<std::string, bool> busy;
  for (const kiln::v1::NodeStatus& n : nodes.nodes()) {
    const kiln::v1::NodeInfo& info = n.info();
    const kiln::v1::DeviceInfo& d = info.device();
    const bool live =
        n.state() == kiln::v1::NODE_STATE_READY || n.state() == kiln::v1::NODE_STATE_DRAINING;
    json running = json::array();
    for (const auto& id : n.running_jobs()) running.push_back(id);
    json models = json::array();
    for (const auto& m : info.models()) models.push_back(m);
    node_list.push_back({{"node_id", info.node_id()},
                         {"state", NodeStateName(n.state())},
                         {"hostname", info.hostname()},
                         {"device",
                          {{"kind", d.kind()},
                           {"name", d.name()},
                           {"mig_profile", d.mig_profile()},
                           {"uuid", d.uuid()},
                           {"memory_bytes", d.memory_bytes()},
                           {"sm_count", d.sm_count()}}},
                         {"models", models},
                         {"metrics_url", info.metrics_url()},
                         {"running_jobs", running},
                         {"jobs_done", n.jobs_done()},
                         {"last_seen_unix_ms", n.last_seen_unix_ms()}});
    if (!live) continue;
    busy[info.node_id()] = n.running_jobs_size() > 0;
    auto [target, path] = TargetOf(info.metrics_url());
    if (target.empty()) continue;
    sd.push_back({{"targets", {target}},
                  {"labels",
                   {{"__metrics_path__", path},
                    {"node", info.node_id()},
                    {"device", d.name()},
                    {"device_kind", d.kind()},
                    {"mig_profile", d.mig_profile()},
                    {"gpu_uuid", d.uuid()}}}});
  }
  metrics_.SetNodeBusy(busy);

  // Jobs.
  std::vector<kiln::v1::JobInfo> queued, running, finished;
  auto read = [&](kiln::v1::JobState state, std::vector<kiln::v1::JobInfo>* into) {
    auto jobs = store.List(state);
    if (!jobs.ok()) {
      if (snap->store.ok()) snap->store = jobs.status();
      return;
    }
    for (auto& j : *jobs) into->push_back(std::move(j));
  };
  // Queued jobs from the coordinator's memory (its queue can hold 100,000; listing them all in the
  // store every second would stall the poll loop), the first `queued_jobs` read from the store.
  const std::vector<kiln::v1::JobSpec> queued_specs = coordinator.QueuedSpecs();
  {
    std::vector<std::string> ids;
    for (size_t i = 0; i < queued_specs.size() && i < options_.queued_jobs; ++i) {
      ids.push_back(queued_specs[i].job_id());
    }
    for (auto& job : store.GetMany(ids)) {
      if (job.ok()) {
        if (job->state() == kiln::v1::JOB_STATE_QUEUED) queued.push_back(std::move(*job));
      } else if (!absl::IsNotFound(job.status()) && snap->store.ok()) {
        snap->store = job.status();
      }
    }
  }
  read(kiln::v1::JOB_STATE_RUNNING, &running);
  if (snap->store.ok()) metrics_.SetScalingSignal(scaling_.Compute(nodes, queued_specs));
  std::deque<std::string> recent_ids;
  {
    absl::MutexLock lock(&recent_mu_);
    recent_ids = recent_ids_;
  }
  for (auto& job : store.GetMany({recent_ids.begin(), recent_ids.end()})) {
    if (job.ok()) {
      finished.push_back(std::move(*job));
    } else if (!absl::IsNotFound(job.status()) && snap->store.ok()) {
      snap->store = job.status();  // NotFound: the store has forgotten it (retention)
    }
  }
  std::sort(queued.begin(), queued.end(), [](const auto& a, const auto& b) {
    return std::make_pair(-static_cast<int64_t>(a.spec().priority()), a.submitted_unix_ms()) <
           std::make_pair(-static_cast<int64_t>(b.spec().priority()), b.submitted_unix_ms());
  });
  std::sort(finished.begin(), finished.end(), [](const auto& a, const auto& b) {
    return a.finished_unix_ms() > b.finished_unix_ms();
  });
  if (finished.size() > options_.recent_jobs) finished.resize(options_.recent_jobs);
  json queue_list = json::array(), running_list = json::array(), recent = json::array();
  for (size_t i = 0; i < queued.size() && i < options_.queued_jobs; ++i) {
    queue_list.push_back(JobJson(queued[i], false));
  }
  for (const auto& j : running) running_list.push_back(JobJson(j, false));
  for (const auto& j : finished) {
    const bool image = j.state() == kiln::v1::JOB_STATE_SUCCEEDED && !j.png().empty();
    if (image) snap->pngs[j.spec().job_id()] = j.png();
    recent.push_back(JobJson(j, image));
  }

  json status = {{"generated_unix_ms", clock_.UnixMs()},
                 {"store", snap->store.ok() ? "ok" : std::string(snap->store.message())},
                 {"nodes", node_list},
                 {"queue", {{"depth", coordinator.queue_depth()}, {"jobs", queue_list}}},
                 {"running", running_list},
                 {"recent", recent}};
  snap->status_json = status.dump(-1, ' ', false, json::error_handler_t::replace);
  snap->sd_json = sd.dump(-1, ' ', false, json::error_handler_t::replace);
  absl::MutexLock lock(&mu_);
  snapshot_ = std::move(snap);
}

void StatusBoard::Install(metrics::MetricsServer& server) {
  server.Handle("/sd", [this](const std::string&, const std::string&) { return ServiceDiscovery(); });
  server.Handle("/status", [this](const std::string&, const std::string&) {
    return Status("/status/");
  });
  server.Handle("/status/",
                [this](const std::string& path, const std::string&) { return Status(path); });
  server.SetReadiness([this] { return Ready(); });
}

metrics::HttpResponse StatusBoard::ServiceDiscovery() const {
  std::shared_ptr<const Snapshot> snap;
  {
    absl::MutexLock lock(&mu_);
    snap = snapshot_;
  }
  return {200, "application/json", snap ? snap->sd_json : "[]"};
}

metrics::HttpResponse StatusBoard::Status(const std::string& path) const {
  std::shared_ptr<const Snapshot> snap;
  {
    absl::MutexLock lock(&mu_);
    snap = snapshot_;
  }
  if (path == "/status/" || path == "/status/index.html") {
    return {200, "text/html; charset=utf-8", StatusPageHtml()};
  }
  if (path == "/status/api") {
    if (!snap) return {503, "application/json", "{\"error\":\"starting\"}"};
    return {200, "application/json", snap->status_json};
  }
  absl::string_view rest = path;
  if (absl::ConsumePrefix(&rest, "/status/jobs/") && absl::ConsumeSuffix(&rest, ".png") && snap) {
    auto it = snap->pngs.find(std::string(rest));
    if (it != snap->pngs.end()) return {200, "image/png", it->second};
  }
  return {404, "text/plain; charset=utf-8", absl::StrCat("not found: ", path, "\n")};
}

absl::Status StatusBoard::Ready() const {
  std::shared_ptr<const Snapshot> snap;
  {
    absl::MutexLock lock(&mu_);
    snap = snapshot_;
  }
  if (!snap) return absl::UnavailableError("starting: the poll loop has not run yet");
  const int64_t age = clock_.NowMs() - snap->taken_ms;
  if (age > options_.stale_after_ms) {
    return absl::UnavailableError(
        absl::StrCat("the poll loop has not run for ", age, " ms (stuck or stopping)"));
  }
  if (!snap->store.ok()) {
    return absl::UnavailableError(absl::StrCat("job store unreachable: ", snap->store.message()));
  }
  return absl::OkStatus();
}

}  // namespace kiln::coordinator
