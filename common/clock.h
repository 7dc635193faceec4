// Time as a dependency: logic classes take a Clock& so tests drive time by hand.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace kiln {

// Milliseconds on the monotonic clock: for deadlines and durations in code that has no Clock
// injected (process mains, the CLI, socket loops).
inline int64_t SteadyMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
// Milliseconds since the Unix epoch (timestamps shown to people or stored).
inline int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

class Clock {
 public:
  virtual ~Clock() = default;
  // Milliseconds on a monotonic clock (for timeouts and heartbeats).
  virtual int64_t NowMs() const = 0;
  // Milliseconds since the Unix epoch (for timestamps shown to people).
  virtual int64_t UnixMs() const = 0;
};

class SystemClock : public Clock {
 public:
  int64_t NowMs() const override { return SteadyMs(); }
  int64_t UnixMs() const override { return kiln::UnixMs(); }
};

// A clock that moves only when told to. Thread-safe.
class FakeClock : public Clock {
 public:
  explicit FakeClock(int64_t start_ms = 1'000'000) : now_(start_ms) {}
  int64_t NowMs() const override { return now_.load(); }
  int64_t UnixMs() const override { return 1'700'000'000'000 + now_.load(); }
  void AdvanceMs(int64_t ms) { now_ += ms; }

 private:
  std::atomic<int64_t> now_;
};

}  // namespace kiln
