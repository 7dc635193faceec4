// libFuzzer target: kiln::Decode (common/wire.h), the first thing the coordinator's, the node's
// and the CLI's sockets do with every frame. Any bytes must give a Status, never a crash; a
// frame that decodes must encode and decode again to the same message, and an ErrorReply's code
// name must map to a code and back.
#include <cstdint>
#include <cstdio>
#include <string_view>

#include "common/wire.h"
#include "google/protobuf/util/field_comparator.h"
#include "google/protobuf/util/message_differencer.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view frame(reinterpret_cast<const char*>(data), size);
  auto env = kiln::Decode(frame);
  if (!env.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(env.status()) || absl::IsFailedPrecondition(env.status()));
    return 0;
  }
  FUZZ_CHECK(env->body_case() != kiln::v1::Envelope::BODY_NOT_SET);
  FUZZ_CHECK(env->protocol_version() == kiln::kProtocolVersion);
  // The message a peer passes on (the coordinator's copy of a JobResult, ...) decodes to what it
  // decoded, unknown fields included. NaN doubles compare equal (a frame may carry them: found by
  // this target, tests/fuzz/corpus/wire_decode_fuzz/nan_run_seconds).
  const std::string again = kiln::Encode(*env);
  auto env2 = kiln::Decode(again);
  FUZZ_CHECK(env2.ok());
  google::protobuf::util::DefaultFieldComparator comparator;
  comparator.set_treat_nan_as_equal(true);
  google::protobuf::util::MessageDifferencer differencer;
  differencer.set_field_comparator(&comparator);
  if (!differencer.Compare(*env, *env2)) {
    std::fprintf(stderr, "first:\n%s\nsecond:\n%s\n", env->DebugString().c_str(),
                 env2->DebugString().c_str());
    FUZZ_CHECK(false);
  }
  if (env->has_error()) {
    const absl::StatusCode code = kiln::StatusCodeFromName(env->error().code());
    if (code != absl::StatusCode::kUnknown) {
      FUZZ_CHECK(kiln::StatusCodeFromName(kiln::StatusCodeName(code)) == code);
    }
    // Answering with it must work too (the reply path of every socket).
    const auto reply = kiln::ErrorEnvelope(absl::Status(code, env->error().message()),
                                           env->request_id(), env->error().field());
    FUZZ_CHECK(kiln::Decode(kiln::Encode(reply)).ok());
  }
  return 0;
}
