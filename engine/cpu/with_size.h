// Register tiles sized at compile time, their count (heads, keys, channels) at run time.
#pragma once

#include <cstdint>
#include <type_traits>

namespace needle {

// Calls f(std::integral_constant<int, k>()) for k = 1 .. Max (k < 1: 1; k > Max: Max).
template <int Max, class F>
inline __attribute__((always_inline)) void WithSize(int64_t k, const F& f) {
  if constexpr (Max > 1) {
    if (k < Max) return WithSize<Max - 1>(k, f);
  }
  f(std::integral_constant<int, Max>());
}

}  // namespace needle
