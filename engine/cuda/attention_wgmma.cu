// Hopper (sm_90a) causal prefill attention with warpgroup matrix products (wgmma); see
// attention_tc.h, whose entry point picks it on compute capability 9.0.
//
// Block = 128 query rows: `pack` query heads of one KV head (4, 2 or 1, dividing G) x 128 / pack
// positions, so that each K/V tile copied serves every head of the group. 3 warpgroups:
//   warpgroup 0, the producer: copies 128-key K/V tiles with cp.async into a 3-stage ring, in
//     the 128-byte-swizzled layout wgmma reads (a [rows x D] tile is stored as D/64 column atoms
//     [rows][64 elements], 16-byte chunk c of row r at chunk c ^ (r % 8)); mbarriers say when a
//     stage is full and when the consumers have released it;
//   warpgroups 1 and 2, the consumers, 64 rows each. Per tile j:
//     S[64 x 128] = Q K_j^T   wgmma m64n128k16, Q and K both from shared memory (K-major);
//     O[64 x D] += P_{j-1} V_{j-1}   wgmma m64nDk16, P re-packed to 16 bits as the register A
//       operand, V read transposed (N-major);
//     the online softmax of S (the mma.sync fragment layout: a thread holds 2 rows x 32 keys; row
//     max and sum over the 4 threads of a quad) overlaps that P V product, and the consumers take
//     turns issuing their products (ping-pong), so one's products run during the other's softmax.
// Registers: setmaxnreg gives the producer 40 and the consumers 232 per thread.
// Blocks run heaviest first (last query tile first) so that the causal tail is short.
// H100 (bench/RESULTS.md): 374/479/464 TFLOP/s at 4K/32K/128K, 32 heads, 8 KV heads, D 128.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "engine/cuda/attention_params.h"
#include "engine/cuda/attention_wgmma.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_util.cuh"
#include "engine/cuda/smem_async.cuh"
#include "engine/cuda/wgmma.cuh"

namespace needle::cuda {
namespace {

constexpr int kRows = 128;     // query positions per block (64 per consumer warpgroup)
constexpr int kKeys = 128;     // keys per tile
constexpr int kLoaders = 128;  // warpgroup 0: the producer, which copies the K/V tiles
constexpr int kThreads = 384;  // + warpgroups 1, 2: the consumers
constexpr int kStages = 3;     // K/V tiles in shared memory
// Registers per thread after setmaxnreg: 128 x 40 + 256 x 232 <= 65536.
constexpr int kProducerRegs = 40, kConsumerRegs = 232;

// GQA packing: log2 of the query heads of one KV head that share a block (4, 2 or 1, dividing G).
__host__ __device__ constexpr int PackLog2(int64_t G) {
  return G % 4 == 0 ? 2 : G % 2 == 0 ? 1 : 0;
}

// First arena row of each 64-key half of the tile at key kb of KV head h ([slot][kv_head][B][D]
// rows, through the block table); 0 for halves past the cache end.
struct TileRows {
  int64_t r[2];
};
__device__ __forceinline__ TileRows RowsOf(const AttnParams& p, int64_t h, int64_t kb) {
  TileRows t;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t pos = kb + half * 64;
    t.r[half] =
        pos < p.n_keys ? PagedRow(p.table + h * p.table_head_stride, pos, p.B, p.kv_heads, h) : 0;
  }
  return t;
}

// Issues the copies of one 128-key tile (rows `rows` of `arena`, K or V) into the swizzled tile
// at shared address dst. Each 64-key half is a run of consecutive rows of one cache block
// (B % 64 == 0). kCheck: only the first n_valid keys exist (the last tile of the cache); the
// others are zero-filled.
template <int D, bool kCheck>
__device__ __forceinline__ void LoadTile(const void* arena, const TileRows& rows, uint32_t dst,
                                         int n_valid) {
  constexpr int kChunks = D / 8;                    // 16-byte chunks per row
  constexpr int kRowsPerPass = kLoaders / kChunks;  // 8 or 16: row % 8 is the same every pass
  const uint16_t* src = static_cast<const uint16_t*>(arena);
  const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;  // producer threads 0..127
  const uint32_t dst0 = dst + SwizzledChunk(kKeys, r0, c);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint16_t* row = src + (rows.r[half] + r0) * D + c * 8;
#pragma unroll
    for (int pass = 0; pass < 64 / kRowsPerPass; ++pass) {
      const int r = half * 64 + pass * kRowsPerPass;  // + r0
      const bool valid = !kCheck || r + r0 < n_valid;
      CpAsync16(dst0 + r * 128, valid ? row + pass * kRowsPerPass * D : src, valid);
    }
  }
}

// Online-softmax state of the thread's two rows (a: accumulators 0, 1 of each group of 4; b: 2,
// 3), in the log2 domain: m = running max of the scaled scores, l = per-thread partial sum.
struct RowState {
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
};

// Key limits of one row within a tile (key index k in 0..127 is visible when wl < k <= lim and
// k < nk), clamped to -1..128 so that they fit 32 bits.
struct RowMask {
  int lim, wl;
};
__device__ __forceinline__ RowMask MaskOf(const AttnParams& p, int64_t qpos, int64_t kb) {
  auto clamp = [](int64_t x) {
    return static_cast<int>(max(static_cast<int64_t>(-1), min(static_cast<int64_t>(128), x)));
  };
  return {clamp(qpos - kb), p.window > 0 ? clamp(qpos - p.window - kb) : -1};
}

// Turns the raw scores s[64] of one tile (keys kb..kb+127) into exp2(scale s - m) in place,
// updating the row state; returns the factors (al_a, al_b) that rescale the output accumulated
// so far. kMask: some key may be masked for some row (past the query, outside the window, past
// the cache end); the other tiles skip the comparisons.
template <bool kMask>
__device__ __forceinline__ float2 Softmax(const AttnParams& p, float (&s)[64], RowState& st,
                                          int64_t kb, int64_t qpos_a, int64_t qpos_b, int tig,
                                          float scale_log2) {
  if constexpr (kMask) {
    const RowMask ma = MaskOf(p, qpos_a, kb), mb = MaskOf(p, qpos_b, kb);
    const int nk = static_cast<int>(min(static_cast<int64_t>(kKeys), p.n_keys - kb));
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int k = n * 8 + tig * 2 + (e & 1);
        const RowMask& m = e < 2 ? ma : mb;
        if (k > m.lim || k <= m.wl || k >= nk) s[4 * n + e] = -INFINITY;
      }
    }
  }
  // Row maxima and sums over 4 partial values each: while one consumer runs its softmax its
  // warps are alone on their schedulers, so chains of dependent instructions cost their latency.
  float pm_a[4], pm_b[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    pm_a[i] = fmaxf(s[4 * i], s[4 * i + 1]);
    pm_b[i] = fmaxf(s[4 * i + 2], s[4 * i + 3]);
  }
#pragma unroll
  for (int n = 4; n < kKeys / 8; ++n) {
    pm_a[n & 3] = fmaxf(pm_a[n & 3], fmaxf(s[4 * n], s[4 * n + 1]));
    pm_b[n & 3] = fmaxf(pm_b[n & 3], fmaxf(s[4 * n + 2], s[4 * n + 3]));
  }
  float mx_a = fmaxf(fmaxf(pm_a[0], pm_a[1]), fmaxf(pm_a[2], pm_a[3]));
  float mx_b = fmaxf(fmaxf(pm_b[0], pm_b[1]), fmaxf(pm_b[2], pm_b[3]));
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
  }
  const MaxStep step_a = RaiseMax(st.m_a, mx_a * scale_log2);
  const MaxStep step_b = RaiseMax(st.m_b, mx_b * scale_log2);
  const float ref_a = step_a.ref, ref_b = step_b.ref;
  const float2 alpha = make_float2(step_a.alpha, step_b.alpha);
  float ps_a[4] = {0.f, 0.f, 0.f, 0.f}, ps_b[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int n = 0; n < kKeys / 8; ++n) {
    s[4 * n] = Exp2(fmaf(s[4 * n], scale_log2, -ref_a));
    s[4 * n + 1] = Exp2(fmaf(s[4 * n + 1], scale_log2, -ref_a));
    s[4 * n + 2] = Exp2(fmaf(s[4 * n + 2], scale_log2, -ref_b));
    s[4 * n + 3] = Exp2(fmaf(s[4 * n + 3], scale_log2, -ref_b));
    ps_a[n & 3] += s[4 * n] + s[4 * n + 1];
    ps_b[n & 3] += s[4 * n + 2] + s[4 * n + 3];
  }
  st.l_a = st.l_a * alpha.x + ((ps_a[0] + ps_a[1]) + (ps_a[2] + ps_a[3]));
  st.l_b = st.l_b * alpha.y + ((ps_b[0] + ps_b[1]) + (ps_b[2] + ps_b[3]));
  return alpha;
}

// P (the exp2 values of s) as the 16-bit A fragments of the P V product, 16 keys each.
template <bool kBF16>
__device__ __forceinline__ void PackP(const float (&s)[64], uint32_t (&pa)[kKeys / 16][4]) {
#pragma unroll
  for (int n = 0; n < kKeys / 8; ++n) {
    pa[n >> 1][(n & 1) * 2] = Pack<kBF16>(s[4 * n], s[4 * n + 1]);
    pa[n >> 1][(n & 1) * 2 + 1] = Pack<kBF16>(s[4 * n + 2], s[4 * n + 3]);
  }
}

// S = Q K^T for the warpgroup's 64 rows: D in steps of 16 (32 bytes inside a 128-byte atom).
// dq, dk: descriptors of the warpgroup's Q rows and of the K tile; a step adds its byte offset
// >> 4 to the start-address field.
template <int D, bool kBF16>
__device__ __forceinline__ void IssueQK(float (&s)[64], uint64_t dq, uint64_t dk) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t in_atom = (kk & 3) * 32;
    wgmma::SS128<kBF16>(s, dq + (((kk >> 2) * kRows * 128 + in_atom) >> 4),
                        dk + (((kk >> 2) * kKeys * 128 + in_atom) >> 4), kk > 0 ? 1 : 0);
  }
}

// O += P V: 16 keys per step, V rows 16 kc.. as a transposed (N-major) B operand (dv: LBO = the
// distance between 64-column atoms, SBO = between groups of 8 keys).
template <int D, bool kBF16>
__device__ __forceinline__ void IssuePV(float (&o)[D / 2], const uint32_t (&pa)[kKeys / 16][4],
                                        uint64_t dv) {
#pragma unroll
  for (int kc = 0; kc < kKeys / 16; ++kc) {
    const uint64_t db = dv + ((kc * 16 * 128) >> 4);
    if constexpr (D == 128)
      wgmma::RS128<kBF16>(o, pa[kc], db, 1);
    else
      wgmma::RS64<kBF16>(o, pa[kc], db, 1);
  }
}

// Warp-specialized: warpgroup 0 copies K/V tiles into a ring of kStages stages; warpgroups 1 and 2
// each own 64 query rows and run the products and the softmax, without block-wide barriers, so
// that one consumer's softmax can overlap the other's products.
template <int D, bool kBF16>
__global__ void __launch_bounds__(kThreads, 1) WgmmaKernel(AttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  // Swizzle atoms must be 1024-byte aligned: round the dynamic allocation up (1 KB spare).
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                             ~static_cast<uintptr_t>(1023));
  constexpr int kTileBytes = kKeys * D * 2;
  // Q [kRows x D], then stages s = 0..2 of K and V ([kKeys x D] each), all swizzled; then the
  // mbarriers full[3] (complete when the producer's copies into stage s have landed, count
  // kLoaders) and empty[3] (when every consumer warp is done reading it, count 8).
  uint8_t* qs = smem;
  auto ks = [&](int s) { return smem + kRows * D * 2 + (2 * s) * kTileBytes; };
  auto vs = [&](int s) { return smem + kRows * D * 2 + (2 * s + 1) * kTileBytes; };
  auto addr = [](const void* x) { return static_cast<uint32_t>(__cvta_generic_to_shared(x)); };
  const uint32_t bars = addr(smem + kRows * D * 2 + 2 * kStages * kTileBytes);
  auto full = [&](int s) { return bars + 8 * s; };
  auto empty = [&](int s) { return bars + 8 * (kStages + s); };

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = warp >> 2;
  // GQA packing: a block holds `pack` query heads of one KV head (pack = 4, 2 or 1, dividing
  // G) for R = 128 / pack positions each, so that every K/V tile it copies serves pack heads.
  // Block row r is head hq0 + r / R at position t0 + r % R.
  const int pack_log2 = PackLog2(p.G);
  const int R_log2 = 7 - pack_log2, R = 1 << R_log2;
  const int64_t groups = p.heads >> pack_log2;
  const int64_t n_qtiles = (p.T + R - 1) >> R_log2;
  const int64_t qtile = n_qtiles - 1 - static_cast<int64_t>(blockIdx.x) / groups;
  const int64_t hq0 = (static_cast<int64_t>(blockIdx.x) % groups) << pack_log2, h = hq0 / p.G;
  const int64_t t0 = qtile << R_log2;
  auto row_t = [&](int r) { return t0 + (r & (R - 1)); };   // position of block row r
  auto row_h = [&](int r) { return hq0 + (r >> R_log2); };  // query head of block row r

  // Keys of the block: tiles j = 0 .. n_tiles-1 at k_begin + 128 j, aligned to 128.
  const int64_t t_last = min(p.T, t0 + R) - 1;
  const int64_t q_first = p.pos0 + t0, q_last = p.pos0 + t_last;
  int64_t k_begin = p.window > 0 ? max(static_cast<int64_t>(0), q_first - p.window + 1) : 0;
  k_begin = k_begin / kKeys * kKeys;
  const int64_t k_end = min(q_last + 1, p.n_keys);
  const int n_tiles = static_cast<int>((k_end - k_begin + kKeys - 1) / kKeys);  // >= 1

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      MbarInit(full(s), kLoaders);
      MbarInit(empty(s), 8);
    }
  }
  __syncthreads();

  if (wg == 0) {
    // Producer. Tile j goes to stage j % 3 once the consumers have released tile j - 3; the
    // copies of two tiles stay in flight, and full[] is signalled for a tile once its copies
    // have landed and are fenced for the tensor cores. When the stage for tile j is not free
    // yet, tile j - 1 is signalled as soon as it lands instead of after the wait: the consumers
    // may need it before they release the stage.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    auto load = [&](const void* arena, const TileRows& rows, const uint8_t* dst, int64_t kb) {
      if (kb + kKeys <= p.n_keys)
        LoadTile<D, false>(arena, rows, addr(dst), kKeys);
      else
        LoadTile<D, true>(arena, rows, addr(dst), static_cast<int>(p.n_keys - kb));
    };
    TileRows rows = RowsOf(p, h, k_begin);
    for (int j = 0; j < n_tiles; ++j) {
      const int s = j % kStages;
      const int64_t kb = k_begin + static_cast<int64_t>(j) * kKeys;
      bool signalled = j == 0;  // tile j - 1's full[] (none before tile 0)
      if (j >= kStages) {
        const uint32_t parity = ((j / kStages) - 1) & 1;
        if (!MbarTest(empty(s), parity)) {
          CpAsyncWait<0>();
          FenceProxyAsync();
          MbarArrive(full((j - 1) % kStages));
          signalled = true;
          MbarWait(empty(s), parity);
        }
      }
      load(p.k, rows, ks(s), kb);
      load(p.v, rows, vs(s), kb);
      CpAsyncCommit();
      rows = RowsOf(p, h, kb + kKeys);  // the next tile's rows, read while these copies fly
      if (!signalled) {
        CpAsyncWait<1>();
        FenceProxyAsync();
        MbarArrive(full((j - 1) % kStages));
      }
    }
    CpAsyncWait<0>();
    FenceProxyAsync();
    MbarArrive(full((n_tiles - 1) % kStages));
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
    const int c = wg - 1;  // consumer index: query rows 64 c .. 64 c + 63 of the block
    const int ct = threadIdx.x - kLoaders - c * 128;  // thread within the consumer warpgroup
    const int g = lane >> 2, tig = lane & 3;
    const float scale_log2 = p.scale * 1.4426950408889634f;  // scores in the log2 domain
    auto edge = [&](int64_t kb) {  // some key of the tile may be masked for some row
      return kb + kKeys - 1 > q_first || (p.window > 0 && kb < q_last - p.window + 1) ||
             kb + kKeys > p.n_keys;
    };

    // The consumer's 64 Q rows: f32 [T, heads, D] -> 16-bit swizzled, fenced for the tensor
    // cores, then a barrier over this warpgroup only (named barrier 1 + c).
    for (int i = ct; i < 64 * (D / 8); i += 128) {
      const int r = c * 64 + i / (D / 8), col = i % (D / 8);
      const int64_t t = row_t(r);
      uint4 packed = make_uint4(0, 0, 0, 0);
      if (t < p.T) {
        const float4* src =
            reinterpret_cast<const float4*>(p.q + (t * p.heads + row_h(r)) * D + col * 8);
        const float4 a = src[0], b = src[1];
        packed = make_uint4(Pack<kBF16>(a.x, a.y), Pack<kBF16>(a.z, a.w), Pack<kBF16>(b.x, b.y),
                            Pack<kBF16>(b.z, b.w));
      }
      *reinterpret_cast<uint4*>(qs + SwizzledChunk(kRows, r, col)) = packed;
    }
    FenceProxyAsync();
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory");

    // This thread's rows (within the block): a = 64 c + 16 (warp % 4) + g, b = a + 8.
    const int ra = c * 64 + (warp & 3) * 16 + g, rb = ra + 8;
    const int64_t ta = row_t(ra), tb = row_t(rb);
    const int64_t qpos_a = p.pos0 + ta, qpos_b = p.pos0 + tb;
    const uint64_t dq = wgmma::MakeDesc(qs + c * 64 * 128, 16, 1024);
    const uint64_t dk0 = wgmma::MakeDesc(ks(0), 16, 1024);
    const uint64_t dv0 = wgmma::MakeDesc(vs(0), kKeys * 128, 1024);
    auto stage_off = [](int s) { return static_cast<uint64_t>(s * 2 * (kTileBytes >> 4)); };
    // Ping-pong: the two consumers take turns issuing their products (named barriers 3 and 4,
    // 256 threads: one consumer's sync meets the other's arrive), so that one's products run
    // while the other computes its softmax. Consumer 0 goes first.
    auto my_turn = [&] { asm volatile("bar.sync %0, 256;\n" ::"r"(3 + c) : "memory"); };
    auto your_turn = [&] { asm volatile("bar.arrive %0, 256;\n" ::"r"(4 - c) : "memory"); };
    if (c == 1) your_turn();
    auto release = [&](int s) {  // after this warp's wait for the products that read stage s
      if (lane == 0) MbarArrive(empty(s));
    };

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    RowState st;
    uint32_t pa[kKeys / 16][4];  // P_{j-1}, the A operand of the next P V product
    auto softmax = [&](float(&s)[64], int64_t kb) {
      return edge(kb) ? Softmax<true>(p, s, st, kb, qpos_a, qpos_b, tig, scale_log2)
                      : Softmax<false>(p, s, st, kb, qpos_a, qpos_b, tig, scale_log2);
    };

    // Step j: S_j = Q K_j^T and O += P_{j-1} V_{j-1} on the tensor cores; the softmax of S_j
    // overlaps the P V product. The first and last steps are peeled off the loop so that every
    // wgmma wait in it sees the same groups on every path (ptxas serializes all the products
    // otherwise).
    MbarWait(full(0), 0);
    {
      float s[64];
      my_turn();
      wgmma::Fence();
      IssueQK<D, kBF16>(s, dq, dk0);
      wgmma::Commit();
      your_turn();
      wgmma::Wait<0>();
      wgmma::FenceRegs(s);
      softmax(s, k_begin);  // o is still 0: no rescaling
      PackP<kBF16>(s, pa);
    }
    for (int j = 1; j < n_tiles; ++j) {
      const int64_t kb = k_begin + static_cast<int64_t>(j) * kKeys;
      const int sj = j % kStages, sp = (j - 1) % kStages;
      MbarWait(full(sj), (j / kStages) & 1);
      float s[64];  // fresh each step: no copies of the last step's values inside the pipeline
      wgmma::FenceRegs(o);
      my_turn();
      wgmma::Fence();
      IssueQK<D, kBF16>(s, dq, dk0 + stage_off(sj));
      wgmma::Commit();
      IssuePV<D, kBF16>(o, pa, dv0 + stage_off(sp));
      wgmma::Commit();
      your_turn();
      wgmma::Wait<1>();  // S_j done; P_{j-1} V_{j-1} may still run during the softmax
      wgmma::FenceRegs(s);
      const float2 alpha = softmax(s, kb);
      wgmma::Wait<0>();
      wgmma::FenceRegs(o);
      release(sp);
      // Once the row maxima settle (most steps of a long prompt) no row of the warp rescales.
      if (!__all_sync(0xffffffffu, alpha.x == 1.f && alpha.y == 1.f)) {
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          o[4 * i] *= alpha.x;
          o[4 * i + 1] *= alpha.x;
          o[4 * i + 2] *= alpha.y;
          o[4 * i + 3] *= alpha.y;
        }
      }
      PackP<kBF16>(s, pa);
    }
    wgmma::FenceRegs(o);
    my_turn();
    wgmma::Fence();
    IssuePV<D, kBF16>(o, pa, dv0 + stage_off((n_tiles - 1) % kStages));
    wgmma::Commit();
    if (c == 0) your_turn();  // consumer 1's last turn has no one after it
    wgmma::Wait<0>();
    wgmma::FenceRegs(o);

    float l_a = st.l_a, l_b = st.l_b;
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
      l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
    }
    // Rows a (accumulators 0, 1 of each group of 4) and b (2, 3): normalised output and lse.
    auto write_row = [&](int64_t t, int64_t hq, float l, float m, int e) {
      if (t >= p.T) return;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      float* orow = p.out + (t * p.heads + hq) * D;
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<float2*>(orow + i * 8 + tig * 2) =
            make_float2(o[4 * i + e] * inv, o[4 * i + e + 1] * inv);
      if (p.m != nullptr && tig == 0)
        p.m[t * p.heads + hq] = l > 0.f ? (m + log2f(l)) * 0.6931471805599453f : -INFINITY;
    };
    write_row(ta, row_h(ra), l_a, st.m_a, 0);
    write_row(tb, row_h(rb), l_b, st.m_b, 2);
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

constexpr size_t SmemBytes(int D) {
  return 1024 + static_cast<size_t>(kRows) * D * 2 +
         2 * kStages * static_cast<size_t>(kKeys) * D * 2 + 16 * kStages;
}

template <int D, bool kBF16>
void Launch(const AttnParams& p, cudaStream_t stream) {
  OptInSharedMemory<WgmmaKernel<D, kBF16>>(SmemBytes(D));
  const int pack_log2 = PackLog2(p.G), R = kRows >> pack_log2;  // positions per block
  const int64_t blocks = (p.T + R - 1) / R * (p.heads >> pack_log2);
  WgmmaKernel<D, kBF16><<<static_cast<unsigned>(blocks), kThreads, SmemBytes(D), stream>>>(p);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

}  // namespace

bool WgmmaCompiled() {
#if defined(NEEDLE_WGMMA)
  return true;
#else
  return false;
#endif
}

bool WgmmaAttention(const AttnParams& p, cudaStream_t stream) {
  if (!WgmmaCompiled() || p.B % 64 != 0 || p.heads % p.kv_heads != 0) return false;
  return Dispatch16Bit(
      p, [&](auto d, auto bf16) { Launch<decltype(d)::value, decltype(bf16)::value>(p, stream); });
}

}  // namespace needle::cuda
