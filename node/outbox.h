// Messages from the node's worker thread to its I/O thread (the only thread that touches the
// coordinator socket): progress and results, in order, plus a wake-up for Stop().
//
// A mutex-guarded queue with a Linux eventfd beside it: Push() and Wake() make the fd readable,
// and the I/O thread polls that fd together with its ZeroMQ socket (zmq::poll takes plain file
// descriptors), so a message leaves as soon as it is queued without the I/O thread spinning.
//
// Threads: Push() and Wake() from any thread; Drain() and fd() from the one consumer.
#pragma once

#include <deque>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/proto/kiln.pb.h"

namespace kiln::node {

class Outbox {
 public:
  // Internal when no eventfd can be made (out of file descriptors).
  static absl::StatusOr<std::unique_ptr<Outbox>> Create();
  ~Outbox();
  Outbox(const Outbox&) = delete;
  Outbox& operator=(const Outbox&) = delete;

  void Push(kiln::v1::Envelope env);
  // Makes fd() readable without a message (e.g. Stop() was called).
  void Wake();
  // Everything queued so far, oldest first; resets fd() to not readable.
  std::vector<kiln::v1::Envelope> Drain();
  // Readable (POLLIN) while something was pushed or woken since the last Drain().
  int fd() const { return fd_; }
  size_t size() const;

 private:
  explicit Outbox(int fd) : fd_(fd) {}
  void Signal();

  const int fd_;
  mutable absl::Mutex mu_;
  std::deque<kiln::v1::Envelope> queue_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln::node
