// The decode GEMV on the tensor cores (gemv.h; bf16 weights): y[T, rows] = W[rows, K] x[T, K]^T
// for T = 1 to kGemvMaxTokens tokens in one pass over the weights.
//
// A block of 8 warps owns a tile of 16 weight rows and a group of 8 NT tokens; the warps split
// K into spans of 32 (warp w: spans w, w + 8, ...). In a span, lane 4 g + c streams the 16 bytes
// of chunk 4 s + c (8 weights) of tile rows g and g + 8, and the 8 inputs of the same chunk for
// token g of each n-tile. These are the operands of two m16n8k16 products (mma.cuh's fragment
// layout), with the K order permuted alike in A and B: logical k {2c, 2c+1, 2c+8, 2c+9} of the
// first product are the chunk's elements 0-3, of the second its elements 4-7. So every weight
// byte is read by one 16-byte load, as in the CUDA-core kernel (gemv.cu). A warp issues the loads
// of a group of U spans, then multiplies them; for the products too narrow to fill the GPU from 9
// to 16 tokens, it keeps the next group's loads in flight meanwhile (the two-stage loop, kDbl).
//
// The input stays f32 in effect: each x is split into bf16 hi + lo (SplitHiLo: ~16 bits of
// mantissa, |x - hi - lo| <= 2^-17 |x|) and both halves are multiplied (two products a
// k-step), accumulated in f32.
//
// Batch invariance: a token's sums are added in an order that depends on nothing but K (the
// span order of its warp, the product order in a span, then the warps in order), never on T, on NT
// or on the token's column in the tile, so each token gets the bits it gets alone (a tensor-core
// product computes every output element from its own row and column only). The RMSNorm folds in
// as in gemv.cu: W (x g) scaled by rsqrt(mean(x^2) + eps) per token.
#include <cuda_bf16.h>

#include "engine/base/error.h"
#include "engine/base/switches.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_util.cuh"
#include "engine/cuda/gemv.h"
#include "engine/cuda/gemv_common.cuh"
#include "engine/cuda/mma.cuh"

namespace needle::cuda::gemv_detail {
namespace {

// Shared floats of one warp's part in TcEpilogue: [16 MT][8 NT + 1] sums, then [8 NT] sums of
// squares.
template <int MT, int NT>
constexpr int kTcPart = 16 * MT*(8 * NT + 1) + 8 * NT;

// The warps' partial sums added in warp order, scaled by the norm, stored by the epilogue. acc:
// [MT][NT][4] this lane's sums (rows g, g + 8 of m-tile mt, tokens 2c, 2c + 1 of n-tile t, as
// mma.cuh's accumulator fragment); ss [NT]: its sums of squares of token g's inputs. buf: shared
// memory, warp w's part (kTcPart floats) at buf + w stride, written by warp w alone before the
// block's barrier.
template <GemvEpilogue kE, bool kNorm, int MT, int NT, int W>
__device__ __forceinline__ void TcEpilogue(const GemvParams& p, const float (&acc)[MT][NT][4],
                                           const float (&ss)[NT], int64_t b, int m0, float* buf,
                                           int stride) {
  constexpr bool kGate = kE == GemvEpilogue::kSiluMul;
  constexpr int kTok = 8 * NT, kOut = (kGate ? 8 : 16) * MT;  // outputs per token (row pairs)
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, warp = threadIdx.x >> 5;
  const int64_t total = kGate ? p.row_end[0] : p.row_end[p.n - 1];
  // The warps' partial sums: lane (g, c) holds rows g, g + 8 of m-tile mt, tokens 2c, 2c + 1 of
  // each n-tile.
  auto part = [&](int w, int r) -> float* { return buf + w * stride + r * (kTok + 1); };
  auto ssp = [&](int w) -> float* { return buf + w * stride + 16 * MT * (kTok + 1); };
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      part(warp, 16 * mt + g)[8 * t + 2 * c] = acc[mt][t][0];
      part(warp, 16 * mt + g)[8 * t + 2 * c + 1] = acc[mt][t][1];
      part(warp, 16 * mt + g + 8)[8 * t + 2 * c] = acc[mt][t][2];
      part(warp, 16 * mt + g + 8)[8 * t + 2 * c + 1] = acc[mt][t][3];
    }
    if constexpr (kNorm) {
      float v = ss[t];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      if (c == 0) ssp(warp)[8 * t + g] = v;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kOut * kTok; idx += 32 * W) {
    const int i = idx % kOut, j = idx / kOut, tok = m0 + j;
    if (tok >= p.tokens) break;  // (idx grows with j)
    float scale = 1.f;
    if constexpr (kNorm) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) s += ssp(w)[j];
      scale = rsqrtf(s / static_cast<float>(8 * p.k8) + p.norm.eps);
    }
    auto sum = [&](int r) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) v += part(w, r)[j];
      return __fmul_rn(v, scale);
    };
    if constexpr (kGate) {  // pair i: gate row i % 8 and up row i % 8 + 8 of m-tile i / 8
      const int64_t row = b * 8 * MT + i;
      const int r = 16 * (i / 8) + i % 8;
      if (row < total) StoreGate(p, row, tok, sum(r), sum(r + 8));
    } else {
      const int64_t gr = b * 16 * MT + i;
      if (gr < total) StoreRow<kE>(p, gr, tok, sum(i));
    }
  }
}

// MT: m-tiles of 16 weight rows per block (kSiluMul: of 8 gate/up row pairs), each token's
// inputs loaded and split once per span for all of them; NT: n-tiles of 8 tokens per block; U:
// spans per warp with loads in flight; W: warps per block (they split K: the same W for every T,
// or a token's sums would depend on T). MT, NT and U may change with T: a token's sums are added
// in the same order whatever they are (each output element of a tensor-core product comes from
// its own row and column only).
// kPre: the inputs' loads issued with the weights' (below).
//
// A block's and a lane's place: b, the block's tile of MT m-tiles; m0, its first token; this
// lane's (g, c) and its warp; its weight rows wr: of m-tile mt, tile rows g and g + 8 (kSiluMul:
// gate row and up row 8 (MT b + mt) + g), past the end the last row again, its sums not written;
// xm: its token of each n-tile (past T: the last, not written).
template <bool kGate, int MT, int NT>
struct TcPlace {
  int64_t b;
  uint64_t pol;  // the weights' L2 policy
  int m0, lane, g, c, warp;
  const uint4* wr[MT][2];
  int xm[NT];
  __device__ __forceinline__ explicit TcPlace(const GemvParams& p) {
    const int groups = (p.tokens + 8 * NT - 1) / (8 * NT);
    b = blockIdx.x / groups;
    m0 = static_cast<int>(blockIdx.x % groups) * 8 * NT;
    lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, warp = threadIdx.x >> 5;
    pol = StreamPolicy(p.evict_first);
    const int64_t total = kGate ? p.row_end[0] : p.row_end[p.n - 1];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if constexpr (kGate) {
          wr[mt][h] = p.w[h] + min((b * MT + mt) * 8 + g, total - 1) * p.k8;
        } else {
          const int64_t gr = min((b * MT + mt) * 16 + g + 8 * h, total - 1);
          const int o = gr < p.row_end[0] ? 0 : (gr < p.row_end[1] ? 1 : 2);
          wr[mt][h] = p.w[o] + (gr - (o > 0 ? p.row_end[o - 1] : 0)) * p.k8;
        }
      }
#pragma unroll
    for (int t = 0; t < NT; ++t) xm[t] = min(m0 + 8 * t + g, p.tokens - 1);
  }
};

// One span's products for n-tile t: the lane's chunk of token xm[t]'s inputs (xa, xb: raw, zeros
// past K), normed, split into bf16 hi + lo, times the MT m-tiles' weights a [MT][2] (its 16
// bytes of tile rows g and g + 8), four products each, always in this order.
template <bool kNorm, int MT, int NT>
__device__ __forceinline__ void TcSpan(const GemvParams& p, int chunk, const uint4 (&a)[MT][2],
                                       float4 xa, float4 xb, float (&acc)[MT][NT][4], float& ss,
                                       int t) {
  float x[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
  if (chunk < p.k8) NormX<kNorm>(p, chunk, x, ss);
  uint32_t hi[4], lo[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) SplitHiLo<true>(x[2 * e], x[2 * e + 1], hi[e], lo[e]);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const uint32_t a1[4] = {a[mt][0].x, a[mt][1].x, a[mt][0].y, a[mt][1].y};
    const uint32_t a2[4] = {a[mt][0].z, a[mt][1].z, a[mt][0].w, a[mt][1].w};
    Mma<true>(acc[mt][t], a1, hi[0], hi[1]);
    Mma<true>(acc[mt][t], a1, lo[0], lo[1]);
    Mma<true>(acc[mt][t], a2, hi[2], hi[3]);
    Mma<true>(acc[mt][t], a2, lo[2], lo[3]);
  }
}

// One group of U spans' operands of a warp (the spans s0, s0 + W, ... s0 + W (U - 1)): this lane's
// 16 bytes of tile rows g and g + 8 of each m-tile, a [U][MT][2], and with kPre its token's raw
// inputs of each n-tile, x [U][NT][2] (without kPre x [1][NT][2], loaded when used).
template <int MT, int NT, int U, bool kPre>
struct TcStage {
  uint4 a[U][MT][2];
  float4 x[kPre ? U : 1][NT][2];
};

// Issues the loads of the group of spans from s0 (zeros past K): the weights, with kPre the
// inputs too.
template <bool kGate, int MT, int NT, int U, int W, bool kPre>
__device__ __forceinline__ void TcLoad(const GemvParams& p, const TcPlace<kGate, MT, NT>& at,
                                       int s0, TcStage<MT, NT, U, kPre>& st) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int chunk = 4 * (s0 + W * u) + at.c;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        st.a[u][mt][h] =
            chunk < p.k8 ? LoadStream(at.wr[mt][h] + chunk, at.pol) : make_uint4(0, 0, 0, 0);
    if constexpr (kPre)
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        st.x[u][t][0] = st.x[u][t][1] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (chunk < p.k8) LoadXRaw(p, at.xm[t], chunk, st.x[u][t][0], st.x[u][t][1]);
      }
  }
}

// The products of the group of spans from s0 (its spans below spans, in order; without kPre each
// input loaded here, when used: its latency stands between the products of every span).
template <bool kNorm, bool kGate, int MT, int NT, int U, int W, bool kPre>
__device__ __forceinline__ void TcCompute(const GemvParams& p, const TcPlace<kGate, MT, NT>& at,
                                          int s0, int spans, TcStage<MT, NT, U, kPre>& st,
                                          float (&acc)[MT][NT][4], float (&ss)[NT]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int s = s0 + W * u, chunk = 4 * s + at.c;
    if (s >= spans) break;  // (the same for the whole warp)
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int v = kPre ? u : 0;
      if (!kPre) {
        st.x[0][t][0] = st.x[0][t][1] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (chunk < p.k8) LoadXRaw(p, at.xm[t], chunk, st.x[0][t][0], st.x[0][t][1]);
      }
      TcSpan<kNorm, MT, NT>(p, chunk, st.a[u], st.x[v][t][0], st.x[v][t][1], acc, ss[t], t);
    }
  }
}

// kDbl: two stages in registers, the next group's loads issued before this group's products
// (with kPre; the same sums in the same order). kMinB: blocks a multiprocessor must hold (the
// registers a thread may take follow; 1: as many as it needs).
template <GemvEpilogue kE, bool kNorm, int MT, int NT, int U, int W, bool kPre, bool kDbl,
          int kMinB>
__global__ void __launch_bounds__(32 * W, kMinB) GemvTcKernel(GemvParams p) {
  constexpr bool kGate = kE == GemvEpilogue::kSiluMul;
  static_assert(!kDbl || kPre, "the stages hold the inputs");
  const TcPlace<kGate, MT, NT> at(p);
  float acc[MT][NT][4] = {}, ss[NT] = {};
  const int spans = (p.k8 + 3) / 4;
  constexpr int kStep = W * U;  // spans a warp moves on per group
  if constexpr (!kDbl) {
    // The group's loads all issued before any is used (the inputs come from L2: loaded only
    // when needed, their latency stands between the products of every span).
    for (int s0 = at.warp; s0 < spans; s0 += kStep) {
      TcStage<MT, NT, U, kPre> st;
      TcLoad<kGate, MT, NT, U, W, kPre>(p, at, s0, st);
      TcCompute<kNorm, kGate, MT, NT, U, W, kPre>(p, at, s0, spans, st, acc, ss);
    }
  } else {
    TcStage<MT, NT, U, kPre> st0, st1;
    int s0 = at.warp;
    if (s0 < spans) TcLoad<kGate, MT, NT, U, W, kPre>(p, at, s0, st0);
    while (s0 < spans) {
      if (s0 + kStep < spans) TcLoad<kGate, MT, NT, U, W, kPre>(p, at, s0 + kStep, st1);
      TcCompute<kNorm, kGate, MT, NT, U, W, kPre>(p, at, s0, spans, st0, acc, ss);
      s0 += kStep;
      if (s0 >= spans) break;
      if (s0 + kStep < spans) TcLoad<kGate, MT, NT, U, W, kPre>(p, at, s0 + kStep, st0);
      TcCompute<kNorm, kGate, MT, NT, U, W, kPre>(p, at, s0, spans, st1, acc, ss);
      s0 += kStep;
    }
  }
  __shared__ float buf[W * kTcPart<MT, NT>];
  TcEpilogue<kE, kNorm, MT, NT, W>(p, acc, ss, at.b, at.m0, buf, kTcPart<MT, NT>);
}

// Blocks of MT m-tiles (16 rows, or kSiluMul's 8 row pairs, each) by NT n-tiles of 8 tokens.
unsigned TcGrid(const GemvParams& p, GemvEpilogue e, int64_t rows, int MT, int NT) {
  const int per = (e == GemvEpilogue::kSiluMul ? 8 : 16) * MT;
  const int64_t blocks = (rows + per - 1) / per * ((p.tokens + 8 * NT - 1) / (8 * NT));
  if (blocks >= (int64_t{1} << 31)) Fail("Gemv: ", blocks, " blocks");
  return static_cast<unsigned>(blocks);
}

template <bool kNorm, int MT, int NT, int U, int W, bool kPre, bool kDbl, int kMinB>
void LaunchTilesAs(const GemvParams& p, GemvEpilogue e, int64_t rows, cudaStream_t stream) {
  const unsigned grid = TcGrid(p, e, rows, MT, NT);
  switch (e) {
    case GemvEpilogue::kStore:
      GemvTcKernel<GemvEpilogue::kStore, kNorm, MT, NT, U, W, kPre, kDbl, kMinB>
          <<<grid, 32 * W, 0, stream>>>(p);
      break;
    case GemvEpilogue::kAdd:
      GemvTcKernel<GemvEpilogue::kAdd, kNorm, MT, NT, U, W, kPre, kDbl, kMinB>
          <<<grid, 32 * W, 0, stream>>>(p);
      break;
    case GemvEpilogue::kSiluMul:
      GemvTcKernel<GemvEpilogue::kSiluMul, kNorm, MT, NT, U, W, kPre, kDbl, kMinB>
          <<<grid, 32 * W, 0, stream>>>(p);
      break;
    default:
      Fail("Gemv: the tensor-core kernel has no rotary epilogue");
  }
  NEEDLE_CUDA_CHECK_LAUNCH();
}

// NEEDLE_GEMV_TC_PREFETCH=0: the inputs loaded when used, for comparisons (read once).
bool PrefetchInputs() {
  static const bool on = EnvOnUnlessZero("NEEDLE_GEMV_TC_PREFETCH");
  return on;
}

// kDbl: the two-stage loop (GemvTcKernel), its inputs always prefetched.
template <bool kNorm, int MT, int NT, int U, int W, bool kDbl = false>
void LaunchTiles(const GemvParams& p, GemvEpilogue e, int64_t rows, cudaStream_t stream) {
  if constexpr (kDbl) {
    return LaunchTilesAs<kNorm, MT, NT, U, W, true, true, 1>(p, e, rows, stream);
  } else {
    // (Prefetched inputs take U x NT x 8 registers: only where that keeps two blocks a
    // multiprocessor. With 4 n-tiles it was slower on the H200: 2,156 against 2,290 tok/s at
    // batch 32, bench/RESULTS.md.)
    constexpr bool kFits = U * NT <= 4 && NT <= 2;
    if (kFits && PrefetchInputs())
      return LaunchTilesAs<kNorm, MT, NT, U, W, kFits, false, 1>(p, e, rows, stream);
    LaunchTilesAs<kNorm, MT, NT, U, W, false, false, 1>(p, e, rows, stream);
  }
}

// From 9 to 16 tokens, the two-stage loop (kDbl, twice the spans of a group: about 190
// registers, one block a multiprocessor) for the products whose blocks of 2 m-tiles take at most
// one wave of one block a multiprocessor (o and down of Qwen2.5-7B: 112 blocks on 132): each
// warp keeps two groups of spans in flight while it multiplies, where today's loop waits for
// its group's loads between its products. H100, batch 16 at 4K (ncu): down 61.7 -> 56.6 us, o
// 17.0 -> 16.3 (bench/RESULTS.md). Measured and left out: the same loop with the registers of
// today's (one span a group, two blocks a multiprocessor) for q/k/v, o and down (q/k/v 23.7 ->
// 26.1-27.1 us at batch 16; at batch 1-8 the whole step 3% slower), and for every product (the
// step 13% slower at batch 16). NEEDLE_GEMV_TC_DBL=0 turns it off (comparisons), read once.
bool DoubleStages() {
  static const bool on = EnvOnUnlessZero("NEEDLE_GEMV_TC_DBL");
  return on;
}

// NEEDLE_GEMV_TC_MT: m-tiles per block from 9 to 32 tokens for every product (1, 2, 3 or 4; 3
// and 4 only to 16 tokens), read once (comparisons); 0 when unset (the choice below).
int MTilesAsked() {
  static const int mt = [] {
    const int v = EnvSwitch("NEEDLE_GEMV_TC_MT", -1);
    return v == -1 ? 0 : v == 1 || v == 3 || v == 4 ? v : 2;
  }();
  return mt;
}

// From 9 to 16 tokens, 4 m-tiles a block for the products whose 4-m-tile blocks still fill two
// waves of two a multiprocessor (gate/up and the LM head of Qwen2.5-7B): each token's inputs,
// read from L2 once a block, then serve twice the weights. H100, batch 16 at 4K: gate/up 121.6
// -> 114.2 us (DRAM 67 -> 72% of peak under ncu), the step 8.32 -> 8.19 ms (bench/RESULTS.md).
// NEEDLE_GEMV_TC_MT4_WIDE=0 turns it off (comparisons), read once.
bool WideProductsMT4() {
  static const bool on = EnvOnUnlessZero("NEEDLE_GEMV_TC_MT4_WIDE");
  return on;
}

// Blocks of three a multiprocessor for the narrow products (LaunchNormed);
// NEEDLE_GEMV_TC_NARROW=0 turns it off (comparisons), read once.
bool NarrowInOneWave() {
  static const bool on = EnvOnUnlessZero("NEEDLE_GEMV_TC_NARROW");
  return on;
}

// Three m-tiles a block instead of four where that fills the waves better (LaunchNormed);
// NEEDLE_GEMV_TC_MT3=0 turns it off (comparisons), read once. H100, Qwen2.5-7B at 4K: gate/up
// at batch 16 112.3 -> 101.2 us (DRAM 73 -> 81% of peak, ncu); the step, three alternations in
// each of two sessions, batch 16 7.88-7.94 -> 7.64-7.71 ms, batch 12 7.49-7.60 -> 7.27-7.32,
// batch 1 unchanged (bench/RESULTS.md).
bool ThreeTilesWhereTheyFit() {
  static const bool on = EnvOnUnlessZero("NEEDLE_GEMV_TC_MT3");
  return on;
}

// Blocks of the tiles kernel <MT, NT, U, prefetched inputs> that one multiprocessor holds, for
// epilogue e (the occupancy calculator; once per kernel and process).
template <bool kNorm, int MT, int NT, int U, int W, bool kPre>
int Resident(GemvEpilogue e) {
  auto ask = [](auto kernel) {
    int n = 0;
    NEEDLE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, 32 * W, 0));
    return n;
  };
  static const int store =
      ask(GemvTcKernel<GemvEpilogue::kStore, kNorm, MT, NT, U, W, kPre, false, 1>);
  static const int add = ask(GemvTcKernel<GemvEpilogue::kAdd, kNorm, MT, NT, U, W, kPre, false, 1>);
  static const int gate =
      ask(GemvTcKernel<GemvEpilogue::kSiluMul, kNorm, MT, NT, U, W, kPre, false, 1>);
  return e == GemvEpilogue::kStore ? store : e == GemvEpilogue::kAdd ? add : gate;
}

// The share of the slots that `blocks` blocks use over their rounds of `slots` at a time.
double WaveUse(int64_t blocks, int64_t slots) {
  const int64_t rounds = (blocks + slots - 1) / slots;
  return static_cast<double>(blocks) / static_cast<double>(rounds * slots);
}

template <bool kNorm, int W>
void LaunchNormed(const GemvParams& p, GemvEpilogue e, int64_t rows, cudaStream_t stream) {
  // (One n-tile: 4 spans a warp in flight. 8 were slower on the H200: 156.5 against 169.5 tok/s
  // for one row of Qwen2.5-7B shapes, 739.9 against 781.9 for eight; bench/RESULTS.md.)
  const int per = e == GemvEpilogue::kSiluMul ? 8 : 16;
  // The blocks of m m-tiles a token group; whether they fill two waves of two a multiprocessor.
  auto blocks = [&](int m) { return (rows + m * per - 1) / (m * per); };
  auto fills = [&](int m) { return blocks(m) >= 4 * Multiprocessors(); };
  // To 16 tokens, a product whose one-m-tile blocks overflow one wave of two a multiprocessor
  // by less than a wave (q/k/v: 288 blocks of Qwen2.5-7B, 384 of Llama-3.1-8B, on 264 slots of
  // an H100) takes blocks of three a multiprocessor, in one wave: one m-tile, half the spans in
  // flight (1 or 2 a group), at most 80 registers a thread. Before, 24 of Qwen's blocks ran in a
  // second round. H100, ncu, Qwen2.5-7B at 4K: q/k/v 25.4 -> 17.7 us at batch 1 (DRAM 41 -> 58%
  // of peak), 23.4 -> 21.9 at batch 16; bench_batch, three alternations: batch 1 5.99 -> 5.80
  // ms, batch 8 6.78 -> 6.60, batch 16 unchanged (7.91); Llama-3.1-8B batch 1 6.32 -> 6.09.
  // Measured and left out: 4 spans a group forced into 80 registers (spills; batch 1 6.08 ms),
  // and inputs loaded when used (q/k/v 30.2 us at batch 16). (A token's sums do not depend on
  // MT, NT or U.)
  if (p.tokens <= 16 && NarrowInOneWave() && blocks(1) > 2 * Multiprocessors() &&
      blocks(1) <= 3 * Multiprocessors()) {
    if (p.tokens <= 8) return LaunchTilesAs<kNorm, 1, 1, 2, W, true, false, 3>(p, e, rows, stream);
    return LaunchTilesAs<kNorm, 1, 2, 1, W, true, false, 3>(p, e, rows, stream);
  }
  if (p.tokens <= 8) return LaunchTiles<kNorm, 1, 1, 4, W>(p, e, rows, stream);
  // Past 8 tokens, each token's inputs serve MT m-tiles per load (they were read once per 16
  // weight rows, more bytes than the weights' from 16 tokens on).
  // Two, except from 17 tokens for a product whose 2-m-tile blocks would not fill two waves of
  // two a multiprocessor (q/k/v, o and down of Qwen2.5-7B: 144 and 112 blocks on 132): one
  // m-tile a block, twice the blocks (H200, batch 32: 2,511 against 2,290 tok/s; at batch 16 it
  // was slower, 2,006 against 2,068). Four to 16 tokens for the wide products (WideProductsMT4).
  // (A token's sums do not depend on MT.)
  int mt = MTilesAsked();
  if (mt == 0) {
    if (p.tokens > 16)
      mt = fills(2) ? 2 : 1;
    else
      mt = WideProductsMT4() && fills(4) ? 4 : 2;
    // Three m-tiles where their rounds of blocks waste a tenth of the slots less than four's
    // (gate/up of Qwen2.5-7B: 790 blocks in 3 rounds of 264 on an H100, 99.7% of the slots,
    // against 592 in 3 rounds, 75%). Each token's inputs are read from L2 a third more often.
    if (mt == 4 && ThreeTilesWhereTheyFit() && PrefetchInputs()) {
      const int64_t sm = Multiprocessors();
      const double use3 = WaveUse(blocks(3), sm * Resident<kNorm, 3, 2, 1, W, true>(e));
      const double use4 = WaveUse(blocks(4), sm * Resident<kNorm, 4, 2, 1, W, true>(e));
      if (use3 > use4 + 0.1) mt = 3;
    }
  }
  if (p.tokens <= 16) {
    if (mt == 1) return LaunchTiles<kNorm, 1, 2, 2, W>(p, e, rows, stream);
    if (mt == 4) return LaunchTiles<kNorm, 4, 2, 1, W>(p, e, rows, stream);
    if (mt == 3) return LaunchTiles<kNorm, 3, 2, 1, W>(p, e, rows, stream);
    if (DoubleStages() && blocks(2) <= Multiprocessors())
      return LaunchTiles<kNorm, 2, 2, 2, W, true>(p, e, rows, stream);
    return LaunchTiles<kNorm, 2, 2, 2, W>(p, e, rows, stream);
  }
  if (p.tokens <= 32) {  // (MT 4 would take more than 48 KB of shared memory)
    if (mt == 1) return LaunchTiles<kNorm, 1, 4, 2, W>(p, e, rows, stream);
    return LaunchTiles<kNorm, 2, 4, 1, W>(p, e, rows, stream);
  }
  return LaunchTiles<kNorm, 1, 8, 2, W>(p, e, rows, stream);
}

// Warps per block: 8 (4 were slower on the H200 at every row count: 169.2 against 185.3 tok/s
// for one row of Qwen2.5-7B shapes, 781.0 against 844.9 for 8, 1,048.2 against 1,178.5 for 32;
// bench/RESULTS.md). The same for every T, so that a token's sums never depend on T.
constexpr int kTcWarps = 8;

}  // namespace

void LaunchTensorCore(const GemvParams& p, GemvEpilogue e, int64_t rows, cudaStream_t stream) {
  if (p.norm.g != nullptr)
    LaunchNormed<true, kTcWarps>(p, e, rows, stream);
  else
    LaunchNormed<false, kTcWarps>(p, e, rows, stream);
}

}  // namespace needle::cuda::gemv_detail
