#include "coordinator/scaling_signal.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "coordinator/coordinator_metrics.h"

namespace kiln::coordinator {
namespace {

using Key = std::pair<std::string, std::string>;  // (model, precision label)

bool Serves(const kiln::v1::NodeInfo& info, const std::string& model,
            const std::string& precision) {
  bool lists_model = false;
  for (const auto& m : info.models()) lists_model = lists_model || m == model;
  if (!lists_model) return false;
  if (precision == "default") return true;
  bool any_set = false;
  for (const auto& [key, set] : info.package_sets()) {
    if (!absl::StartsWith(key, model + "/")) continue;
    any_set = true;
    if (absl::StartsWith(key, absl::StrCat(model, "/", precision, "/"))) return true;
  }
  return !any_set;
}

}  // namespace

void ScalingSignal::ObserveFinished(const kiln::v1::JobInfo& job) {
  if (job.state() != kiln::v1::JOB_STATE_SUCCEEDED) return;
  const Key key{job.spec().model(), CoordinatorMetrics::PrecisionLabel(job.spec().precision())};
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = run_seconds_.emplace(key, job.run_seconds());
  if (!inserted) it->second += kRunWeight * (job.run_seconds() - it->second);
}

std::vector<ScalingRow> ScalingSignal::Compute(const kiln::v1::ListNodesReply& nodes,
                                               const std::vector<kiln::v1::JobSpec>& queued) const {
  std::map<Key, ScalingRow> rows;
  auto row = [&](const Key& key) -> ScalingRow& {
    ScalingRow& r = rows[key];
    r.model = key.first;
    r.precision = key.second;
    return r;
  };
  for (const kiln::v1::JobSpec& spec : queued) {
    ++row({spec.model(), CoordinatorMetrics::PrecisionLabel(spec.precision())}).queued;
  }
  // Every (model, precision) a ready node offers gets a row, so that an idle fleet shows.
  for (const kiln::v1::NodeStatus& n : nodes.nodes()) {
    if (n.state() != kiln::v1::NODE_STATE_READY) continue;
    for (const auto& [key, set] : n.info().package_sets()) {
      const size_t model_end = key.find('/');
      if (model_end == std::string::npos) continue;
      const size_t precision_end = key.find('/', model_end + 1);
      const std::string precision =
          key.substr(model_end + 1, precision_end == std::string::npos
                                        ? std::string::npos
                                        : precision_end - model_end - 1);
      row({key.substr(0, model_end), CoordinatorMetrics::PrecisionLabel(precision)});
    }
    for (const auto& model : n.info().models()) row({model, "default"});
  }
  std::vector<ScalingRow> out;
  absl::MutexLock lock(&mu_);
  for (auto& [key, r] : rows) {
    int idle = 0;
    for (const kiln::v1::NodeStatus& n : nodes.nodes()) {
      if (n.state() != kiln::v1::NODE_STATE_READY || !Serves(n.info(), r.model, r.precision)) {
        continue;
      }
      ++r.nodes_ready;
      if (n.running_jobs_size() > 0) {
        ++r.nodes_busy;
      } else {
        ++idle;
      }
    }
    auto run = run_seconds_.find(key);
    if (r.queued < idle || run == run_seconds_.end()) {
      r.wait_seconds = 0;
    } else {
      const int rounds = 1 + (r.queued - idle) / std::max(r.nodes_ready, 1);
      r.wait_seconds = rounds * run->second;
    }
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace kiln::coordinator
