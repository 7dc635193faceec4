// Phase timings in seconds: a point on the monotonic clock and the seconds elapsed since it, for
// code that reports how long something took with sub-millisecond precision (the pipeline's phases,
// a package load, the node's job time, the cache's compile and fetch times, kiln-run, kiln-bench).
// Deadlines and heartbeats use common/clock.h instead (milliseconds, an injectable Clock).
// Thread-safe (no state).
#pragma once

#include <chrono>

namespace kiln {

using SteadyTime = std::chrono::steady_clock::time_point;

inline SteadyTime SteadyNow() { return std::chrono::steady_clock::now(); }

// Seconds from `start` to now on the monotonic clock.
inline double SecondsSince(SteadyTime start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace kiln
