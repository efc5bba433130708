// Tensor-core causal prefill attention (FlashAttention-2 style) over the block KV cache; see
// attention_tc.h.
//
// Block = 64 query positions of one query head, 4 warps of 16 rows each. K/V tiles of 64 keys
// (one run of rows of one cache block: block_size % 64 == 0) are copied into shared memory with
// cp.async, two stages deep, rows padded by 8 elements so that the fragment reads hit 32 distinct
// banks. Per tile and warp: S[16 x 64] = Q K^T with mma.m16n8k16 (Q as A fragments held in
// registers for the whole block, K rows read as B fragments), online softmax on S in registers
// (each thread owns 2 rows x 16 keys; row max and sum over the 4 threads of a quad), then
// O[16 x D] += P V with P's accumulators re-packed as A fragments and V read with ldmatrix.trans.
// GQA: query head h reads KV head h / G; the G blocks of a KV head share its tiles through L2.
#include "engine/cuda/attention_tc.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "engine/cuda/attention_wgmma.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_util.cuh"
#include "engine/cuda/mma.cuh"
#include "engine/cuda/smem_async.cuh"

namespace needle::cuda {
namespace {

constexpr int kRows = 64;  // query positions per block (16 per warp)
constexpr int kKeys = 64;  // keys per tile
constexpr int kPad = 8;    // elements of padding per shared-memory row

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  cuda::CpAsync16(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), gmem, true);
}

// Copies keys [kb, kb + 64) of KV head h (K and V) into ks/vs [64][D + kPad]. The 64 keys are
// consecutive rows of one cache block. Keys past the end of the cache are not read (their scores
// are masked, and their V rows zeroed so that 0 * garbage cannot make NaN).
template <int D>
__device__ __forceinline__ void LoadTile(const AttnParams& p, int64_t h, int64_t kb, int64_t n_keys,
                                         uint16_t* ks, uint16_t* vs) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const int64_t row0 = PagedRow(p.table + h * p.table_head_stride, kb, p.B, p.kv_heads, h);
  const uint16_t* karena = static_cast<const uint16_t*>(p.k);
  const uint16_t* varena = static_cast<const uint16_t*>(p.v);
  for (int i = threadIdx.x; i < kKeys * kChunks; i += blockDim.x) {
    const int j = i / kChunks, c = i % kChunks;
    uint16_t* kd = ks + j * (D + kPad) + c * 8;
    uint16_t* vd = vs + j * (D + kPad) + c * 8;
    if (kb + j < n_keys) {
      const size_t off = static_cast<size_t>((row0 + j) * D + c * 8);
      CpAsync16(kd, karena + off);
      CpAsync16(vd, varena + off);
    } else {
      *reinterpret_cast<uint4*>(kd) = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(vd) = make_uint4(0, 0, 0, 0);
    }
  }
}

template <int D, bool kBF16>
__global__ void __launch_bounds__(128) TcKernel(AttnParams p) {
  extern __shared__ __align__(16) uint16_t smem_tc[];
  constexpr int LD = D + kPad;
  // Stage s: K at smem_tc + 2 s * kKeys * LD, V right after it.
  auto ks = [&](int s) { return smem_tc + 2 * s * kKeys * LD; };
  auto vs = [&](int s) { return smem_tc + (2 * s + 1) * kKeys * LD; };
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int64_t hq = blockIdx.y, h = hq / p.G;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t n_keys = p.n_keys;
  const float scale_log2 = p.scale * 1.4426950408889634f;  // scores in the log2 domain

  // Q fragments of the warp's 16 rows (rows t0 + 16 warp + g and + 8), all of D: qa[kc][4].
  const int64_t ta = t0 + warp * 16 + g, tb = ta + 8;
  uint32_t qa[D / 16][4];
  {
    const float* qra = p.q + (ta * p.heads + hq) * D;
    const float* qrb = p.q + (tb * p.heads + hq) * D;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      const int d = kc * 16 + tig * 2;
      float2 a0 = ta < p.T ? *reinterpret_cast<const float2*>(qra + d) : make_float2(0.f, 0.f);
      float2 a1 = tb < p.T ? *reinterpret_cast<const float2*>(qrb + d) : make_float2(0.f, 0.f);
      float2 a2 = ta < p.T ? *reinterpret_cast<const float2*>(qra + d + 8) : make_float2(0.f, 0.f);
      float2 a3 = tb < p.T ? *reinterpret_cast<const float2*>(qrb + d + 8) : make_float2(0.f, 0.f);
      qa[kc][0] = Pack<kBF16>(a0.x, a0.y);
      qa[kc][1] = Pack<kBF16>(a1.x, a1.y);
      qa[kc][2] = Pack<kBF16>(a2.x, a2.y);
      qa[kc][3] = Pack<kBF16>(a3.x, a3.y);
    }
  }
  const int64_t qpos_a = p.pos0 + ta, qpos_b = p.pos0 + tb;

  // Keys of the block: [k_begin, k_end), tiles aligned to 64 (cache blocks are multiples of 64).
  const int64_t t_last = min(p.T, t0 + kRows) - 1;
  const int64_t q_first = p.pos0 + t0, q_last = p.pos0 + t_last;
  int64_t k_begin = p.window > 0 ? max(static_cast<int64_t>(0), q_first - p.window + 1) : 0;
  k_begin = k_begin / kKeys * kKeys;
  const int64_t k_end = min(q_last + 1, n_keys);

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;

  int stage = 0;
  if (k_begin < k_end) LoadTile<D>(p, h, k_begin, n_keys, ks(0), vs(0));
  CpAsyncCommit();
  for (int64_t kb = k_begin; kb < k_end; kb += kKeys) {
    if (kb + kKeys < k_end) LoadTile<D>(p, h, kb + kKeys, n_keys, ks(stage ^ 1), vs(stage ^ 1));
    CpAsyncCommit();
    CpAsyncWait<1>();
    __syncthreads();
    const uint16_t* K = ks(stage);
    const uint16_t* V = vs(stage);

    // S = Q K^T for 8 key groups of 8: s[n][0..1] row a keys n*8 + 2 tig + {0,1}, [2..3] row b.
    float s[kKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      const uint16_t* kr = K + (n * 8 + g) * LD + tig * 2;
#pragma unroll
      for (int kc = 0; kc < D / 16; ++kc) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(kr + kc * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(kr + kc * 16 + 8);
        Mma<kBF16>(s[n], qa[kc], b0, b1);
      }
    }
    // Mask (causal, window, cache end), scale into the log2 domain, row max.
    const bool edge = kb + kKeys - 1 > q_first || (p.window > 0 && kb < q_last - p.window + 1) ||
                      kb + kKeys > n_keys;
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * scale_log2;
        if (edge) {
          const int64_t kp = kb + n * 8 + tig * 2 + (e & 1);
          const int64_t qp = e < 2 ? qpos_a : qpos_b;
          if (kp > qp || kp >= n_keys || (p.window > 0 && kp <= qp - p.window)) x = -INFINITY;
        }
        s[n][e] = x;
      }
      mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
    }
    const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
    // Rows with nothing visible yet keep m = -inf; use 0 as the reference so exp2 gives 0.
    const float ref_a = mn_a == -INFINITY ? 0.f : mn_a, ref_b = mn_b == -INFINITY ? 0.f : mn_b;
    const float al_a = exp2f(m_a - ref_a), al_b = exp2f(m_b - ref_b);
    m_a = mn_a;
    m_b = mn_b;
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
      s[n][0] = exp2f(s[n][0] - ref_a);
      s[n][1] = exp2f(s[n][1] - ref_a);
      s[n][2] = exp2f(s[n][2] - ref_b);
      s[n][3] = exp2f(s[n][3] - ref_b);
      sum_a += s[n][0] + s[n][1];
      sum_b += s[n][2] + s[n][3];
    }
    l_a = l_a * al_a + sum_a;  // per-thread partial sums; reduced over the quad at the end
    l_b = l_b * al_b + sum_b;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[i][0] *= al_a;
      o[i][1] *= al_a;
      o[i][2] *= al_b;
      o[i][3] *= al_b;
    }
    // O += P V: 16 keys per step; P's accumulators of key groups 2kc, 2kc+1 are the A fragment.
#pragma unroll
    for (int kc = 0; kc < kKeys / 16; ++kc) {
      uint32_t pa[4];
      pa[0] = Pack<kBF16>(s[2 * kc][0], s[2 * kc][1]);
      pa[1] = Pack<kBF16>(s[2 * kc][2], s[2 * kc][3]);
      pa[2] = Pack<kBF16>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
      pa[3] = Pack<kBF16>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
      // ldmatrix.x4.trans: matrices (keys kc*16 + 0..7 | 8..15) x (d0 .. d0+7 | d0+8 .. d0+15).
      const int mi = lane >> 3, r = lane & 7;
      const uint16_t* vrow = V + (kc * 16 + r + (mi & 1) * 8) * LD + (mi >> 1) * 8;
#pragma unroll
      for (int d0 = 0; d0 < D; d0 += 16) {
        uint32_t b[4];
        const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(vrow + d0));
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                     : "r"(addr));
        Mma<kBF16>(o[d0 / 8], pa, b[0], b[1]);
        Mma<kBF16>(o[d0 / 8 + 1], pa, b[2], b[3]);
      }
    }
    __syncthreads();  // the tile is consumed before the next iteration overwrites this stage
    stage ^= 1;
  }
  CpAsyncWait<0>();

#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
  }
  // Rows a (accumulators 0, 1) and b (2, 3): normalised output and the natural-log lse.
  auto write_row = [&](int64_t t, float l, float m, int c) {
    if (t >= p.T) return;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float* orow = p.out + (t * p.heads + hq) * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<float2*>(orow + i * 8 + tig * 2) =
          make_float2(o[i][c] * inv, o[i][c + 1] * inv);
    if (p.m != nullptr && tig == 0)
      p.m[t * p.heads + hq] = l > 0.f ? (m + log2f(l)) * 0.6931471805599453f : -INFINITY;
  };
  write_row(ta, l_a, m_a, 0);
  write_row(tb, l_b, m_b, 2);
}

constexpr size_t SmemBytes(int D) { return 4 * static_cast<size_t>(kKeys) * (D + kPad) * 2; }

template <int D, bool kBF16>
void Launch(const AttnParams& p, cudaStream_t stream) {
  OptInSharedMemory<TcKernel<D, kBF16>>(SmemBytes(D));
  const dim3 grid(static_cast<unsigned>((p.T + kRows - 1) / kRows), static_cast<unsigned>(p.heads));
  TcKernel<D, kBF16><<<grid, 128, SmemBytes(D), stream>>>(p);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

// NEEDLE_CUDA_ATTN_TC: "0" turns the tensor-core kernels off, "mma" keeps the mma.sync kernel
// on Hopper too (for comparisons and tests); read per call, so that a test can switch it.
const char* Choice() {
  const char* e = std::getenv("NEEDLE_CUDA_ATTN_TC");
  return e == nullptr ? "" : e;
}

}  // namespace

bool TensorCoreAttention(const AttnParams& p, cudaStream_t stream) {
  const char* choice = Choice();
  if (std::strcmp(choice, "0") == 0 || p.T < kTcMinQueries) return false;
  if (std::strcmp(choice, "mma") != 0 && ComputeCapability() == 90 && WgmmaAttention(p, stream))
    return true;
  if (p.B % kKeys != 0 || p.heads % p.kv_heads != 0) return false;
  return Dispatch16Bit(
      p, [&](auto d, auto bf16) { Launch<decltype(d)::value, decltype(bf16)::value>(p, stream); });
}

}  // namespace needle::cuda
