// y[T, N] = x[T, K] * W[N, K]^T (+ bias): the projections, the MLP and the LM head.
// Decode (T = 1) is a matrix-vector product bound by reading W once from DRAM; prefill reuses
// each W tile across a block of tokens held in cache. Register tile: 4 rows of W x up to
// 3 tokens = 12 f32 accumulators (fits the 16 vector registers of AVX2 with the 4 loads).
#include <algorithm>

#include "engine/base/error.h"
#include "engine/cpu/ops.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/cpu/matmul.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

// Per-target code shared between op families (after highway.h, as Highway requires).
#include "engine/cpu/load-inl.h"

HWY_BEFORE_NAMESPACE();
namespace needle {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

constexpr int64_t kRowTile = 4;
constexpr int64_t kRowChunk = 32;    // rows of W per task
constexpr int64_t kTokenBlock = 48;  // tokens per task (x block stays in L2)

// Rows [n0, n0 + 4) (all valid) times tokens [t0, t0 + TT).
template <int TT, typename WT>
HWY_INLINE void Tile(const float* HWY_RESTRICT x, int64_t t0, const WT* HWY_RESTRICT w, int64_t n0,
                     int64_t K, int64_t N, float* HWY_RESTRICT y) {
  const hn::ScalableTag<float> df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  hn::Vec<decltype(df)> acc[TT][kRowTile];
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < kRowTile; ++r) acc[t][r] = hn::Zero(df);
  const WT* wr[kRowTile];
  for (int r = 0; r < kRowTile; ++r) wr[r] = w + (n0 + r) * K;
  const float* xr[TT];
  for (int t = 0; t < TT; ++t) xr[t] = x + (t0 + t) * K;
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    hn::Vec<decltype(df)> xv[TT];
    for (int t = 0; t < TT; ++t) xv[t] = hn::LoadU(df, xr[t] + k);
    for (int r = 0; r < kRowTile; ++r) {
      const auto wv = LoadF32(df, wr[r] + k);
      for (int t = 0; t < TT; ++t) acc[t][r] = hn::MulAdd(wv, xv[t], acc[t][r]);
    }
  }
  for (int t = 0; t < TT; ++t) {
    for (int r = 0; r < kRowTile; ++r) {
      float s = ReduceF32(df, acc[t][r]);
      for (int64_t kk = k; kk < K; ++kk) s += xr[t][kk] * ScalarF32(wr[r][kk]);
      y[(t0 + t) * N + n0 + r] = s;
    }
  }
}

// One row of W against tokens [t0, t1): the tail when N is not a multiple of 4.
template <typename WT>
HWY_INLINE void Row(const float* HWY_RESTRICT x, int64_t t0, int64_t t1, const WT* HWY_RESTRICT w,
                    int64_t n, int64_t K, int64_t N, float* HWY_RESTRICT y) {
  const hn::ScalableTag<float> df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  const WT* wr = w + n * K;
  for (int64_t t = t0; t < t1; ++t) {
    auto acc = hn::Zero(df);
    int64_t k = 0;
    for (; k + L <= K; k += L)
      acc = hn::MulAdd(LoadF32(df, wr + k), hn::LoadU(df, x + t * K + k), acc);
    float s = ReduceF32(df, acc);
    for (; k < K; ++k) s += x[t * K + k] * ScalarF32(wr[k]);
    y[t * N + n] = s;
  }
}

template <typename WT>
void MatMulT(const float* x, int64_t T, const WT* w, int64_t N, int64_t K, float* y,
             ThreadingContext& tc) {
  const int64_t row_chunks = (N + kRowChunk - 1) / kRowChunk;
  const int64_t tok_blocks = (T + kTokenBlock - 1) / kTokenBlock;
  tc.ParallelFor(static_cast<size_t>(row_chunks * tok_blocks), 1, [&](size_t b, size_t e) HWY_ATTR {
    for (size_t task = b; task < e; ++task) {
      const int64_t rc = static_cast<int64_t>(task) % row_chunks;
      const int64_t tb = static_cast<int64_t>(task) / row_chunks;
      const int64_t n_begin = rc * kRowChunk, n_end = std::min(N, n_begin + kRowChunk);
      const int64_t t_begin = tb * kTokenBlock, t_end = std::min(T, t_begin + kTokenBlock);
      int64_t n = n_begin;
      for (; n + kRowTile <= n_end; n += kRowTile) {
        int64_t t = t_begin;
        for (; t + 3 <= t_end; t += 3) Tile<3>(x, t, w, n, K, N, y);
        if (t_end - t == 2) Tile<2>(x, t, w, n, K, N, y);
        if (t_end - t == 1) Tile<1>(x, t, w, n, K, N, y);
      }
      for (; n < n_end; ++n) Row(x, t_begin, t_end, w, n, K, N, y);
    }
  });
}

void MatMulImpl(const float* x, int64_t T, const Weight& w, const Weight* bias, float* y,
                ThreadingContext& tc) {
  const int64_t N = w.rows, K = w.cols;
  switch (w.dtype) {
    case DType::kF32:
      MatMulT(x, T, static_cast<const float*>(w.data), N, K, y, tc);
      break;
    case DType::kBF16:
      MatMulT(x, T, static_cast<const hwy::bfloat16_t*>(w.data), N, K, y, tc);
      break;
    case DType::kF16:
      MatMulT(x, T, static_cast<const hwy::float16_t*>(w.data), N, K, y, tc);
      break;
    default:
      Fail("matmul: weight '", w.name, "' has unsupported dtype ", DTypeName(w.dtype));
  }
  if (bias != nullptr && bias->present()) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) y[t * N + n] += LoadAsF32(bias->dtype, bias->data, n);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace needle
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace needle {
HWY_EXPORT(MatMulImpl);
namespace fast {
void MatMul(const float* x, int64_t T, const Weight& w, const Weight* bias, float* y,
            ThreadingContext& tc) {
  HWY_DYNAMIC_DISPATCH(MatMulImpl)(x, T, w, bias, y, tc);
}
}  // namespace fast
}  // namespace needle
#endif
