// InMemoryJobStore: the JobStore contract (idempotent create, get, put, update, list by state)
// and its bound on finished jobs.
#include "coordinator/job_store.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::coordinator {
namespace {

using kiln::v1::JobInfo;

JobInfo Job(const std::string& id, kiln::v1::JobState state = kiln::v1::JOB_STATE_QUEUED) {
  JobInfo j;
  j.mutable_spec()->set_job_id(id);
  j.mutable_spec()->set_prompt("p-" + id);
  j.set_state(state);
  return j;
}

TEST(InMemoryJobStoreTest, CreateIsIdempotentAndKeepsTheFirstJob) {
  InMemoryJobStore store;
  auto first = store.Create(Job("a"));
  ASSERT_TRUE(first.ok());
  EXPECT_TRUE(first->created);
  JobInfo other = Job("a");
  other.mutable_spec()->set_prompt("different");
  auto again = store.Create(other);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->created);
  EXPECT_EQ(again->job.spec().prompt(), "p-a");
  EXPECT_EQ(store.Get("a")->spec().prompt(), "p-a");
  EXPECT_EQ(store.Create(Job("")).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(InMemoryJobStoreTest, GetPutUpdate) {
  InMemoryJobStore store;
  EXPECT_EQ(store.Get("x").status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(store.Put(Job("x")).ok());
  auto updated = store.Update("x", [](JobInfo& j) {
    j.set_step(3);
    return absl::OkStatus();
  });
  ASSERT_TRUE(updated.ok());
  EXPECT_EQ(updated->step(), 3u);
  EXPECT_EQ(store.Get("x")->step(), 3u);
  // An error from the mutation writes nothing.
  auto refused = store.Update("x", [](JobInfo& j) {
    j.set_step(9);
    return absl::AbortedError("no");
  });
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(store.Get("x")->step(), 3u);
  // The id is the key and may not change.
  auto renamed = store.Update("x", [](JobInfo& j) {
    j.mutable_spec()->set_job_id("y");
    return absl::OkStatus();
  });
  EXPECT_EQ(renamed.status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(store.Update("nope", [](JobInfo&) { return absl::OkStatus(); }).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(InMemoryJobStoreTest, ListByStateInCreationOrderWithoutPngs) {
  InMemoryJobStore store;
  for (const char* id : {"c", "a", "b"}) ASSERT_TRUE(store.Create(Job(id)).ok());
  JobInfo done = Job("d", kiln::v1::JOB_STATE_SUCCEEDED);
  done.set_png("png bytes");
  ASSERT_TRUE(store.Create(done).ok());
  ASSERT_TRUE(store.Update("a", [](JobInfo& j) {
                     j.set_state(kiln::v1::JOB_STATE_RUNNING);
                     return absl::OkStatus();
                   })
                  .ok());
  auto queued = store.List(kiln::v1::JOB_STATE_QUEUED);
  ASSERT_TRUE(queued.ok());
  ASSERT_EQ(queued->size(), 2u);
  EXPECT_EQ((*queued)[0].spec().job_id(), "c");
  EXPECT_EQ((*queued)[1].spec().job_id(), "b");
  auto succeeded = store.List(kiln::v1::JOB_STATE_SUCCEEDED);
  ASSERT_EQ(succeeded->size(), 1u);
  EXPECT_TRUE((*succeeded)[0].png().empty());
  EXPECT_EQ(store.Get("d")->png(), "png bytes");
}

TEST(InMemoryJobStoreTest, ForgetsTheOldestFinishedJobsBeyondItsBound) {
  InMemoryJobStore store(/*max_finished_jobs=*/2);
  for (const char* id : {"q1", "f1", "f2", "f3"}) ASSERT_TRUE(store.Create(Job(id)).ok());
  for (const char* id : {"f1", "f2", "f3"}) {
    ASSERT_TRUE(store.Update(id, [](JobInfo& j) {
                       j.set_state(kiln::v1::JOB_STATE_FAILED);
                       return absl::OkStatus();
                     })
                    .ok());
  }
  EXPECT_EQ(store.Get("f1").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store.Get("f2").ok());
  EXPECT_TRUE(store.Get("f3").ok());
  EXPECT_TRUE(store.Get("q1").ok());  // unfinished jobs are never forgotten
  EXPECT_EQ(store.size(), 3u);
}

}  // namespace
}  // namespace kiln::coordinator
