#include "parallel/sequence_parallel_threads.h"

#include <optional>
#include <thread>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/log.h"
#include "parallel/process_group.h"
#include "parallel/sequence_parallel_pipeline.h"

namespace kiln::parallel {

struct SequenceParallelThreads::State {
  // A job handed to rank 0's thread; lives on the caller's stack until `result` is set.
  struct Job {
    pipeline::EncodedPrompt* encoded;  // by EncodePrompt, on the caller's thread
    const pipeline::ProgressFn* progress;
    std::optional<absl::StatusOr<pipeline::GenerateResult>> result;
  };
  enum class Go { kWait, kRun, kQuit };

  ThreadsOptions options;
  pipeline::PipelineOptions pipeline;
  std::shared_ptr<cache::PackageProvider> provider;
  std::vector<std::thread> threads;  // started and joined by the owning object's thread

  absl::Mutex encode_mu;    // one EncodePrompt at a time
  absl::Mutex generate_mu;  // one DenoiseDecode at a time
  absl::Mutex mu;
  std::vector<std::optional<absl::Status>> started ABSL_GUARDED_BY(mu);  // per rank
  int port ABSL_GUARDED_BY(mu) = -1;  // rank 0's store, once it listens
  Go go ABSL_GUARDED_BY(mu) = Go::kWait;
  bool stopping ABSL_GUARDED_BY(mu) = false;
  // A collective failed: the group is not usable again (process_group.h); the first such error.
  absl::Status broken ABSL_GUARDED_BY(mu);
  std::string group_name ABSL_GUARDED_BY(mu);  // rank 0's group's registered name
  Job* job ABSL_GUARDED_BY(mu) = nullptr;
  // Set before Start returns; owned by rank 0's thread, which keeps it until `stopping`.
  pipeline::FluxPipeline* rank0 = nullptr;
};

namespace {

using State = SequenceParallelThreads::State;

// A collective's own failure (ProcessGroup::Wait's errors), after which the group is unusable;
// a job's other errors leave the ranks in step.
bool CollectiveFailed(const absl::Status& s) {
  return (absl::IsInternal(s) || absl::IsDeadlineExceeded(s)) &&
         (absl::StrContains(s.message(), ": collective failed (") ||
          absl::StrContains(s.message(), ": collective not done within "));
}

// Marks the group broken (once) and logs why; the rank's thread then ends.
void Break(State& st, const absl::Status& why) {
  LogError("parallel", absl::StrCat("sequence parallel: the rank group failed, no more jobs "
                                    "run here (restart the node): ", why.message()));
  absl::MutexLock lock(&st.mu);
  if (st.broken.ok()) st.broken = why;
}

void Lead(State& st, SequenceParallelPipeline& sp) {
  const absl::Duration idle = absl::Seconds(st.options.timeout_seconds / 4);
  for (;;) {
    State::Job* job = nullptr;
    {
      absl::MutexLock lock(&st.mu);
      st.mu.AwaitWithTimeout(
          absl::Condition(
              +[](State* s) ABSL_SHARED_LOCKS_REQUIRED(s->mu) {
                return s->job != nullptr || s->stopping;
              },
              &st),
          idle);
      job = st.job;
      if (job == nullptr && st.stopping) break;
    }
    if (job == nullptr) {
      if (auto s = sp.KeepAlive(); !s.ok()) {
        Break(st, s);
        // A job handed over meanwhile is answered: no thread would take it.
        absl::MutexLock lock(&st.mu);
        if (st.job != nullptr) {
          st.job->result = absl::UnavailableError(absl::StrCat(
              "sequence parallel: the rank group failed (restart the node): ", s.message()));
          st.job = nullptr;
        }
        return;
      }
      continue;
    }
    auto result = sp.DenoiseDecode(std::move(*job->encoded), *job->progress);
    const bool failed = !result.ok() && CollectiveFailed(result.status());
    if (failed) Break(st, result.status());
    absl::MutexLock lock(&st.mu);  // Break's lock is released: the job is answered once
    job->result = std::move(result);
    st.job = nullptr;
    if (failed) return;
  }
  if (auto s = sp.Stop(); !s.ok()) {
    LogWarning("parallel", absl::StrCat("sequence parallel stop: ", s.message()));
  }
}

void FollowLoop(State& st, SequenceParallelPipeline& sp) {
  for (;;) {
    const absl::Status s = sp.Follow();
    if (absl::IsOutOfRange(s)) return;
    if (s.ok()) continue;
    if (CollectiveFailed(s)) {
      Break(st, s);
      return;
    }
    // The job failed here (rank 0 names this rank); the ranks are still in step.
    LogWarning("parallel", absl::StrCat("sequence parallel rank ", sp.rank(), ": ", s.message()));
    absl::MutexLock lock(&st.mu);
    if (st.stopping) return;
  }
}

void RankMain(std::shared_ptr<State> st, int rank) {
  torch::NoGradGuard no_grad;
  GroupOptions o;
  o.world_size = static_cast<int>(st->options.devices.size());
  o.rank = rank;
  o.device = st->options.devices[rank];
  o.timeout_seconds = st->options.timeout_seconds;
  o.group_name = pipeline::ProcessGroupName(st->pipeline.compile_options);  // the set's
  absl::Status error;
  if (rank == 0) {
    o.on_listen = [&](int port) {
      absl::MutexLock lock(&st->mu);
      st->port = port;
    };
  } else {
    absl::MutexLock lock(&st->mu);
    auto ready = [](State* s) ABSL_SHARED_LOCKS_REQUIRED(s->mu) {
      return s->port >= 0 || s->started[0].has_value();
    };
    st->mu.AwaitWithTimeout(absl::Condition(+ready, st.get()),
                            absl::Seconds(st->options.timeout_seconds));
    if (st->port >= 0) {
      o.port = st->port;
    } else {
      error = absl::DeadlineExceededError("rank 0's store never listened");
    }
  }
  std::unique_ptr<ProcessGroup> group;
  std::unique_ptr<SequenceParallelPipeline> sp;
  if (error.ok()) {
    auto created = ProcessGroup::Create(o);
    if (created.ok()) {
      group = *std::move(created);
    } else {
      error = created.status();
    }
  }
  if (error.ok()) {
    pipeline::PipelineOptions po = st->pipeline;
    po.device = o.device;
    auto created = SequenceParallelPipeline::Create(*group, std::move(po), st->provider);
    if (created.ok()) {
      sp = *std::move(created);
    } else {
      error = created.status();
    }
  }
  State::Go go;
  {
    absl::MutexLock lock(&st->mu);
    if (rank == 0 && sp != nullptr) st->rank0 = &sp->pipeline();
    if (rank == 0 && group != nullptr) st->group_name = group->group_name();
    st->started[rank] = error;
    st->mu.Await(absl::Condition(
        +[](State* s) ABSL_SHARED_LOCKS_REQUIRED(s->mu) { return s->go != State::Go::kWait; },
        st.get()));
    go = st->go;
  }
  if (go == State::Go::kRun) {
    if (rank == 0) {
      Lead(*st, *sp);
      // Lead also ends when the group failed; rank 0's pipeline still answers DigestsFor and
      // LoadedDigests (State::rank0, from any thread) until the object is destroyed.
      absl::MutexLock lock(&st->mu);
      st->mu.Await(absl::Condition(
          +[](State* s) ABSL_SHARED_LOCKS_REQUIRED(s->mu) { return s->stopping; }, st.get()));
    } else {
      FollowLoop(*st, *sp);
    }
  }
  // sp, then group (it unregisters from this thread's registry), on this thread.
}

}  // namespace

absl::StatusOr<std::unique_ptr<SequenceParallelThreads>> SequenceParallelThreads::Start(
    const ThreadsOptions& options, const pipeline::PipelineOptions& pipeline,
    std::shared_ptr<cache::PackageProvider> provider) {
  if (options.devices.empty()) {
    return absl::InvalidArgumentError("sequence parallel: no devices");
  }
  if (!(options.timeout_seconds > 0)) {
    return absl::InvalidArgumentError("sequence parallel: timeout_seconds must be > 0");
  }
  c10d::set_thread_isolation_mode(true);
  auto st = std::make_shared<State>();
  st->options = options;
  st->pipeline = pipeline;
  st->provider = std::move(provider);
  const int world = static_cast<int>(options.devices.size());
  st->started.resize(world);
  for (int r = 0; r < world; ++r) st->threads.emplace_back(RankMain, st, r);

  absl::Status error;
  {
    absl::MutexLock lock(&st->mu);
    st->mu.Await(absl::Condition(
        +[](State* s) ABSL_SHARED_LOCKS_REQUIRED(s->mu) {
          for (const auto& started : s->started) {
            if (!started.has_value()) return false;
          }
          return true;
        },
        st.get()));
    for (int r = 0; r < world && error.ok(); ++r) {
      if (!st->started[r]->ok()) {
        error = absl::Status(st->started[r]->code(),
                             absl::StrCat("sequence parallel rank ", r, " (",
                                          options.devices[r], "): ", st->started[r]->message()));
      }
    }
    st->go = error.ok() ? State::Go::kRun : State::Go::kQuit;
  }
  if (!error.ok()) {
    for (auto& t : st->threads) t.join();
    return error;
  }
  return std::unique_ptr<SequenceParallelThreads>(new SequenceParallelThreads(std::move(st)));
}

SequenceParallelThreads::~SequenceParallelThreads() {
  {
    absl::MutexLock lock(&state_->mu);
    state_->stopping = true;
  }
  for (auto& t : state_->threads) t.join();
}

namespace {

// Why a job cannot start: the object is stopping, or the group failed; OK otherwise.
absl::Status Refusal(const State& st) ABSL_SHARED_LOCKS_REQUIRED(st.mu) {
  if (st.stopping) {
    return absl::FailedPreconditionError("sequence parallel: the ranks are stopping");
  }
  if (!st.broken.ok()) {
    return absl::UnavailableError(absl::StrCat(
        "sequence parallel: the rank group failed earlier (restart the node): ",
        st.broken.message()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<pipeline::EncodedPrompt> SequenceParallelThreads::EncodePrompt(
    const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) {
  {
    absl::MutexLock lock(&state_->mu);
    if (auto s = Refusal(*state_); !s.ok()) return s;
  }
  absl::MutexLock serial(&state_->encode_mu);
  torch::NoGradGuard no_grad;
  return state_->rank0->EncodePrompt(request, progress);
}

absl::StatusOr<pipeline::GenerateResult> SequenceParallelThreads::DenoiseDecode(
    pipeline::EncodedPrompt encoded, const pipeline::ProgressFn& progress) {
  absl::MutexLock serial(&state_->generate_mu);
  State::Job job{&encoded, &progress, std::nullopt};
  absl::MutexLock lock(&state_->mu);
  if (auto s = Refusal(*state_); !s.ok()) return s;
  state_->job = &job;
  // Rank 0's thread answers every job it takes; it ends only when broken or stopping.
  state_->mu.Await(absl::Condition(
      +[](State::Job* j) { return j->result.has_value(); }, &job));
  return *std::move(job.result);
}

absl::StatusOr<pipeline::GenerateResult> SequenceParallelThreads::Generate(
    const pipeline::GenerateRequest& request, const pipeline::ProgressFn& progress) {
  auto encoded = EncodePrompt(request, progress);
  if (!encoded.ok()) return encoded.status();
  return DenoiseDecode(*std::move(encoded), progress);
}

std::vector<std::string> SequenceParallelThreads::DigestsFor(int width, int height) const {
  return state_->rank0->DigestsFor(width, height);
}

std::vector<std::string> SequenceParallelThreads::LoadedDigests() const {
  return state_->rank0->LoadedDigests();
}

absl::Status SequenceParallelThreads::health() const {
  absl::MutexLock lock(&state_->mu);
  if (state_->broken.ok()) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "sequence parallel group '", state_->group_name, "' of ", state_->options.devices.size(),
      " ranks (", absl::StrJoin(state_->options.devices, ", "),
      ") failed: ", state_->broken.message()));
}

std::string SequenceParallelThreads::AppliedLoras() const {
  return state_->rank0->applied_loras();
}

std::vector<std::string> SequenceParallelThreads::AvailableLoras() const {
  return state_->rank0->AvailableLoras();
}

int SequenceParallelThreads::world_size() const {
  return static_cast<int>(state_->options.devices.size());
}

}  // namespace kiln::parallel
