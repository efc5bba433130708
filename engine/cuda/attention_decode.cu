// Flash-decoding over 16-bit caches; see attention_decode.h.
//
// Block (kv_head h, split): the G query heads of h against keys [k_lo + split * kps, ... + kps).
// A key row (D * 2 bytes) is read by LPK = D / 8 lanes, 16 bytes each, so a warp reads
// KPS = 32 / LPK keys per load and each lane keeps U keys' K and V loads in flight, twice over:
// the next step's rows are loaded before this step's are used (software pipelining), because the
// loop is latency-bound, not bandwidth-bound, at one wave of blocks. Each group of LPK lanes runs
// its own online softmax over the keys it reads, for the kG query heads of the KV head; the NG
// groups are merged through shared memory at the end.
//
// With one split the block writes out/lse. With several it writes its partial (o / l, m, l) to
// the workspace, and the last block of h to arrive (one atomic counter per KV head) merges the
// splits of h: out = sum_s w_s o_s with w_s = l_s exp(m_s - M) / L, the algebra of
// engine/attention/partial.h.
#include "engine/cuda/attention_decode.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "engine/cuda/attention_decode_tma.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/decode_merge.cuh"
#include "engine/cuda/device_util.cuh"

namespace needle::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
// Splits per KV head: at most kMaxDecodeSplits (decode_merge.cuh), each at least kMinKeys keys
// (four steps of a block at head_dim 128): 64 measured slower at 4K.
constexpr int64_t kMinKeys = 128;
// Blocks per multiprocessor the split aims at (one wave): enough loads in flight for the memory
// system, and few splits for the merge. Capped by the kernel's occupancy.
constexpr int kBlocksPerSm = 4;

template <int D, int kG, int U, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks) DecodeKernel(AttnParams p, MergeArgs mg) {
  constexpr int LPK = D / 8, KPS = 32 / LPK, NG = kWarps * KPS;
  __shared__ float sm_acc[NG][kG][D];
  __shared__ float sm_m[NG][kG], sm_l[NG][kG];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int li = lane % LPK, gi = warp * KPS + lane / LPK;
  const int64_t h = blockIdx.x;
  const int split = blockIdx.y;
  const bool bf16 = p.dtype == DType::kBF16;

  float q[kG][8];
#pragma unroll
  for (int g = 0; g < kG; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e)
      q[g][e] = g < p.G ? p.q[(h * p.G + g) * D + li * 8 + e] * p.scale : 0.f;
  // Keys of the split: the visible range [k_lo, qpos] cut into p.splits pieces.
  const int64_t qpos = p.pos0;  // T == 1
  const int64_t k_lo = p.window > 0 ? max(static_cast<int64_t>(0), qpos - p.window + 1) : 0;
  const int64_t k_begin = k_lo + split * p.keys_per_split;
  const int64_t k_end = min(min(qpos + 1, p.n_keys), k_begin + p.keys_per_split);

  float m[kG], l[kG], acc[kG][8];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }
  // Rows kk .. kk+U-1 into registers; zeros (and no load) past k_end.
  auto load = [&](int64_t kk, uint4(&kr)[U], uint4(&vr)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (kk + u < k_end) {
        const int64_t row = PagedRow(p.table + h * p.table_head_stride, kk + u, p.B, p.kv_heads, h);
        const size_t off = static_cast<size_t>(row * D + li * 8);
        kr[u] = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.k) + off));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.v) + off));
      } else {
        kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  // Every lane of a warp runs the same steps (the shuffles below need the whole warp): the
  // warp's loop counter is its first key; its groups' keys follow, U each.
  constexpr int64_t kStride = static_cast<int64_t>(NG) * U;
  const int64_t lane_off = static_cast<int64_t>(lane / LPK) * U;
  uint4 kr[U], vr[U];
  load(k_begin + static_cast<int64_t>(warp) * KPS * U + lane_off, kr, vr);
  for (int64_t kw = k_begin + static_cast<int64_t>(warp) * KPS * U; kw < k_end; kw += kStride) {
    const int64_t kk = kw + lane_off;
    uint4 kn[U], vn[U];
    load(kk + kStride, kn, vn);  // the next step's rows fly while these are used
    float s[U][kG];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      Unpack8(kr[u], bf16 ? DType::kBF16 : DType::kF16, kf);
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        float x = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) x += q[g][e] * kf[e];
#pragma unroll
        for (int off = LPK / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
        s[u][g] = kk + u < k_end ? x : -INFINITY;
      }
    }
    float alpha[kG];
    bool same = true;  // no running maximum of this lane moved
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      float mx = s[0][g];
#pragma unroll
      for (int u = 1; u < U; ++u) mx = fmaxf(mx, s[u][g]);
      const float mn = fmaxf(m[g], mx);
      // -inf while the group has seen no key: exponents then use 0 and give 0.
      alpha[g] = __expf(m[g] - (mn == -INFINITY ? 0.f : mn));
      same = same && mn == m[g] && mn != -INFINITY;
      m[g] = mn;
    }
    // Once the maxima settle (most steps of a long split) no lane of the warp rescales.
    if (!__all_sync(0xffffffffu, same)) {
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        l[g] *= alpha[g];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] *= alpha[g];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[8];
      Unpack8(vr[u], bf16 ? DType::kBF16 : DType::kF16, vf);
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        const float pu = __expf(s[u][g] - (m[g] == -INFINITY ? 0.f : m[g]));  // 0 past the end
        l[g] += pu;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] += pu * vf[e];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      kr[u] = kn[u];
      vr[u] = vn[u];
    }
  }
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e) sm_acc[gi][g][li * 8 + e] = acc[g][e];
    if (li == 0) {
      sm_m[gi][g] = m[g];
      sm_l[gi][g] = l[g];
    }
  }
  __syncthreads();
  WriteBlockResult<kThreads, kG, D>(p, h, split, NG, &sm_acc[0][0][0], &sm_m[0][0], &sm_l[0][0]);
  if (p.splits == 1) return;
  MergeIfLast<kWarps, kG, D>(p, mg, h);
}

using KernelFn = void (*)(AttnParams, MergeArgs);
// U keys per lane and step: 4, 2 with 8 query heads (registers). The minimum blocks per SM pin
// the register count at what 3 (2) blocks of 128 threads fit: U = 2, or more resident blocks,
// measured slower on the H100 from 16K keys up and no faster below (bench/RESULTS.md).
template <int D>
KernelFn KernelFor(int G) {
  if (G <= 1) return DecodeKernel<D, 1, 4, 3>;
  if (G <= 2) return DecodeKernel<D, 2, 4, 3>;
  if (G <= 4) return DecodeKernel<D, 4, 4, 3>;
  return DecodeKernel<D, 8, 2, 2>;
}
KernelFn KernelFor(const AttnParams& p) {
  return p.D == 64 ? KernelFor<64>(p.G) : KernelFor<128>(p.G);
}

// Blocks per multiprocessor the split aims at: kBlocksPerSm, or fewer if they do not fit.
int BlocksPerSm(const AttnParams& p) {
  static int cached[2][9] = {};  // [D == 128][G], asked once per kernel
  int& n = cached[p.D == 128][p.G];
  if (n == 0) {
    int fit = 0;
    NEEDLE_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, KernelFor(p), kThreads, 0));
    n = std::clamp(fit, 1, kBlocksPerSm);
  }
  return n;
}

}  // namespace

bool TmaDecodeChosen() {
  const char* choice = std::getenv("NEEDLE_CUDA_ATTN_DECODE");
  return choice == nullptr || std::strcmp(choice, "simt") != 0;
}

bool DecodeAttention(AttnParams p, int sm_count, AttnWorkspace& ws, cudaStream_t stream) {
  if (p.T != 1 || p.dtype == DType::kF32 || (p.D != 64 && p.D != 128) || p.G > 8) return false;
  if (TmaDecodeChosen() && TmaDecodeAttention(p, sm_count, ws, stream)) return true;
  if (p.dpos != nullptr) return false;  // only the TMA kernel reads a replayed step's position
  const int64_t k_lo = p.window > 0 ? std::max<int64_t>(0, p.pos0 - p.window + 1) : 0;
  const int64_t keys = p.n_keys - k_lo;
  const int64_t target = static_cast<int64_t>(BlocksPerSm(p)) * sm_count / p.kv_heads;
  const int64_t splits = std::clamp<int64_t>(
      target, 1, std::min<int64_t>(kMaxDecodeSplits, std::max<int64_t>(1, keys / kMinKeys)));
  p.keys_per_split = (keys + splits - 1) / splits;
  const MergeArgs mg = UseSplits(p, splits, ws, stream);
  const dim3 grid(static_cast<unsigned>(p.kv_heads), static_cast<unsigned>(splits));
  KernelFor(p)<<<grid, kThreads, 0, stream>>>(p, mg);
  NEEDLE_CUDA_CHECK_LAUNCH();
  return true;
}

}  // namespace needle::cuda
