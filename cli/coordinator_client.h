// CoordinatorClient: the client side of kiln's wire protocol (common/proto/kiln.proto), one
// request at a time over a ZeroMQ DEALER socket. Every call is bounded in time: a coordinator that
// does not answer within the request timeout (plus the wait the request itself asks for) gives
// DeadlineExceeded ("coordinator at X did not answer within Ns"), never a hang. An ErrorReply
// becomes a Status with the reply's code; its field is kept as a payload (ErrorField()).
//
// Several coordinators (an active one and its standbys, or one that restarts): the endpoint may be
// a comma list. A try that gets no answer (nothing listening within connect_timeout_ms: a standby
// binds nothing until it leads; the connection closed mid-request: the coordinator died; no reply
// within the timeout) or an UNAVAILABLE reply is retried on the next endpoint with backoff
// (cli/failover.h) for up to FailoverOptions.retry_for_ms, then the last error is returned.
// Retrying is safe: a submit is idempotent by job id, the other requests only read or are
// idempotent (cancel, drain, uncordon); a remove-node retried after its reply was lost answers
// NOT_FOUND.
//
// Used by the `kiln` commands and by `kiln up` to poll ListNodes. Thread-compatible: one thread
// uses an instance (a ZeroMQ socket belongs to one thread).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cli/failover.h"
#include "common/clock.h"
#include "common/curve_keys.h"
#include "common/job_state.h"
#include "common/proto/kiln.pb.h"
#include "common/status.h"

namespace kiln::cli {

// Called before each retry: what failed, the endpoint tried next and the delay before it (ms).
using RetryFn =
    std::function<void(const absl::Status& error, const std::string& next, int64_t delay_ms)>;

struct ClientOptions {
  // The coordinators' client endpoints, one or a comma list: "tcp://A:5555,tcp://B:5555".
  std::string endpoint;
  int request_timeout_ms = 10000;  // a reply may take this long beyond the wait a request asks for
  int connect_timeout_ms = 2000;   // a try with no connection after this long moves on (ms)
  FailoverOptions failover;        // retries across the endpoints; retry_for_ms 0: one try only
  RetryFn on_retry = nullptr;      // told of each retry (the CLI prints a note); may be null
  CurveClient curve;               // CURVE keys (this client's pair, the coordinator's public
                                   // key); disabled: plaintext

  // InvalidArgument naming the field.
  absl::Status Validate() const;
};

// Receives each streamed progress reply of a Wait (not the final one).
using ProgressFn = std::function<void(const kiln::v1::JobInfo&)>;

class CoordinatorClient {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorClient>> Connect(const ClientOptions& options);
  ~CoordinatorClient();
  CoordinatorClient(const CoordinatorClient&) = delete;
  CoordinatorClient& operator=(const CoordinatorClient&) = delete;

  // Reply.created is false when spec.job_id already existed (idempotent resubmission).
  absl::StatusOr<kiln::v1::JobReply> Submit(const kiln::v1::JobSpec& spec);
  absl::StatusOr<kiln::v1::JobInfo> Status(const std::string& job_id, bool include_png);
  // One Wait request: the coordinator answers when the job is finished or after `timeout_ms`
  // with its current state. With `on_progress`, asks for streamed progress and calls it for each.
  absl::StatusOr<kiln::v1::JobInfo> Wait(const std::string& job_id, uint32_t timeout_ms,
                                         bool include_png, const ProgressFn& on_progress = nullptr);
  absl::StatusOr<kiln::v1::JobInfo> Cancel(const std::string& job_id);
  absl::StatusOr<kiln::v1::ListNodesReply> ListNodes();
  absl::StatusOr<kiln::v1::NodeStatus> Drain(const std::string& node_id);
  absl::StatusOr<kiln::v1::NodeStatus> Uncordon(const std::string& node_id);
  absl::StatusOr<kiln::v1::RemoveNodeReply> RemoveNode(const std::string& node_id, bool force);

  // The endpoint the next request goes to (the one that answered last).
  const std::string& endpoint() const { return failover_.endpoint(); }

 private:
  struct Socket;
  explicit CoordinatorClient(const ClientOptions& options);
  // Opens a fresh socket to failover_.endpoint().
  absl::Status Reconnect();
  // Call with retries across the endpoints (see the file comment).
  absl::StatusOr<kiln::v1::Envelope> Call(
      const kiln::v1::Envelope& request, int64_t extra_ms,
      const std::function<bool(const kiln::v1::Envelope&)>& is_final,
      const std::function<void(const kiln::v1::Envelope&)>& on_partial);
  // Sends `request` once, returns the first reply to it that `is_final` accepts; the others go to
  // `on_partial`. `extra_ms` is added to the request timeout (the wait the request asks for).
  absl::StatusOr<kiln::v1::Envelope> CallOnce(
      kiln::v1::Envelope request, int64_t extra_ms,
      const std::function<bool(const kiln::v1::Envelope&)>& is_final,
      const std::function<void(const kiln::v1::Envelope&)>& on_partial);

  ClientOptions options_;
  SystemClock clock_;
  Failover failover_;
  std::unique_ptr<Socket> socket_;
  uint64_t next_request_ = 1;
};

// Worth retrying on another endpoint: no answer (DeadlineExceeded or Unavailable from the client
// itself) or UNAVAILABLE from a coordinator.
bool Retryable(const absl::Status& status);

// True for SUCCEEDED, FAILED and CANCELLED (common/job_state.h).
using kiln::IsTerminal;

// The ErrorReply.field carried by a Status made from an ErrorReply ("" if none): the shared
// field payload of common/status.h.
using kiln::ErrorField;
// True if `status` was made from a coordinator's ErrorReply.
bool FromCoordinator(const absl::Status& status);
// The Status for an ErrorReply: code from its name, message as sent, field as a payload.
absl::Status StatusFromErrorReply(const kiln::v1::ErrorReply& error);

}  // namespace kiln::cli
