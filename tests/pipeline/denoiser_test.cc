// Tests of the denoise loop (pipeline/denoiser.h) on the CPU with a fake Denoiser: the Euler
// update against the formula recomputed here in double, the timestep each step sees, progress
// after every step, the cancel token checked between steps (CancelledError naming the step), and
// a failing step ending the loop with its own error.
#include "pipeline/denoiser.h"

#include <torch/torch.h>

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::pipeline {
namespace {

using ::testing::ElementsAreArray;

// v = rate * latents + timestep: depends on both inputs, so a wrong state or a wrong timestep
// shows in the result.
class FakeDenoiser : public Denoiser {
 public:
  explicit FakeDenoiser(double rate) : rate_(rate) {}
  absl::Status Prepare(const DenoiseConditioning& c) override {
    prepared_ = c.guidance.defined();
    return absl::OkStatus();
  }
  absl::StatusOr<at::Tensor> Velocity(const at::Tensor& latents,
                                      const at::Tensor& timestep) override {
    if (!prepared_) return absl::FailedPreconditionError("Velocity before Prepare");
    if (static_cast<int>(timesteps.size()) == fail_at) return absl::InternalError("step failed");
    timesteps.push_back(timestep.item<float>());
    return latents * rate_ + timestep;
  }
  bool cuda_graph() const override { return false; }

  std::vector<float> timesteps;  // what each call saw
  int fail_at = -1;              // the call (0-based) that fails; -1: none

 private:
  const double rate_;
  bool prepared_ = false;
};

struct Fixture {
  explicit Fixture(int steps) {
    for (int i = 0; i <= steps; ++i) schedule.sigmas.push_back(1.0 - 0.9 * i / steps);
    std::vector<float> rows(steps * 4, 0.0f);
    for (int i = 0; i < steps; ++i) rows[i * 4] = static_cast<float>(schedule.sigmas[i]);
    schedule.timesteps = torch::tensor(rows).view({steps, 4});
    at::manual_seed(7);
    latents = torch::randn({1, 8, 4});
    initial = latents.clone();
    conditioning.guidance = torch::full({1}, 3.5f);
  }
  // The formula, in double: `steps` Euler steps of v = rate * x + t from the initial latents.
  at::Tensor Expected(double rate, int steps) const {
    at::Tensor x = initial.to(at::kDouble);
    for (int i = 0; i < steps; ++i) {
      const double t = static_cast<float>(schedule.sigmas[i]);
      x = x + (schedule.sigmas[i + 1] - schedule.sigmas[i]) * (rate * x + t);
    }
    return x;
  }
  DenoiseSchedule schedule;
  DenoiseConditioning conditioning;
  at::Tensor latents, initial;
};

double MaxDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

TEST(DenoiseLoopTest, EulerStepsFollowTheScheduleAndReportEachStep) {
  Fixture f(6);
  FakeDenoiser fake(-0.5);
  ASSERT_TRUE(fake.Prepare(f.conditioning).ok());
  std::vector<int> reported;
  auto s = RunDenoiseLoop(fake, f.schedule, f.latents, nullptr,
                          [&](int step) { reported.push_back(step); }, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_THAT(reported, ElementsAreArray({1, 2, 3, 4, 5, 6}));
  std::vector<float> want_t;
  for (int i = 0; i < 6; ++i) want_t.push_back(static_cast<float>(f.schedule.sigmas[i]));
  EXPECT_THAT(fake.timesteps, ElementsAreArray(want_t));
  EXPECT_EQ(f.latents.scalar_type(), at::kFloat);  // the state stays float32, updated in place
  EXPECT_GT(MaxDiff(f.latents, f.initial), 0.1);
  EXPECT_LT(MaxDiff(f.latents, f.Expected(-0.5, 6)), 1e-5);
}

TEST(DenoiseLoopTest, CancelStopsBetweenStepsNamingTheStep) {
  Fixture f(10);
  FakeDenoiser fake(0.25);
  ASSERT_TRUE(fake.Prepare(f.conditioning).ok());
  CancelToken token;
  std::vector<int> reported;
  auto s = RunDenoiseLoop(fake, f.schedule, f.latents, &token,
                          [&](int step) {
                            reported.push_back(step);
                            if (step == 3) token.Cancel();
                          },
                          nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(s.message(), "cancelled after step 3 of 10");
  EXPECT_EQ(fake.timesteps.size(), 3u);  // the step in flight finished, no further one began
  EXPECT_THAT(reported, ElementsAreArray({1, 2, 3}));
  EXPECT_LT(MaxDiff(f.latents, f.Expected(0.25, 3)), 1e-5);
}

TEST(DenoiseLoopTest, ACancelledTokenRunsNoStep) {
  Fixture f(5);
  FakeDenoiser fake(0.25);
  ASSERT_TRUE(fake.Prepare(f.conditioning).ok());
  CancelToken token;
  token.Cancel();
  auto s = RunDenoiseLoop(fake, f.schedule, f.latents, &token, nullptr, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(s.message(), "cancelled after step 0 of 5");
  EXPECT_TRUE(fake.timesteps.empty());
  EXPECT_EQ(MaxDiff(f.latents, f.initial), 0.0);

  token.Reset();  // a token is reused for the next job
  EXPECT_TRUE(RunDenoiseLoop(fake, f.schedule, f.latents, &token, nullptr, nullptr).ok());
  EXPECT_EQ(fake.timesteps.size(), 5u);
}

TEST(DenoiseLoopTest, AFailingStepEndsTheLoopWithItsError) {
  Fixture f(4);
  FakeDenoiser fake(0.25);
  fake.fail_at = 2;
  ASSERT_TRUE(fake.Prepare(f.conditioning).ok());
  int reported = 0;
  auto s = RunDenoiseLoop(fake, f.schedule, f.latents, nullptr, [&](int) { ++reported; },
                          nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(s.message(), "step failed");
  EXPECT_EQ(reported, 2);
  EXPECT_LT(MaxDiff(f.latents, f.Expected(0.25, 2)), 1e-5);
}

}  // namespace
}  // namespace kiln::pipeline
