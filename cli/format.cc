#include "cli/format.h"

#include <algorithm>
#include <map>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/job_state.h"

namespace kiln::cli {
namespace {

using nlohmann::json;

std::string Seconds(double s) { return absl::StrFormat("%.2fs", s); }

std::string Ago(int64_t then_ms, int64_t now_ms) {
  if (then_ms <= 0) return "never";
  const double s = std::max<int64_t>(0, now_ms - then_ms) / 1000.0;
  if (s < 60) return absl::StrFormat("%.1fs ago", s);
  if (s < 3600) return absl::StrFormat("%.0fm ago", s / 60);
  return absl::StrFormat("%.1fh ago", s / 3600);
}

std::string DeviceText(const kiln::v1::DeviceInfo& d) {
  std::string s = d.kind().empty() ? "?" : d.kind();
  if (!d.name().empty() && d.kind() != "cpu") s += " " + d.name();
  if (!d.mig_profile().empty()) s += " " + d.mig_profile();
  if (d.gpu_count() > 1) s += " x" + std::to_string(d.gpu_count());
  return s;
}

}  // namespace

json JobToJson(const kiln::v1::JobInfo& job) {
  const auto& spec = job.spec();
  const auto& cs = job.cold_start();
  json packages = json::object();
  for (const auto& [component, provenance] : job.packages()) packages[component] = provenance;
  return json{
      {"job_id", spec.job_id()},
      {"state", JobStateName(job.state())},
      {"node_id", job.node_id()},
      {"attempts", job.attempts()},
      {"step", job.step()},
      {"total_steps", job.total_steps()},
      {"phase", job.phase()},
      {"error", job.error()},
      {"queue_seconds", job.queue_seconds()},
      {"run_seconds", job.run_seconds()},
      {"cold_start",
       {{"weights", cs.weights_seconds()},
        {"package_load", cs.package_load_seconds()},
        {"compile", cs.compile_seconds()},
        {"fetch", cs.fetch_seconds()},
        {"total", cs.total_seconds()}}},
      {"packages", packages},
      {"submitted_unix_ms", job.submitted_unix_ms()},
      {"finished_unix_ms", job.finished_unix_ms()},
      {"png_bytes", job.png().size()},
      {"spec",
       {{"model", spec.model()},
        {"prompt", spec.prompt()},
        {"width", spec.width()},
        {"height", spec.height()},
        {"steps", spec.steps()},
        {"guidance", spec.guidance()},
        {"seed", spec.seed()},
        {"precision", spec.precision()},
        {"priority", spec.priority()},
        {"deadline_unix_ms", spec.deadline_unix_ms()}}},
  };
}

std::string FormatJob(const kiln::v1::JobInfo& job) {
  const auto& spec = job.spec();
  std::string s = absl::StrCat("job        ", spec.job_id(), "  ", JobStateName(job.state()));
  if (!job.node_id().empty()) absl::StrAppend(&s, " on ", job.node_id());
  if (job.attempts() > 1) absl::StrAppend(&s, " (attempt ", job.attempts(), ")");
  absl::StrAppend(&s, "\n");
  absl::StrAppendFormat(
      &s, "spec       %s %ux%u, %u steps, seed %u%s: \"%s\"\n", spec.model(), spec.width(),
      spec.height(), spec.steps(), spec.seed(),
      spec.precision().empty() ? "" : ", " + spec.precision(),
      spec.prompt().size() > 60 ? spec.prompt().substr(0, 57) + "..." : spec.prompt());
  if (!job.phase().empty() && !IsTerminal(job.state())) {
    absl::StrAppend(&s, "phase      ", PhaseText(job.phase()), "\n");
  }
  if (job.total_steps() > 0 && job.state() == kiln::v1::JOB_STATE_RUNNING) {
    absl::StrAppendFormat(&s, "progress   %u/%u steps\n", job.step(), job.total_steps());
  }
  if (job.state() == kiln::v1::JOB_STATE_SUCCEEDED || job.run_seconds() > 0) {
    absl::StrAppend(&s, "time       queue ", Seconds(job.queue_seconds()), ", run ",
                    Seconds(job.run_seconds()), "\n");
  }
  const auto& cs = job.cold_start();
  if (job.state() == kiln::v1::JOB_STATE_SUCCEEDED) {
    if (cs.total_seconds() > 0) {
      absl::StrAppend(&s, "cold start ", Seconds(cs.total_seconds()), " (compile ",
                      Seconds(cs.compile_seconds()), ", fetch ", Seconds(cs.fetch_seconds()),
                      ", package load ", Seconds(cs.package_load_seconds()), ", weights ",
                      Seconds(cs.weights_seconds()), ")\n");
    } else {
      absl::StrAppend(&s, "cold start none (the node was warm)\n");
    }
  }
  if (!job.packages().empty()) {
    std::vector<std::string> parts;
    std::map<std::string, std::string> sorted(job.packages().begin(), job.packages().end());
    for (const auto& [component, provenance] : sorted)
      parts.push_back(component + "=" + provenance);
    absl::StrAppend(&s, "packages   ", absl::StrJoin(parts, ", "), "\n");
  }
  if (!job.error().empty()) absl::StrAppend(&s, "error      ", job.error(), "\n");
  return s;
}

json NodeToJson(const kiln::v1::NodeStatus& n) {
  const auto& d = n.info().device();
  return json{
      {"node_id", n.info().node_id()},
      {"state", NodeStateName(n.state())},
      {"device",
       {{"kind", d.kind()},
        {"name", d.name()},
        {"sm_count", d.sm_count()},
        {"memory_bytes", d.memory_bytes()},
        {"mig_profile", d.mig_profile()},
        {"compute_capability", d.compute_capability()},
        {"gpu_count", std::max<uint32_t>(1, d.gpu_count())}}},
      {"running_jobs", std::vector<std::string>(n.running_jobs().begin(), n.running_jobs().end())},
      {"queued_jobs", n.queued_jobs()},
      {"jobs_done", n.jobs_done()},
      {"last_seen_unix_ms", n.last_seen_unix_ms()},
      {"models", std::vector<std::string>(n.info().models().begin(), n.info().models().end())},
      {"packages", n.info().packages_size()},
      {"loaded_packages", n.info().loaded_packages_size()},
      {"can_compile", n.info().can_compile()},
      {"can_fetch", n.info().can_fetch()},
      {"metrics_url", n.info().metrics_url()},
      {"pid", n.info().pid()},
      {"hostname", n.info().hostname()}};
}

std::string FormatNodesTable(const kiln::v1::ListNodesReply& nodes, int64_t now_unix_ms) {
  std::vector<std::vector<std::string>> rows = {
      {"NODE", "STATE", "DEVICE", "RUNNING", "QUEUED", "DONE", "LAST SEEN"}};
  for (const auto& n : nodes.nodes()) {
    rows.push_back({n.info().node_id(), NodeStateName(n.state()), DeviceText(n.info().device()),
                    n.running_jobs().empty() ? "-" : absl::StrJoin(n.running_jobs(), ","),
                    absl::StrCat(n.queued_jobs()), absl::StrCat(n.jobs_done()),
                    Ago(n.last_seen_unix_ms(), now_unix_ms)});
  }
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& r : rows) {
    for (size_t i = 0; i < r.size(); ++i) width[i] = std::max(width[i], r[i].size());
  }
  std::string s;
  for (const auto& r : rows) {
    std::string line;
    for (size_t i = 0; i < r.size(); ++i) {
      absl::StrAppend(&line, r[i]);
      if (i + 1 < r.size()) line += std::string(width[i] - r[i].size() + 2, ' ');
    }
    absl::StrAppend(&s, line, "\n");
  }
  if (nodes.nodes().empty()) s += "(no nodes registered)\n";
  return s;
}

std::string PhaseText(const std::string& phase) {
  if (phase == "preparing") return "preparing (packages, weights)";
  if (phase == "text_encoding") return "encoding text";
  if (phase == "assigned") return "assigned, starting";
  return phase;
}

ProgressBar::ProgressBar(std::ostream& out, bool is_terminal, std::string job_id)
    : out_(out), terminal_(is_terminal), job_id_(std::move(job_id)) {}

void ProgressBar::Update(const kiln::v1::JobInfo& job) {
  const uint32_t total = job.total_steps() > 0 ? job.total_steps() : job.spec().steps();
  const uint32_t step = std::min(job.step(), total);
  std::string where = job.node_id().empty() ? "" : " on " + job.node_id();
  // What a running job does now: "preparing" (packages, weights) can take a minute on a cold node.
  if (job.state() == kiln::v1::JOB_STATE_RUNNING && !job.phase().empty()) {
    where = absl::StrCat(", ", PhaseText(job.phase()), where);
  }
  if (job.attempts() > 1) where += absl::StrCat(" (attempt ", job.attempts(), ")");
  // Why a queued job is not running yet ("waiting: the nodes that can run it are busy").
  if (job.state() == kiln::v1::JOB_STATE_QUEUED && absl::StartsWith(job.error(), "waiting")) {
    where += absl::StrCat(", ", job.error());
  }
  if (terminal_) {
    constexpr int kWidth = 30;
    const int filled = total > 0 ? static_cast<int>(kWidth * step / total) : 0;
    std::string line = absl::StrFormat("%s %-9s [%s%s] %u/%u steps%s", job_id_,
                                       JobStateName(job.state()), std::string(filled, '#'),
                                       std::string(kWidth - filled, '-'), step, total, where);
    if (line == last_line_) return;
    // Pad to erase a longer previous line.
    std::string padded = line;
    if (last_line_.size() > line.size())
      padded += std::string(last_line_.size() - line.size(), ' ');
    out_ << "\r" << padded << std::flush;
    last_line_ = line;
    drawn_ = true;
    return;
  }
  const int quarter = total > 0 ? static_cast<int>(4 * step / total) : 0;
  if (job.state() == last_state_ && job.node_id() == last_node_ && quarter == last_quarter_ &&
      job.phase() == last_phase_ && where == last_where_) {
    return;
  }
  out_ << absl::StrFormat("%s: %s%s, %u/%u steps\n", job_id_, JobStateName(job.state()), where,
                          step, total)
       << std::flush;
  last_where_ = where;
  last_state_ = job.state();
  last_node_ = job.node_id();
  last_quarter_ = quarter;
  last_phase_ = job.phase();
}

void ProgressBar::Finish() {
  if (terminal_ && drawn_) out_ << "\n" << std::flush;
  drawn_ = false;
}

}  // namespace kiln::cli
