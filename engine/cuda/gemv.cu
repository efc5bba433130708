// Decode matrix-vector products; see gemv.h.
#include "engine/cuda/gemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "engine/base/error.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_util.cuh"
#include "engine/cuda/gemv_common.cuh"

namespace needle::cuda {
namespace {

using namespace gemv_detail;

// kRopeKV's pair P of rows (pairs laid end to end over q, k, v): its output o, the head h and
// the index j of the pair's first row within the head (the second is j + D/2).
// (32-bit division: a 64-bit one is a long subroutine that would delay the block's loads.)
struct RopePairOf {
  int o;
  uint32_t h, j;
};
__device__ __forceinline__ RopePairOf PairOf(const GemvParams& p, int64_t P) {
  const uint32_t half = static_cast<uint32_t>(p.rope.head_dim / 2);
  const int o = 2 * P < p.row_end[0] ? 0 : (2 * P < p.row_end[1] ? 1 : 2);
  const uint32_t lp = static_cast<uint32_t>(P - (o > 0 ? p.row_end[o - 1] / 2 : 0));
  return {o, lp / half, lp % half};
}

// Block (b, y) owns R weight rows and M input rows (tokens M y .. M y + M - 1): weight rows
// R b .. R b + R - 1 of the outputs laid end to end, or (kSiluMul) rows R/2 b .. of gate
// (r < R/2) and of up (r >= R/2), or (kRopeKV, M = 1 only) the R/2 pairs of rows
// (h D + j, h D + j + D/2) of pairs R/2 b ... Each thread streams chunks threadIdx.x,
// + kThreads, ... of every weight row, U chunks per row in flight, and multiplies each with the
// M input rows. Every (weight row, token) sum is added in the same order whatever M, R and U
// are: chunk by chunk in the thread's order, then the same shuffle and shared-memory tree. So a
// token's outputs do not depend on the other tokens of the call: a batch of decode rows gives
// each row the bits it gets alone (Engine's batch invariance on the GPU).
template <bool kBF16, GemvEpilogue kE, bool kNorm, int R, int U, int M>
__global__ void __launch_bounds__(kThreads) GemvKernel(GemvParams p) {
  constexpr bool kGate = kE == GemvEpilogue::kSiluMul, kRope = kE == GemvEpilogue::kRopeKV;
  static_assert(M == 1 || !kRope, "the rotary epilogue serves one token");
  // (The groups of M tokens of one weight block are neighbours in the grid: they run together and
  // read the block's weights through L2 once.)
  const int groups = (p.tokens + M - 1) / M;
  const int64_t b = blockIdx.x / groups;
  const int m0 = static_cast<int>(blockIdx.x % groups) * M;
  int xm[M];  // the input row of each of the block's tokens (past T: the last, not written)
#pragma unroll
  for (int m = 0; m < M; ++m) xm[m] = min(m0 + m, p.tokens - 1);
  const int64_t total = kGate ? p.row_end[0] : p.row_end[p.n - 1];
  const uint64_t pol = StreamPolicy(p.evict_first);
  const uint4* wp[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if constexpr (kRope) {
      if (r % 2 == 1) continue;  // set with its pair
      const RopePairOf q = PairOf(p, min(b * (R / 2) + r / 2, total / 2 - 1));
      wp[r] = p.w[q.o] + (static_cast<int64_t>(q.h) * p.rope.head_dim + q.j) * p.k8;
      wp[r + 1] = wp[r] + p.rope.head_dim / 2 * p.k8;
      continue;
    }
    int64_t g = kGate ? b * (R / 2) + r % (R / 2) : b * R + r;
    if (g >= total) g = total - 1;  // past the end: reread the last row, write nothing
    const int o = kGate ? r / (R / 2) : (g < p.row_end[0] ? 0 : (g < p.row_end[1] ? 1 : 2));
    const int64_t row = kGate ? g : g - (o > 0 ? p.row_end[o - 1] : 0);
    wp[r] = p.w[o] + row * p.k8;
  }

  float acc[R][M], ss[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    ss[m] = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r][m] = 0.f;
  }
  // kRope: thread t < R/2 computes the cos and sin of pair t once its first loads are out, so
  // that the double-precision trigonometry hides under their latency, not after the sums.
  RopeCs cs{1.f, 0.f};
  bool have_cs = false;
  auto angle = [&] {
    if (kRope && threadIdx.x < R / 2 && !have_cs) {
      const int64_t P = b * (R / 2) + threadIdx.x;
      if (2 * P < total) {
        const int64_t pos = p.rope.dpos != nullptr ? *p.rope.dpos : p.rope.pos0;
        cs = RopeAngle(pos, p.rope.inv_freq[PairOf(p, P).j], p.rope.scaling);
      }
      have_cs = true;
    }
  };
  for (int c0 = threadIdx.x; c0 < p.k8; c0 += kThreads * U) {
    uint4 wv[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + kThreads * u;
      if (c < p.k8) {
#pragma unroll
        for (int r = 0; r < R; ++r) wv[u][r] = LoadStream(wp[r] + c, pol);
      }
    }
    if constexpr (kRope) angle();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + kThreads * u;
      if (c < p.k8) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float x[8];
          LoadX<kNorm>(p, xm[m], c, x, ss[m]);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r][m] = Dot8<kBF16>(wv[u][r], x, acc[r][m]);
        }
      }
    }
  }
  // Block sums: warps by shuffles, then the kWarps partials through shared memory; thread r
  // finishes row r (kSiluMul: pair r of gate and up).
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], off);
      if constexpr (kNorm) ss[m] += __shfl_xor_sync(0xffffffffu, ss[m], off);
    }
  }
  if constexpr (kRope) angle();  // a thread with no chunk (K < 8 kThreads)
  __shared__ float part[kWarps][M][R + 1];
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int r = 0; r < R; ++r) part[warp][m][r] = acc[r][m];
      part[warp][m][R] = ss[m];
    }
  }
  __syncthreads();
  // Thread t finishes row t % kOwners (kSiluMul: pair of gate and up) of token t / kOwners.
  constexpr int kOwners = kGate || kRope ? R / 2 : R;
  static_assert(kOwners * M <= kThreads, "a thread per output");
  const int t = threadIdx.x % kOwners, mi = threadIdx.x / kOwners, tok = m0 + mi;
  if (mi >= M || tok >= p.tokens) return;
  float scale = 1.f;
  if constexpr (kNorm) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) s += part[i][mi][R];
    scale = rsqrtf(s / static_cast<float>(8 * p.k8) + p.norm.eps);
  }
  auto sum = [&](int r) {
    float v = 0.f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) v += part[i][mi][r];
    return __fmul_rn(v, scale);  // rounded here, not fused with the bias by one epilogue only
  };
  auto bias = [&](int o, int64_t row) {
    return p.bias[o] != nullptr ? LoadAs(p.bias[o], row, p.bias_type[o]) : 0.f;
  };
  if constexpr (kRope) {
    const int64_t P = b * (R / 2) + t;
    if (2 * P >= total) return;
    const RopePairOf q = PairOf(p, P);
    const GemvRope& rp = p.rope;
    const int64_t half = rp.head_dim / 2, row = static_cast<int64_t>(q.h) * rp.head_dim + q.j;
    float lo = sum(2 * t) + bias(q.o, row), hi = sum(2 * t + 1) + bias(q.o, row + half);
    const int64_t pos = rp.dpos != nullptr ? *rp.dpos : rp.pos0;
    if (q.o < 2) RopeApply(lo, hi, cs);
    p.y[q.o][row] = lo;
    p.y[q.o][row + half] = hi;
    if (q.o == 0) return;
    void* arena = q.o == 1 ? rp.k_arena : rp.v_arena;
    const int64_t c = PagedRow(rp.table, pos, rp.block_size, rp.kv_heads, q.h) * rp.head_dim;
    StoreAs(arena, c + q.j, rp.kv_dtype, lo);
    StoreAs(arena, c + q.j + half, rp.kv_dtype, hi);
  } else if constexpr (kGate) {
    const int64_t row = b * (R / 2) + t;
    if (row < total) StoreGate(p, row, tok, sum(t), sum(t + R / 2));
  } else {
    const int64_t g = b * R + t;
    if (g < total) StoreRow<kE>(p, g, tok, sum(t));
  }
}

template <bool kBF16, bool kNorm, int R, int U, int M = 1>
void LaunchTiled(const GemvParams& p, GemvEpilogue e, int64_t rows, cudaStream_t stream) {
  const int per = e == GemvEpilogue::kSiluMul || e == GemvEpilogue::kRopeKV ? R / 2 : R;
  const int64_t blocks = (rows + per - 1) / per * ((p.tokens + M - 1) / M);
  if (blocks >= (int64_t{1} << 31)) Fail("Gemv: ", blocks, " blocks");
  const unsigned grid = static_cast<unsigned>(blocks);
  switch (e) {
    case GemvEpilogue::kStore:
      GemvKernel<kBF16, GemvEpilogue::kStore, kNorm, R, U, M><<<grid, kThreads, 0, stream>>>(p);
      break;
    case GemvEpilogue::kAdd:
      GemvKernel<kBF16, GemvEpilogue::kAdd, kNorm, R, U, M><<<grid, kThreads, 0, stream>>>(p);
      break;
    case GemvEpilogue::kSiluMul:
      GemvKernel<kBF16, GemvEpilogue::kSiluMul, kNorm, R, U, M><<<grid, kThreads, 0, stream>>>(p);
      break;
    case GemvEpilogue::kRopeKV:
      if constexpr (M == 1) {
        GemvKernel<kBF16, GemvEpilogue::kRopeKV, kNorm, R, U, 1><<<grid, kThreads, 0, stream>>>(p);
        break;
      }
      Fail("Gemv: the rotary epilogue serves one token, not ", p.tokens);
  }
  NEEDLE_CUDA_CHECK_LAUNCH();
}

template <bool kBF16, bool kNorm>
void Launch(const GemvParams& p, GemvEpilogue e, int64_t rows, GemvTiling t, cudaStream_t stream) {
  // Several tokens: M of them per block (a tiling of their own; the sums' order is that of any
  // other, so the bits are those of one token alone).
  if (p.tokens >= 5) return LaunchTiled<kBF16, kNorm, 4, 1, 8>(p, e, rows, stream);
  if (p.tokens >= 3) return LaunchTiled<kBF16, kNorm, 4, 2, 4>(p, e, rows, stream);
  if (p.tokens == 2) return LaunchTiled<kBF16, kNorm, 8, 1, 2>(p, e, rows, stream);
  if (t.rows == 2 && t.unroll == 4) return LaunchTiled<kBF16, kNorm, 2, 4>(p, e, rows, stream);
  if (t.rows == 4 && t.unroll == 2) return LaunchTiled<kBF16, kNorm, 4, 2>(p, e, rows, stream);
  if (t.rows == 4 && t.unroll == 4) return LaunchTiled<kBF16, kNorm, 4, 4>(p, e, rows, stream);
  if (t.rows == 8 && t.unroll == 1) return LaunchTiled<kBF16, kNorm, 8, 1>(p, e, rows, stream);
  if (t.rows == 8 && t.unroll == 2) return LaunchTiled<kBF16, kNorm, 8, 2>(p, e, rows, stream);
  Fail("Gemv: no kernel for ", t.rows, " rows per block, ", t.unroll, " loads per row");
}

}  // namespace

bool GemvSupported(int64_t T, DType wtype, int64_t K, const void* w) {
  return T >= 1 && T <= kGemvMaxTokens && (wtype == DType::kBF16 || wtype == DType::kF16) &&
         K > 0 && K % 8 == 0 && K / 8 < (int64_t{1} << 30) &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

const GemvTiling kGemvTilings[] = {{2, 4}, {4, 2}, {4, 4}, {8, 1}, {8, 2}};

// H200, Qwen2.5-7B and Llama-3.1-8B projections (bench_gemv.cu, bench/RESULTS.md): 8 rows of
// one load each was the fastest or within 2.5% of it on every shape.
GemvTiling DefaultGemvTiling(int64_t rows, int64_t K) {
  (void)rows;
  (void)K;
  return {8, 1};
}

bool GemvRopeSupported(int64_t head_dim, int64_t q_rows, int64_t k_rows, int64_t v_rows) {
  return head_dim > 0 && head_dim % 2 == 0 && q_rows % head_dim == 0 && k_rows % head_dim == 0 &&
         v_rows % head_dim == 0 && k_rows == v_rows;
}

void Gemv(const float* x, int64_t T, int64_t K, const GemvNorm& norm, DType wtype,
          const GemvOut* outs, int n, GemvEpilogue e, cudaStream_t stream, const GemvTiling* tiling,
          const GemvRope* rope, bool tensor_cores) {
  if (T < 1 || T > kGemvMaxTokens) Fail("Gemv: ", T, " tokens (1 to ", kGemvMaxTokens, ")");
  const int want = e == GemvEpilogue::kSiluMul  ? 2
                   : e == GemvEpilogue::kAdd    ? 1
                   : e == GemvEpilogue::kRopeKV ? 3
                                                : 0;
  if (n < 1 || n > kMaxGemvOuts || (want != 0 && n != want))
    Fail("Gemv: ", n, " outputs for this epilogue");
  GemvParams p{};
  p.x = x;
  p.k8 = static_cast<int>(K / 8);
  p.n = n;
  p.tokens = static_cast<int>(T);
  p.norm = norm;
  p.evict_first = StreamEvictFirst();
  if (norm.g != nullptr && norm.g_type != DType::kF32 && norm.g_type != DType::kBF16 &&
      norm.g_type != DType::kF16)
    Fail("Gemv: norm weights of type ", DTypeName(norm.g_type));
  int64_t total = 0;
  for (int i = 0; i < n; ++i) {
    if (!GemvSupported(1, wtype, K, outs[i].w)) Fail("Gemv: unsupported weight (K = ", K, ")");
    total += outs[i].rows;
    p.out_rows[i] = outs[i].rows;
    p.row_end[i] = total;
    p.w[i] = static_cast<const uint4*>(outs[i].w);
    p.bias[i] = outs[i].bias;
    p.bias_type[i] = outs[i].bias_type;
    p.y[i] = outs[i].y;
  }
  if (e == GemvEpilogue::kSiluMul) {
    if (outs[0].rows != outs[1].rows) Fail("Gemv: gate and up rows differ");
    p.row_end[0] = outs[0].rows;
  }
  if (e == GemvEpilogue::kRopeKV) {
    if (rope == nullptr ||
        !GemvRopeSupported(rope->head_dim, outs[0].rows, outs[1].rows, outs[2].rows))
      Fail("Gemv: the rotary epilogue needs whole heads of an even head_dim");
    p.rope = *rope;
  }
  const int64_t rows = e == GemvEpilogue::kSiluMul ? outs[0].rows : total;
  if (rows == 0) return;
  const bool bf16 = wtype == DType::kBF16, normed = norm.g != nullptr;
  if (tensor_cores && bf16 && tiling == nullptr && e != GemvEpilogue::kRopeKV)
    return gemv_detail::LaunchTensorCore(p, e, rows, stream);
  const GemvTiling t = tiling != nullptr ? *tiling : DefaultGemvTiling(rows, K);
  if (bf16)
    normed ? Launch<true, true>(p, e, rows, t, stream) : Launch<true, false>(p, e, rows, t, stream);
  else
    normed ? Launch<false, true>(p, e, rows, t, stream)
           : Launch<false, false>(p, e, rows, t, stream);
}

}  // namespace needle::cuda
