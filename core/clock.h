// The monotonic clock in seconds, for durations and deadlines (its zero is arbitrary).
#pragma once
#include <chrono>

namespace nha {

inline double monotonic_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

}  // namespace nha
