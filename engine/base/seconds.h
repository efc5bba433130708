// Host time in seconds on the steady clock, for the timings the engines report.
#pragma once

#include <chrono>

namespace needle {

using Clock = std::chrono::steady_clock;
// Seconds from t to now.
inline double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

}  // namespace needle
