#include "node/outbox.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kiln::node {

absl::StatusOr<std::unique_ptr<Outbox>> Outbox::Create() {
  const int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(errno)));
  return std::unique_ptr<Outbox>(new Outbox(fd));
}

Outbox::~Outbox() { close(fd_); }

void Outbox::Signal() {
  const uint64_t one = 1;
  // Cannot fail short of a counter overflow (2^64 - 1 signals without a Drain).
  [[maybe_unused]] ssize_t n = write(fd_, &one, sizeof(one));
}

void Outbox::Push(kiln::v1::Envelope env) {
  {
    absl::MutexLock lock(&mu_);
    queue_.push_back(std::move(env));
  }
  Signal();
}

void Outbox::Wake() { Signal(); }

std::vector<kiln::v1::Envelope> Outbox::Drain() {
  uint64_t count = 0;
  [[maybe_unused]] ssize_t n = read(fd_, &count, sizeof(count));  // EAGAIN when not signalled
  std::vector<kiln::v1::Envelope> out;
  absl::MutexLock lock(&mu_);
  out.reserve(queue_.size());
  for (auto& env : queue_) out.push_back(std::move(env));
  queue_.clear();
  return out;
}

size_t Outbox::size() const {
  absl::MutexLock lock(&mu_);
  return queue_.size();
}

}  // namespace kiln::node
