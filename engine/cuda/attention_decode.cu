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

#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_util.cuh"

namespace needle::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
// Splits per KV head: at most kMaxSplits (the merge's weight table in shared memory), each at
// least kMinKeys keys (four steps of a block at head_dim 128): 64 measured slower at 4K.
constexpr int kMaxSplits = 256;
constexpr int64_t kMinKeys = 128;
// Blocks per multiprocessor the split aims at (one wave): enough loads in flight for the memory
// system, and few splits for the merge. Capped by the kernel's occupancy.
constexpr int kBlocksPerSm = 4;

// Where the merged result goes and the arrival counters; used when p.splits > 1.
struct MergeArgs {
  float* out;             // [heads, D]
  float* lse;             // [heads] or nullptr
  unsigned int* counter;  // [kv_heads], zero between calls
};

template <int D, int kG, int U, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks) DecodeKernel(AttnParams p, MergeArgs mg) {
  constexpr int LPK = D / 8, KPS = 32 / LPK, NG = kWarps * KPS;
  __shared__ float sm_acc[NG][kG][D];
  __shared__ float sm_m[NG][kG], sm_l[NG][kG];
  __shared__ bool last;
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
        const int64_t row = PagedRow(p.table, kk + u, p.B, p.kv_heads, h);
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
#pragma unroll
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
  // The block's result: out/lse with one split, else its partial.
  for (int i = threadIdx.x; i < p.G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    float M = -INFINITY;
    for (int j = 0; j < NG; ++j) M = fmaxf(M, sm_m[j][g]);
    float L = 0.f, O = 0.f;
    if (M != -INFINITY) {
      for (int j = 0; j < NG; ++j) {
        const float w = __expf(sm_m[j][g] - M);
        L += sm_l[j][g] * w;
        O += sm_acc[j][g][d] * w;
      }
    }
    const int64_t row = h * p.G + g;
    const float o = L > 0.f ? O / L : 0.f;
    p.out[(static_cast<int64_t>(split) * p.heads + row) * D + d] = o;
    if (d == 0) {
      if (p.splits > 1) {
        p.m[split * p.heads + row] = M;
        p.l[split * p.heads + row] = L;
      } else if (p.m != nullptr) {
        p.m[row] = L > 0.f ? M + logf(L) : -INFINITY;
      }
    }
  }
  if (p.splits == 1) return;

  // Arrival: every thread's partial writes are fenced before thread 0 counts the block in.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(mg.counter + h, 1u) == static_cast<unsigned>(p.splits - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();

  // The merge, in the last block of h. Shared memory reused (every thread is past its reads of
  // sm_acc): w [kMaxSplits][kG] weights, then red [kSlots][kG][D] per-slot sums.
  constexpr int CPL = D / 4;            // float4 columns of a row
  constexpr int SPW = 32 / CPL;         // split lanes per warp
  constexpr int kSlots = kWarps * SPW;  // threads summing one column, over splits
  static_assert(kMaxSplits * kG + kSlots * kG * D <= NG * kG * D, "merge scratch too small");
  float* w = &sm_acc[0][0][0];
  float* red = w + kMaxSplits * kG;
  const int S = p.splits;
  // Warp g % 4 finds M_g and L_g (lanes over splits, then a shuffle reduction), then the weights.
  for (int g = warp; g < p.G; g += kWarps) {
    const int64_t row = h * p.G + g;
    float M = -INFINITY, L = 0.f;
    for (int s = lane; s < S; s += 32) {
      const float ms = __ldcg(p.m + s * p.heads + row), ls = __ldcg(p.l + s * p.heads + row);
      if (ls > 0.f) {
        const float mn = fmaxf(M, ms);
        L = L * __expf(M - mn) + ls * __expf(ms - mn);
        M = mn;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float Mo = __shfl_xor_sync(0xffffffffu, M, off);
      const float Lo = __shfl_xor_sync(0xffffffffu, L, off);
      const float mn = fmaxf(M, Mo);
      if (mn != -INFINITY) {
        L = L * __expf(M - mn) + Lo * __expf(Mo - mn);
        M = mn;
      }
    }
    for (int s = lane; s < S; s += 32) {
      const float ms = __ldcg(p.m + s * p.heads + row), ls = __ldcg(p.l + s * p.heads + row);
      w[s * kG + g] = ls > 0.f ? ls * __expf(ms - M) / L : 0.f;
    }
    if (lane == 0) {
      sm_m[0][g] = M;
      sm_l[0][g] = L;
    }
  }
  __syncthreads();
  // Thread (slot, column c): sum over splits s = slot, slot + kSlots, ... of w_s o_s[4c .. 4c+3].
  {
    const int c = lane % CPL, slot = warp * SPW + lane / CPL;
    float4 a[kG];
#pragma unroll
    for (int g = 0; g < kG; ++g) a[g] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int s = slot; s < S; s += kSlots) {
      const float4* po = reinterpret_cast<const float4*>(p.out + (s * p.heads + h * p.G) * D) + c;
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        if (g < p.G) {
          const float4 x = __ldcg(po + g * CPL);
          const float ws = w[s * kG + g];
          a[g].x += ws * x.x;
          a[g].y += ws * x.y;
          a[g].z += ws * x.z;
          a[g].w += ws * x.w;
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kG; ++g) reinterpret_cast<float4*>(red + (slot * kG + g) * D)[c] = a[g];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    float o = 0.f;
#pragma unroll
    for (int slot = 0; slot < kSlots; ++slot) o += red[(slot * kG + g) * D + d];
    const int64_t row = h * p.G + g;
    mg.out[row * D + d] = sm_l[0][g] > 0.f ? o : 0.f;
    if (d == 0 && mg.lse != nullptr)
      mg.lse[row] = sm_l[0][g] > 0.f ? sm_m[0][g] + logf(sm_l[0][g]) : -INFINITY;
  }
  if (threadIdx.x == 0) mg.counter[h] = 0;  // every block of h has arrived: ready for the next call
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

bool DecodeAttention(AttnParams p, int sm_count, AttnWorkspace& ws, cudaStream_t stream) {
  if (p.T != 1 || p.dtype == DType::kF32 || (p.D != 64 && p.D != 128) || p.G > 8) return false;
  const int64_t k_lo = p.window > 0 ? std::max<int64_t>(0, p.pos0 - p.window + 1) : 0;
  const int64_t keys = p.n_keys - k_lo;
  const int64_t target = static_cast<int64_t>(BlocksPerSm(p)) * sm_count / p.kv_heads;
  const int64_t splits = std::clamp<int64_t>(
      target, 1, std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, keys / kMinKeys)));
  p.splits = static_cast<int>(splits);
  p.keys_per_split = (keys + splits - 1) / splits;
  MergeArgs mg{p.out, p.m, nullptr};
  if (splits > 1) {
    float* buf = ws.partials.Get<float>(static_cast<size_t>(splits * p.heads * (p.D + 2)));
    p.out = buf;  // partials [splits][heads][D], then m and l [splits][heads]
    p.m = buf + splits * p.heads * p.D;
    p.l = p.m + splits * p.heads;
    mg.counter = ws.counters.GetZeroed<unsigned int>(static_cast<size_t>(p.kv_heads), stream);
  }
  const dim3 grid(static_cast<unsigned>(p.kv_heads), static_cast<unsigned>(splits));
  KernelFor(p)<<<grid, kThreads, 0, stream>>>(p, mg);
  NEEDLE_CUDA_CHECK_LAUNCH();
  return true;
}

}  // namespace needle::cuda
