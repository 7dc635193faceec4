// common/status.h: field errors and the exit-code policy.
#include "common/status.h"

#include "gtest/gtest.h"

namespace kiln {
namespace {

TEST(FieldErrorTest, NamesTheFieldInMessageAndPayload) {
  const absl::Status s = InvalidField("spec.width", "300 is not a multiple of 16");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "spec.width: 300 is not a multiple of 16");
  EXPECT_EQ(ErrorField(s), "spec.width");
  const absl::Status p = FieldError(absl::StatusCode::kFailedPrecondition, "spec.model", "no");
  EXPECT_EQ(p.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ErrorField(p), "spec.model");
}

TEST(FieldErrorTest, OnlyFieldErrorsHaveAField) {
  // A message that merely looks like one names no field: the payload is what counts.
  EXPECT_EQ(ErrorField(absl::InvalidArgumentError("spec.width: no")), "");
  EXPECT_EQ(ErrorField(absl::InvalidArgumentError("resolution 7x7: no")), "");
  EXPECT_EQ(ErrorField(absl::NotFoundError("spec.width: no")), "");
  EXPECT_EQ(ErrorField(absl::OkStatus()), "");
}

TEST(FieldErrorTest, WithFieldKeepsCodeAndMessage) {
  const absl::Status s = WithField(absl::OutOfRangeError("too big"), "limits.max_steps");
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(s.message(), "too big");
  EXPECT_EQ(ErrorField(s), "limits.max_steps");
  EXPECT_TRUE(WithField(absl::OkStatus(), "x").ok());
  EXPECT_EQ(ErrorField(WithField(absl::OkStatus(), "x")), "");
}

TEST(ExitCodeTest, OkBadInputAndOther) {
  EXPECT_EQ(ExitCodeFor(absl::OkStatus()), 0);
  for (const absl::Status& s :
       {absl::InvalidArgumentError("x"), absl::NotFoundError("x"), absl::AlreadyExistsError("x"),
        absl::OutOfRangeError("x")}) {
    EXPECT_EQ(ExitCodeFor(s), kExitBadInput) << s;
    EXPECT_EQ(ExitCodeFor(s, ExitContext::kCommand), kExitBadInput) << s;
  }
  for (const absl::Status& s : {absl::UnavailableError("x"), absl::InternalError("x"),
                                absl::DataLossError("x"), absl::DeadlineExceededError("x"),
                                absl::CancelledError("x"), absl::UnknownError("x")}) {
    EXPECT_EQ(ExitCodeFor(s), kExitFailure) << s;
    EXPECT_EQ(ExitCodeFor(s, ExitContext::kCommand), kExitFailure) << s;
  }
}

TEST(ExitCodeTest, FailedPreconditionDependsOnContext) {
  const absl::Status s = absl::FailedPreconditionError("the cluster is down");
  EXPECT_EQ(ExitCodeFor(s, ExitContext::kStartup), kExitBadInput);
  EXPECT_EQ(ExitCodeFor(s, ExitContext::kCommand), kExitFailure);
}

TEST(ExitCodeTest, AnErrorNamingAFieldIsBadInput) {
  const absl::Status s = FieldError(absl::StatusCode::kFailedPrecondition, "spec.model", "none");
  EXPECT_EQ(ExitCodeFor(s, ExitContext::kCommand), kExitBadInput);
  EXPECT_EQ(ExitCodeFor(WithField(absl::UnavailableError("x"), "endpoint")), kExitBadInput);
}

}  // namespace
}  // namespace kiln
