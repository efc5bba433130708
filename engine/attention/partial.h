// The online-softmax partial result of attention for one query head over some subset of keys:
//   m   = max_j s_j                      (running maximum of the scaled scores)
//   l   = sum_j exp(s_j - m)             (softmax denominator relative to m)
//   out = sum_j exp(s_j - m) * v_j       (unnormalised output, [dim] floats)
//   n   = number of keys folded in       (emptiness is this count, never a sentinel m or l)
// Any two partials over disjoint key sets merge exactly (up to rounding) into the partial over
// their union. Dense CPU attention, the block-sparse kernels and the GPU local window all combine
// their pieces through this type, in a fixed order so results are deterministic.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace needle {

struct PartialAttention {
  float* out = nullptr;  // [dim], owned by the caller
  int64_t dim = 0;
  float m = -std::numeric_limits<float>::infinity();
  float l = 0.0f;
  int64_t n = 0;

  PartialAttention() = default;
  PartialAttention(float* o, int64_t d) : out(o), dim(d) { Reset(); }

  void Reset() {
    m = -std::numeric_limits<float>::infinity();
    l = 0.0f;
    n = 0;
    for (int64_t i = 0; i < dim; ++i) out[i] = 0.0f;
  }

  bool empty() const { return n == 0; }

  // this := this (+) other. Both are rescaled to the larger maximum before adding.
  void Merge(const PartialAttention& other) {
    if (other.empty()) return;
    if (empty()) {
      m = other.m;
      l = other.l;
      n = other.n;
      for (int64_t i = 0; i < dim; ++i) out[i] = other.out[i];
      return;
    }
    const float new_m = m > other.m ? m : other.m;
    const float a = std::exp(m - new_m);
    const float b = std::exp(other.m - new_m);
    for (int64_t i = 0; i < dim; ++i) out[i] = out[i] * a + other.out[i] * b;
    l = l * a + other.l * b;
    m = new_m;
    n += other.n;
  }

  // dst[dim] = out / l; an empty partial (no visible key) writes zeros.
  void Finalize(float* dst) const {
    const float inv = empty() ? 0.0f : 1.0f / l;
    for (int64_t i = 0; i < dim; ++i) dst[i] = out[i] * inv;
  }
};

}  // namespace needle
