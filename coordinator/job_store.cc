#include "coordinator/job_store.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace kiln::coordinator {

std::vector<absl::StatusOr<JobStore::CreateResult>> JobStore::CreateMany(
    const std::vector<kiln::v1::JobInfo>& jobs) {
  std::vector<absl::StatusOr<CreateResult>> out;
  out.reserve(jobs.size());
  for (const auto& job : jobs) out.push_back(Create(job));
  return out;
}

std::vector<absl::StatusOr<kiln::v1::JobInfo>> JobStore::GetMany(
    const std::vector<std::string>& job_ids) const {
  std::vector<absl::StatusOr<kiln::v1::JobInfo>> out;
  out.reserve(job_ids.size());
  for (const auto& id : job_ids) out.push_back(Get(id));
  return out;
}

absl::StatusOr<JobStore::CreateResult> InMemoryJobStore::Create(const kiln::v1::JobInfo& job) {
  const std::string& id = job.spec().job_id();
  if (id.empty()) return absl::InvalidArgumentError("job store: empty job_id");
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = jobs_.try_emplace(id);
  if (!inserted) return CreateResult{it->second.job, false};
  it->second.job = job;
  it->second.seq = next_seq_++;
  if (IsTerminal(job.state())) NoteFinished(id, it->second);
  return CreateResult{job, true};
}

absl::StatusOr<kiln::v1::JobInfo> InMemoryJobStore::Get(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  return it->second.job;
}

absl::Status InMemoryJobStore::Put(const kiln::v1::JobInfo& job) {
  const std::string& id = job.spec().job_id();
  if (id.empty()) return absl::InvalidArgumentError("job store: empty job_id");
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = jobs_.try_emplace(id);
  if (inserted) it->second.seq = next_seq_++;
  it->second.job = job;
  if (IsTerminal(job.state())) NoteFinished(id, it->second);
  return absl::OkStatus();
}

absl::StatusOr<kiln::v1::JobInfo> InMemoryJobStore::Update(
    const std::string& job_id, const std::function<absl::Status(kiln::v1::JobInfo&)>& mutate) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  kiln::v1::JobInfo copy = it->second.job;
  if (auto s = mutate(copy); !s.ok()) return s;
  if (copy.spec().job_id() != job_id) {
    return absl::InternalError(absl::StrCat("job store: update changed job_id of ", job_id));
  }
  it->second.job = std::move(copy);
  if (IsTerminal(it->second.job.state())) NoteFinished(job_id, it->second);
  return it->second.job;  // NoteFinished evicts other jobs only; erasing keeps `it` valid
}

absl::StatusOr<std::vector<kiln::v1::JobInfo>> InMemoryJobStore::List(
    kiln::v1::JobState state) const {
  absl::MutexLock lock(&mu_);
  std::vector<std::pair<uint64_t, const kiln::v1::JobInfo*>> found;
  for (const auto& [id, entry] : jobs_) {
    if (entry.job.state() == state) found.emplace_back(entry.seq, &entry.job);
  }
  std::sort(found.begin(), found.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<kiln::v1::JobInfo> out;
  out.reserve(found.size());
  for (const auto& f : found) {
    out.push_back(*f.second);
    out.back().clear_png();
  }
  return out;
}

size_t InMemoryJobStore::size() const {
  absl::MutexLock lock(&mu_);
  return jobs_.size();
}

void InMemoryJobStore::NoteFinished(const std::string& id, Entry& entry) {
  if (entry.finished_noted) return;
  entry.finished_noted = true;
  finished_.push_back(id);
  while (finished_.size() > max_finished_jobs_) {
    const std::string oldest = finished_.front();
    finished_.pop_front();
    if (oldest == id) continue;  // never evict the job being written (cap 0)
    jobs_.erase(oldest);
  }
}

}  // namespace kiln::coordinator
