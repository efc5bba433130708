// Flash-decoding with the copy engine and the tensor cores (sm_90); see attention_decode_tma.h.
//
// Block (kv_head h, split): 4 warps, each with its own ring of kStages shared-memory stages. The
// visible keys are cut into tiles of 32, aligned to 32 so that a tile lies in one cache block
// (block_size % 32 == 0); warp w takes tiles w, w + 4, ... of its block's split. For each tile
// one lane asks the copy engine for the K and V rows (D/64 boxes of [32 keys x 64 elements] each,
// 128-byte swizzled) on the stage's mbarrier, kStages tiles ahead of the tile the warp computes:
// a block keeps up to 4 x kStages tiles (192 KB at head_dim 128) in flight without registers,
// which the register-streaming kernel (attention_decode.cu) cannot at short contexts.
//
// Per tile, with the keys as the M dimension of mma.m16n8k16 and the (up to 8) query heads as N
// (fragment layouts in mma.cuh; lane = 4 g + t):
//   S^T [32 keys x 8 heads] = K [32 x D] Q^T [D x 8]   K as A fragments (ldmatrix), Q^T as B
//     fragments held in registers for the whole block;
//   online softmax per head in the log2 domain: a lane holds heads 2t, 2t+1 of keys g, g + 8,
//     g + 16, g + 24; maxima over the 8 lanes of a head by shuffles, sums kept per lane;
//   P^T [32 x 8]: the probabilities packed to 16 bits and transposed across the warp (movmatrix)
//     into B fragments;
//   O^T [D x 8] += V^T [D x 32] P^T   V^T as A fragments (ldmatrix.trans). A lane's accumulators
//     belong to its heads 2t, 2t+1, so the rescale needs no shuffle.
// Precision: q and p are each split into a 16-bit part and the 16-bit rounding of the rest
// (x ~ hi + lo), and both parts go through the products: they carry ~16 (bf16) or ~22 (f16)
// bits instead of 8 or 11, close to the f32 of the register kernel. With G <= 4 (kPack) the two
// parts share one product: columns 0-3 of Q^T and P^T hold the hi parts of heads 0-3 and
// columns 4-7 their lo parts, so lanes t and t ^ 2 hold the two halves of the same heads and add
// them with a shuffle (the scores every tile, the accumulators once at the end). With G > 4 each
// part has its own products.
//
// H100, 32 query heads, 8 KV heads, head_dim 128 (bench/RESULTS.md): 0.45 of the copy bandwidth
// at 4K keys, 0.75 at 16K, 0.98 at 128K, 1.04 at 1M. At 4K the call is mostly fixed cost: the
// copy engine streaming the same paged tiles with nothing else takes 7.7 us of its 12.4, and
// with the split merge 11.1 us (bench/bench_decode_floors.cu).
//
// The block then combines its 4 warps and the last block of h merges the splits
// (decode_merge.cuh).
#include "engine/cuda/attention_decode_tma.h"

#include <cuda.h>  // CUtensorMap and its enums; the encoder is reached through the runtime
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "engine/base/error.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/decode_merge.cuh"
#include "engine/cuda/device_util.cuh"
#include "engine/cuda/l2_policy.cuh"
#include "engine/cuda/mma.cuh"
#include "engine/cuda/pdl.cuh"
#include "engine/cuda/smem_async.cuh"

namespace needle::cuda {
namespace {

constexpr int kWarps = 4, kThreads = kWarps * 32;
constexpr int kTileKeys = 32;  // keys per tile
constexpr int kStages = 3;     // tiles in flight per warp
constexpr int kG = 8;          // query heads per KV head the products hold (the N of m16n8k16)

// Shared memory: per warp kStages stages of [K tile | V tile], each tile D/64 swizzled atoms
// [32 keys][128 bytes].
template <int D>
struct Layout {
  static constexpr int kTileBytes = kTileKeys * D * 2;
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kWarpBytes = kStages * kStageBytes;
  static constexpr size_t kDynamicBytes = 1024 + static_cast<size_t>(kWarps) * kWarpBytes;
};

// q [G][D] f32 of KV head h as Q^T B fragments of column g, in two steps so that the loads can
// fly while the block sets up: LoadQ reads x[ks] = {d 16 ks + 2t, +1}, {d 16 ks + 2t + 8, +9} of
// head g (zeros for heads >= G); SplitQ scales them to the log2 domain and splits them into the
// hi and lo 16-bit parts qh/ql. Packed (G <= 4): column g holds head g % 4, its hi part for
// g < 4 and its lo part for g >= 4, in qh (ql unused).
template <int D, bool kPack>
__device__ __forceinline__ void LoadQ(const AttnParams& p, int64_t h, int g, int t,
                                      float2 (&x)[D / 16][2]) {
  const int head = kPack ? g & 3 : g;
  const float* qr = p.q + (h * p.G + head) * D;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      x[ks][j] = head < p.G ? *reinterpret_cast<const float2*>(qr + 16 * ks + 2 * t + 8 * j)
                            : make_float2(0.f, 0.f);
}
template <int D, bool kBF16, bool kPack>
__device__ __forceinline__ void SplitQ(const AttnParams& p, int g, const float2 (&x)[D / 16][2],
                                       uint32_t (&qh)[D / 16][2], uint32_t (&ql)[D / 16][2]) {
  const float s = p.scale * 1.4426950408889634f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      uint32_t hi, lo;
      SplitHiLo<kBF16>(x[ks][j].x * s, x[ks][j].y * s, hi, lo);
      qh[ks][j] = kPack && g >= 4 ? lo : hi;
      ql[ks][j] = lo;
    }
}

// The rows of a batched launch (blockIdx.z: the row), as a kernel parameter: each row's own q,
// table, position, output, partials and counters, and its split cut.
struct BatchRow {
  const float* q;
  const int32_t* table;
  float *out, *part;
  unsigned int* counter;
  int64_t pos0, keys_per_split;
  int splits;
};
struct NoRows {
  static constexpr bool kRows = false;
};
struct BatchRows {
  static constexpr bool kRows = true;
  BatchRow r[kMaxTmaDecodeRows];
};

template <int D, bool kBF16, bool kPack, class Rows>
__global__ void __launch_bounds__(kThreads, 1)
    TmaDecodeKernel(const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv,
                    AttnParams p, MergeArgs mg, const __grid_constant__ Rows rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (Rows::kRows) {  // this block's row of a batch: p and mg as a call of it alone
    const BatchRow& r = rows.r[blockIdx.z];
    if (static_cast<int>(blockIdx.y) >= r.splits) return;
    p.q = r.q;
    p.table = r.table;
    p.pos0 = r.pos0;
    p.n_keys = r.pos0 + 1;
    p.splits = r.splits;
    p.keys_per_split = r.keys_per_split;
    mg.out = r.out;
    mg.lse = nullptr;
    mg.counter = r.counter;
    if (r.splits == 1) {
      p.out = r.out, p.m = nullptr;
    } else {
      p.out = r.part;
      p.m = r.part + static_cast<int64_t>(r.splits) * p.heads * D;
      p.l = p.m + static_cast<int64_t>(r.splits) * p.heads;
    }
  }
  using L = Layout<D>;
  extern __shared__ uint8_t smem_raw[];
  // Swizzle atoms must be 1024-byte aligned: round the dynamic allocation up (1 KB spare).
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                             ~static_cast<uintptr_t>(1023));
  __shared__ __align__(8) uint64_t bars[kWarps][kStages];
  __shared__ float sm_acc[kWarps][kG][D];
  __shared__ float sm_m[kWarps][kG], sm_l[kWarps][kG];
  auto saddr = [](const void* x) { return static_cast<uint32_t>(__cvta_generic_to_shared(x)); };

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t h = blockIdx.x;
  const int split = blockIdx.y;

  // Visible keys [k_lo, k_end); the split's keys [key_begin, key_stop), key_begin tile-aligned.
  // A replayed step reads its position and cuts its tiles among the grid's splits here, as
  // TmaDecodeSplitOf would with the splits fixed (the splits past the last tile stay empty).
  const int64_t qpos = p.dpos != nullptr ? *p.dpos : p.pos0;  // T == 1
  const int64_t k_lo = p.window > 0 ? max(static_cast<int64_t>(0), qpos - p.window + 1) : 0;
  const int64_t k_end = p.dpos != nullptr ? qpos + 1 : min(qpos + 1, p.n_keys);
  int64_t keys_per_split = p.keys_per_split;
  if (p.dpos != nullptr) {
    const int64_t tiles = (k_end + kTileKeys - 1) / kTileKeys - k_lo / kTileKeys;
    keys_per_split = (tiles + p.splits - 1) / p.splits * kTileKeys;
  }
  const int64_t key_begin = k_lo / kTileKeys * kTileKeys + split * keys_per_split;
  const int64_t key_stop = min(k_end, key_begin + keys_per_split);
  const int n_tiles = key_stop > key_begin
                          ? static_cast<int>((key_stop - key_begin + kTileKeys - 1) / kTileKeys)
                          : 0;
  const int n_my = n_tiles > warp ? (n_tiles - warp + kWarps - 1) / kWarps : 0;
  auto tile_key = [&](int i) {
    return key_begin + static_cast<int64_t>(warp + kWarps * i) * kTileKeys;
  };

  // Block-table entries of the warp's tiles, 32 at a time: lane j holds the slot of tile
  // 32 c + j of batch c; the next batch is loaded a batch ahead.
  const int32_t* table = p.table + h * p.table_head_stride;  // (this head's)
  auto load_slots = [&](int c) -> int32_t {
    const int i = 32 * c + lane;
    return i < n_my ? __ldg(table + static_cast<uint32_t>(tile_key(i)) / static_cast<uint32_t>(p.B))
                    : 0;
  };
  // The first global loads (block table) go out before anything waits on them: the barrier
  // set-up and the descriptor prefetch run in their shadow (asm with memory clobbers would keep
  // the compiler from hoisting the loads above it). A split holding keys whose per-head table
  // entries the kernel before writes in the step (AttnParams::table_late_lo/hi) reads its table,
  // and issues its tiles, after the wait (pdl.cuh's rules).
  const bool table_in_step = key_begin < p.table_late_hi && key_stop > p.table_late_lo;
  int32_t slot_cur = 0, slot_next = 0;
  const auto load_first_slots = [&] {
    slot_cur = load_slots(0), slot_next = n_my > 32 ? load_slots(1) : 0;
  };
  if (!table_in_step) load_first_slots();
  if (threadIdx.x == 0) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tk)) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tv)) : "memory");
  }
  const uint64_t pol = StreamPolicy(p.evict_first);  // (the tiles are read once a step)
  uint8_t* wbase = smem + warp * L::kWarpBytes;
  const uint32_t wbase_s = saddr(wbase), bar0 = saddr(&bars[warp][0]);
  if (lane == 0) {
    for (int s = 0; s < kStages; ++s) MbarInit(bar0 + 8 * s, 1);
    FenceMbarInit();
  }
  __syncwarp();

  // Tile i of the warp into stage i % kStages; issued in order i = 0, 1, ... by the whole warp.
  // holes: bit s set while stage s holds a tile of no block (slot -1: the device plan of host
  // placement leaves the selected blocks the GPU does not hold so; the CPU attends them). Its
  // keys are masked like those outside [k_lo, k_end).
  unsigned holes = 0;
  auto issue = [&](int i) {
    if (i > 0 && i % 32 == 0) {
      slot_cur = slot_next;
      slot_next = load_slots(i / 32 + 1);
    }
    const int32_t slot = __shfl_sync(0xffffffffu, slot_cur, i % 32);
    const int s = i % kStages;
    holes = slot < 0 ? holes | (1u << s) : holes & ~(1u << s);  // (the same in every lane)
    if (lane == 0) {
      const uint32_t bar = bar0 + 8 * s, kdst = wbase_s + s * L::kStageBytes;
      const uint32_t key0 = static_cast<uint32_t>(tile_key(i)), B = static_cast<uint32_t>(p.B);
      // An unassigned block (slot -1) gives a negative row: the copy engine fills zeros.
      const int row =
          static_cast<int>((static_cast<int64_t>(slot) * p.kv_heads + h) * p.B + key0 % B);
      MbarArriveExpectTx(bar, L::kStageBytes);
#pragma unroll
      for (int a = 0; a < D / 64; ++a) {
        TmaLoad2d(kdst + a * kTileKeys * 128, &tk, a * 64, row, bar, pol);
        TmaLoad2d(kdst + L::kTileBytes + a * kTileKeys * 128, &tv, a * 64, row, bar, pol);
      }
    }
  };
  // Launched dependent (pdl.cuh), the tiles of earlier steps' keys are copied while the kernel
  // before (the q/k/v projection) finishes: it writes q and the row of qpos, so the tile that
  // holds qpos and q wait for it. (The tensor copies read through the async proxy; the fence
  // orders them after the projection's generic writes.)
  int issued = 0;
  for (;
       !table_in_step && issued < kStages && issued < n_my && tile_key(issued) + kTileKeys <= qpos;
       ++issued)
    issue(issued);
  WaitForPredecessor();
  AllowSuccessor();
  if (table_in_step) load_first_slots();
  float2 qx[D / 16][2];
  LoadQ<D, kPack>(p, h, g, t, qx);
  if (lane == 0) asm volatile("fence.proxy.async.global;\n" ::: "memory");
  for (; issued < kStages && issued < n_my; ++issued) issue(issued);
  uint32_t qh[D / 16][2], ql[D / 16][2];
  SplitQ<D, kBF16, kPack>(p, g, qx, qh, ql);

  // Running maxima (log2 units) and this lane's share of the sums, of heads 2t and 2t + 1.
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  float o[D / 16][4];  // O^T: o[mt] = {d 16 mt + g: heads 2t, 2t+1}, {d + 8: heads 2t, 2t+1}
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;

  for (int i = 0; i < n_my; ++i) {
    const int s = i % kStages;
    MbarWait(bar0 + 8 * s, (i / kStages) & 1);
    const uint32_t ks = wbase_s + s * L::kStageBytes, vs = ks + L::kTileBytes;
    const int64_t key0 = tile_key(i);
    const bool hole = ((holes >> s) & 1u) != 0;  // (its V rows are the copy engine's zeros)
    const bool edge = hole || key0 < k_lo || key0 + kTileKeys > k_end;
    if (edge && !hole) {
      // Keys outside [k_lo, k_end) get probability 0, but their V rows may hold anything (past
      // the cache end: never written) and 0 * NaN is NaN: zero them.
      const int64_t key = key0 + lane;
      if (key < k_lo || key >= k_end) {
        uint4* vrow = reinterpret_cast<uint4*>(wbase + s * L::kStageBytes + L::kTileBytes);
#pragma unroll
        for (int a = 0; a < D / 64; ++a)
#pragma unroll
          for (int c = 0; c < 8; ++c) vrow[(a * kTileKeys + lane) * 8 + c] = make_uint4(0, 0, 0, 0);
      }
      __syncwarp();
    }

    // S^T = K Q^T, keys 16 mt + (g, g + 8). The hi and lo parts of q and the even and odd
    // k-steps go to separate accumulators: 8 chains of D/32 dependent products, not 4 of D/8
    // (the last tiles' products are the tail of a short call).
    float sp[2][2][2][4] = {};  // [mt][hi, lo][kc % 2]
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        uint32_t a[4];  // matrices: keys +0/+8 (lane bit 3), d chunk 2 kc / 2 kc + 1 (bit 4)
        const int r = 16 * mt + (lane & 7) + ((lane >> 3) & 1) * 8, c = 2 * kc + (lane >> 4);
        Ldsm4(a, ks + SwizzledChunk(kTileKeys, r, c));
        Mma<kBF16>(sp[mt][0][kc & 1], a, qh[kc][0], qh[kc][1]);
        if (!kPack) Mma<kBF16>(sp[mt][1][kc & 1], a, ql[kc][0], ql[kc][1]);
      }
    float sc[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[mt][e] = (sp[mt][0][0][e] + sp[mt][0][1][e]) + (sp[mt][1][0][e] + sp[mt][1][1][e]);
        // Packed: lanes t and t ^ 2 hold the hi and lo products of the same heads.
        if (kPack) sc[mt][e] += __shfl_xor_sync(0xffffffffu, sc[mt][e], 2);
        if (edge) {
          const int64_t key = key0 + 16 * mt + g + (e >> 1) * 8;
          if (hole || key < k_lo || key >= k_end) sc[mt][e] = -INFINITY;
        }
      }
    float mx0 = fmaxf(fmaxf(sc[0][0], sc[0][2]), fmaxf(sc[1][0], sc[1][2]));
    float mx1 = fmaxf(fmaxf(sc[0][1], sc[0][3]), fmaxf(sc[1][1], sc[1][3]));
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const MaxStep step0 = RaiseMax(m0, mx0), step1 = RaiseMax(m1, mx1);
    const float ref0 = step0.ref, ref1 = step1.ref, alpha0 = step0.alpha, alpha1 = step1.alpha;
    float pr[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      pr[mt][0] = Exp2(sc[mt][0] - ref0);
      pr[mt][1] = Exp2(sc[mt][1] - ref1);
      pr[mt][2] = Exp2(sc[mt][2] - ref0);
      pr[mt][3] = Exp2(sc[mt][3] - ref1);
    }
    l0 = l0 * alpha0 + (pr[0][0] + pr[0][2]) + (pr[1][0] + pr[1][2]);
    l1 = l1 * alpha1 + (pr[0][1] + pr[0][3]) + (pr[1][1] + pr[1][3]);
    // The tile's own sums (AttentionTileStats), relative to the running maxima (the warp's
    // tile: a uniform branch). Packed: lanes t < 2 hold the heads.
    if (p.tile_stats != nullptr && key0 >= p.stats_key0 && key0 < p.stats_key_end) {
      float s0 = (pr[0][0] + pr[0][2]) + (pr[1][0] + pr[1][2]);
      float s1 = (pr[0][1] + pr[0][3]) + (pr[1][1] + pr[1][3]);
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) {
        s0 += __shfl_xor_sync(0xffffffffu, s0, off);
        s1 += __shfl_xor_sync(0xffffffffu, s1, off);
      }
      if (g == 0 && (!kPack || t < 2)) {
        constexpr float kLn2 = 0.6931471805599453f;
        const int64_t tiles = (p.stats_key_end - p.stats_key0) / kTileKeys;
        float* st = p.tile_stats + (h * tiles + (key0 - p.stats_key0) / kTileKeys) * p.G * 2;
        if (2 * t < p.G) st[4 * t] = ref0 * kLn2, st[4 * t + 1] = s0;
        if (2 * t + 1 < p.G) st[4 * t + 2] = ref1 * kLn2, st[4 * t + 3] = s1;
      }
    }
    // Once the maxima settle (most tiles of a long split) no lane of the warp rescales.
    if (!__all_sync(0xffffffffu, alpha0 == 1.f && alpha1 == 1.f)) {
#pragma unroll
      for (int mt = 0; mt < D / 16; ++mt) {
        o[mt][0] *= alpha0;
        o[mt][1] *= alpha1;
        o[mt][2] *= alpha0;
        o[mt][3] *= alpha1;
      }
    }
    // P^T B fragments of keys 16 kc ..: {keys 2t, 2t+1; column g}, {keys 2t+8, 2t+9; column g},
    // from the accumulator pairs {key g; columns 2t, 2t+1} transposed; hi and lo parts (packed:
    // lanes t < 2 give the hi parts, columns 0-3, lanes t >= 2 the lo parts, columns 4-7).
    uint32_t ph[2][2], pl[2][2];
#pragma unroll
    for (int kc = 0; kc < 2; ++kc)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t hi, lo;
        SplitHiLo<kBF16>(pr[kc][2 * j], pr[kc][2 * j + 1], hi, lo);
        ph[kc][j] = MovTrans(kPack && t >= 2 ? lo : hi);
        if (!kPack) pl[kc][j] = MovTrans(lo);
      }
      // O^T += V^T P^T, d rows 16 mt .. (packed: columns 4-7 accumulate the lo parts)
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
      for (int kc = 0; kc < 2; ++kc) {
        uint32_t a[4];  // matrices: d chunk 2 mt / 2 mt + 1 (lane bit 3), keys +0/+8 (bit 4)
        const int r = 16 * kc + (lane & 7) + (lane >> 4) * 8, c = 2 * mt + ((lane >> 3) & 1);
        Ldsm4Trans(a, vs + SwizzledChunk(kTileKeys, r, c));
        Mma<kBF16>(o[mt], a, ph[kc][0], ph[kc][1]);
        if (!kPack) Mma<kBF16>(o[mt], a, pl[kc][0], pl[kc][1]);
      }
    // Stage s is read (the products consumed its fragments): refill it.
    if (i + kStages < n_my) {
      FenceProxyAsync();
      __syncwarp();
      issue(i + kStages);
    }
  }

  // The warp's partial: sums over the 8 lanes of a head; m in natural-log units for the merge.
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  // Packed: the lo columns' sums join the hi ones in lanes t < 2, which own heads 2t, 2t + 1.
  if (kPack) {
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][e] += __shfl_xor_sync(0xffffffffu, o[mt][e], 2);
  }
  if (!kPack || t < 2) {
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
      sm_acc[warp][2 * t][16 * mt + g] = o[mt][0];
      sm_acc[warp][2 * t + 1][16 * mt + g] = o[mt][1];
      sm_acc[warp][2 * t][16 * mt + g + 8] = o[mt][2];
      sm_acc[warp][2 * t + 1][16 * mt + g + 8] = o[mt][3];
    }
    if (g == 0) {
      constexpr float kLn2 = 0.6931471805599453f;
      sm_m[warp][2 * t] = m0 == -INFINITY ? -INFINITY : m0 * kLn2;
      sm_m[warp][2 * t + 1] = m1 == -INFINITY ? -INFINITY : m1 * kLn2;
      sm_l[warp][2 * t] = l0;
      sm_l[warp][2 * t + 1] = l1;
    }
  }
  __syncthreads();
  WriteBlockResult<kThreads, kG, D>(p, h, split, kWarps, &sm_acc[0][0][0], &sm_m[0][0],
                                    &sm_l[0][0]);
  if (p.splits == 1) return;
  MergeIfLast<kWarps, kG, D>(p, mg, h);
#endif  // __CUDA_ARCH__ >= 900
}

using EncodeFn = PFN_cuTensorMapEncodeTiled_v12000;

// The driver's tensor-map encoder, or nullptr when the driver has none.
EncodeFn Encoder() {
  static const EncodeFn fn = []() -> EncodeFn {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<EncodeFn>(f);
  }();
  return fn;
}

// The tensor map of one arena, [rows][D] 16-bit elements: boxes of [32 rows][64 elements],
// 128-byte swizzled.
CUtensorMap ArenaMap(const void* arena, int64_t rows, int D, bool bf16) {
  CUtensorMap m;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(D) * 2};
  const cuuint32_t box[2] = {64, kTileKeys};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r =
      Encoder()(&m, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                const_cast<void*>(arena), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    Fail("CUDA decode attention: cuTensorMapEncodeTiled failed (CUresult ", static_cast<int>(r),
         ") for an arena of ", rows, " rows x ", D, " at ", arena);
  return m;
}

// Whether the kernel the device would run was compiled for sm_90 or later (its body exists):
// builds for other architectures leave it empty.
template <int D, bool kBF16, bool kPack>
bool Compiled() {
  static const bool ok = [] {
    cudaFuncAttributes a{};
    if (cudaFuncGetAttributes(&a, TmaDecodeKernel<D, kBF16, kPack, NoRows>) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return a.ptxVersion >= 90;
  }();
  return ok;
}

template <int D, bool kBF16, bool kPack>
bool Launch(AttnParams p, int sm_count, AttnWorkspace& ws, cudaStream_t stream) {
  if (!Compiled<D, kBF16, kPack>()) return false;
  // Tiles of the visible keys. A replayed step (p.dpos) serves every later position with the
  // grid recorded: as many splits as any position could use, cut by the kernel.
  const int64_t k_lo = p.window > 0 ? std::max<int64_t>(0, p.pos0 - p.window + 1) : 0;
  const int64_t k_end = std::min(p.pos0 + 1, p.n_keys);
  const int64_t tiles = (k_end + kTileKeys - 1) / kTileKeys - k_lo / kTileKeys;
  TmaDecodeSplit cut = TmaDecodeSplitOf(tiles, sm_count, p.kv_heads);
  if (p.dpos != nullptr)
    cut.splits = std::clamp<int64_t>(sm_count / p.kv_heads, 1, kMaxDecodeSplits);
  p.keys_per_split = cut.tiles_per_split * kTileKeys;
  const MergeArgs mg = UseSplits(p, cut.splits, ws, stream);
  const CUtensorMap tk = ArenaMap(p.k, p.arena_rows, D, kBF16);
  const CUtensorMap tv = ArenaMap(p.v, p.arena_rows, D, kBF16);
  constexpr size_t smem = Layout<D>::kDynamicBytes;
  OptInSharedMemory<TmaDecodeKernel<D, kBF16, kPack, NoRows>>(smem);
  const dim3 grid(static_cast<unsigned>(p.kv_heads), static_cast<unsigned>(cut.splits));
  LaunchDependent(TmaDecodeKernel<D, kBF16, kPack, NoRows>, grid, kThreads, smem, stream, tk, tv, p,
                  mg, NoRows{});
  NEEDLE_CUDA_CHECK_LAUNCH();
  return true;
}

// A batched row's partials [splits][heads][D], m and l [splits][heads], rounded up to 128 bytes:
// the next row's begin where the merge's 16-byte loads may read them.
int64_t PartFloats(int64_t splits, const AttnParams& p) {
  return (splits * p.heads * (p.D + 2) + 31) / 32 * 32;
}

template <int D, bool kBF16, bool kPack>
bool LaunchRows(AttnParams p, const TmaDecodeRow* in, int n, int sm_count, AttnWorkspace& ws,
                cudaStream_t stream) {
  if (!Compiled<D, kBF16, kPack>()) return false;
  BatchRows rows{};
  int64_t part_floats = 0, most = 1;
  for (int i = 0; i < n; ++i) {  // each row's cut, as Launch makes it for the row alone
    const int64_t pos = in[i].pos0;
    const int64_t k_lo = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
    const int64_t tiles = (pos + 1 + kTileKeys - 1) / kTileKeys - k_lo / kTileKeys;
    const TmaDecodeSplit cut = TmaDecodeRowSplitOf(tiles, sm_count, p.kv_heads);
    BatchRow& r = rows.r[i];
    r.q = in[i].q, r.table = in[i].table, r.out = in[i].out, r.pos0 = pos;
    r.splits = static_cast<int>(cut.splits);
    r.keys_per_split = cut.tiles_per_split * kTileKeys;
    if (r.splits > 1) part_floats += PartFloats(r.splits, p);
    most = std::max<int64_t>(most, r.splits);
  }
  float* part =
      part_floats > 0 ? ws.partials.Get<float>(static_cast<size_t>(part_floats)) : nullptr;
  auto* counters = ws.counters.GetZeroed<unsigned int>(static_cast<size_t>(n * p.kv_heads), stream);
  for (int i = 0; i < n; ++i) {
    BatchRow& r = rows.r[i];
    r.counter = counters + i * p.kv_heads;
    if (r.splits > 1) r.part = part, part += PartFloats(r.splits, p);
  }
  const CUtensorMap tk = ArenaMap(p.k, p.arena_rows, D, kBF16);
  const CUtensorMap tv = ArenaMap(p.v, p.arena_rows, D, kBF16);
  constexpr size_t smem = Layout<D>::kDynamicBytes;
  OptInSharedMemory<TmaDecodeKernel<D, kBF16, kPack, BatchRows>>(smem);
  const dim3 grid(static_cast<unsigned>(p.kv_heads), static_cast<unsigned>(most),
                  static_cast<unsigned>(n));
  LaunchDependent(TmaDecodeKernel<D, kBF16, kPack, BatchRows>, grid, kThreads, smem, stream, tk, tv,
                  p, MergeArgs{}, rows);
  NEEDLE_CUDA_CHECK_LAUNCH();
  return true;
}

}  // namespace

TmaDecodeSplit TmaDecodeRowSplitOf(int64_t tiles, int sm_count, int64_t kv_heads) {
  TmaDecodeSplit cut = TmaDecodeSplitOf(tiles, sm_count, kv_heads);
  // NEEDLE_ROW_SPLIT_TILES: the least tiles of a split (comparisons; read once).
  static const int64_t least = [] {
    const char* e = std::getenv("NEEDLE_ROW_SPLIT_TILES");
    const int64_t v = e != nullptr ? std::atoll(e) : 0;
    return v >= 1 ? v : kMinRowSplitTiles;
  }();
  if (cut.tiles_per_split >= least) return cut;
  cut.tiles_per_split = std::min<int64_t>(least, std::max<int64_t>(1, tiles));
  cut.splits = (tiles + cut.tiles_per_split - 1) / cut.tiles_per_split;
  return cut;
}

TmaDecodeSplit TmaDecodeSplitOf(int64_t tiles, int sm_count, int64_t kv_heads) {
  const int64_t want = std::clamp<int64_t>(
      sm_count / kv_heads, 1,
      std::min<int64_t>(kMaxDecodeSplits, std::max<int64_t>(1, tiles / kWarps)));
  const int64_t tiles_per_split = (tiles + want - 1) / want;
  return {tiles_per_split, (tiles + tiles_per_split - 1) / tiles_per_split};  // none empty
}

namespace {
bool Qualifies(const AttnParams& p) {
  return p.T == 1 && p.G <= kG && p.heads % p.kv_heads == 0 && p.B % kTileKeys == 0 &&
         p.arena_rows > 0 && p.arena_rows < (int64_t{1} << 31) && ComputeCapability() >= 90 &&
         Encoder() != nullptr;
}
}  // namespace

bool TmaDecodeAttentionRows(AttnParams p, const TmaDecodeRow* rows, int n, int sm_count,
                            AttnWorkspace& ws, cudaStream_t stream) {
  if (n < 1 || n > kMaxTmaDecodeRows || !Qualifies(p) || p.dpos != nullptr ||
      p.tile_stats != nullptr)
    return false;
  p.evict_first = StreamEvictFirst();
  bool launched = false;
  Dispatch16Bit(p, [&](auto d, auto bf16) {
    constexpr int D = decltype(d)::value;
    constexpr bool kBF16 = decltype(bf16)::value;
    launched = p.G <= 4 ? LaunchRows<D, kBF16, true>(p, rows, n, sm_count, ws, stream)
                        : LaunchRows<D, kBF16, false>(p, rows, n, sm_count, ws, stream);
  });
  return launched;
}

bool TmaDecodeAttention(AttnParams p, int sm_count, AttnWorkspace& ws, cudaStream_t stream) {
  if (!Qualifies(p)) return false;
  p.evict_first = StreamEvictFirst();
  bool launched = false;
  Dispatch16Bit(p, [&](auto d, auto bf16) {
    constexpr int D = decltype(d)::value;
    constexpr bool kBF16 = decltype(bf16)::value;
    launched = p.G <= 4 ? Launch<D, kBF16, true>(p, sm_count, ws, stream)
                        : Launch<D, kBF16, false>(p, sm_count, ws, stream);
  });
  return launched;
}

}  // namespace needle::cuda
