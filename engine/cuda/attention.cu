// Tiled online-softmax attention over the block KV cache; see attention.h.
//
// Block (qtile, kv_head, split): rows = QT query positions x G query heads of the KV head, 4 warps,
// each warp owning rows w, w + 4, ... For every tile of 32 keys (K and V converted to f32 in
// shared memory, rows padded by one float against bank conflicts) lane j scores key j for each of
// its warp's rows, the warp updates the row's running max and sum, and the output accumulator
// (D/32 values per lane) is rescaled and accumulated with the tile's probabilities broadcast by
// shuffles. Keys outside the causal/sliding-window range of a row score -inf.
#include "engine/cuda/attention.h"

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/attention_decode_tma.h"
#include "engine/cuda/attention_params.h"
#include "engine/cuda/attention_tc.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "engine/base/error.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_util.cuh"

namespace needle::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kKeys = 32;     // keys per tile = lanes
constexpr int kMaxRows = 16;  // rows (query position x head) per block
constexpr int kMaxD = 256;

using Params = AttnParams;

// K and V rows of keys [kb, kb + n) of KV head h into shared memory as f32 ([kKeys][ld], rows
// past n zeroed): one element per thread and step, any dtype and head_dim.
__device__ __forceinline__ void LoadTile(const Params& p, int64_t h, int64_t kb, int n, float* ks,
                                         float* vs, int ld) {
  const int D = static_cast<int>(p.D);
  for (int i = threadIdx.x; i < kKeys * D; i += blockDim.x) {
    const int j = i / D, d = i % D;
    float kv_k = 0.f, kv_v = 0.f;
    if (j < n) {
      const int64_t pos = kb + j;
      const int64_t row = PagedRow(p.table + h * p.table_head_stride, pos, p.B, p.kv_heads, h);
      kv_k = LoadAs(p.k, row * p.D + d, p.dtype);
      kv_v = LoadAs(p.v, row * p.D + d, p.dtype);
    }
    ks[j * ld + d] = kv_k;
    vs[j * ld + d] = kv_v;
  }
}

// The same for 16-bit caches with head_dim % 8 == 0: 16-byte loads of 8 elements (rows start
// 16-byte aligned: cudaMalloc'd arenas, row stride D * 2 bytes).
__device__ __forceinline__ void LoadTile16(const Params& p, int64_t h, int64_t kb, int n, float* ks,
                                           float* vs, int ld) {
  const int D = static_cast<int>(p.D), chunks = D / 8;
  for (int i = threadIdx.x; i < kKeys * chunks; i += blockDim.x) {
    const int j = i / chunks, c = i % chunks;
    float kf[8], vf[8];
    if (j < n) {
      const int64_t pos = kb + j;
      const int64_t row = PagedRow(p.table + h * p.table_head_stride, pos, p.B, p.kv_heads, h);
      const size_t off = static_cast<size_t>(row * p.D + c * 8);
      Unpack8(*reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.k) + off), p.dtype,
              kf);
      Unpack8(*reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.v) + off), p.dtype,
              vf);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) kf[e] = vf[e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      ks[j * ld + c * 8 + e] = kf[e];
      vs[j * ld + c * 8 + e] = vf[e];
    }
  }
}

template <int DPL>  // D / 32 rounded up: values of the output row each lane accumulates
__global__ void __launch_bounds__(kWarps * 32) AttnKernel(Params p) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(p.D);
  const int ld = D + 1;
  float* ks = smem;             // [kKeys][ld]
  float* vs = ks + kKeys * ld;  // [kKeys][ld]
  float* qs = vs + kKeys * ld;  // [kMaxRows][D]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t h = blockIdx.y;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * p.QT;
  const int rows = p.QT * p.G;
  const int split = blockIdx.z;

  // Rows: r = tq * G + g -> query position t0 + tq, head h * G + g.
  for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
    const int r = i / D, d = i % D;
    const int64_t t = t0 + r / p.G;
    qs[i] = t < p.T ? p.q[(t * p.heads + h * p.G + r % p.G) * p.D + d] * p.scale : 0.f;
  }
  // Key range of the block: visible to some row, within this split.
  const int64_t t_last = min(p.T, t0 + p.QT) - 1;
  const int64_t q_first = p.pos0 + t0, q_last = p.pos0 + t_last;
  int64_t k_begin = p.window > 0 ? max(static_cast<int64_t>(0), q_first - p.window + 1) : 0;
  int64_t k_end = min(q_last + 1, p.n_keys);
  if (p.splits > 1) {
    k_begin = max(k_begin, split * p.keys_per_split);
    k_end = min(k_end, (split + 1) * p.keys_per_split);
  }

  constexpr int RPW = kMaxRows / kWarps;
  float acc[RPW][DPL], mrow[RPW], lrow[RPW];
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    mrow[i] = -INFINITY;
    lrow[i] = 0.f;
#pragma unroll
    for (int j = 0; j < DPL; ++j) acc[i][j] = 0.f;
  }
  __syncthreads();

  for (int64_t kb = k_begin; kb < k_end; kb += kKeys) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kKeys), k_end - kb));
    if (p.dtype != DType::kF32 && (D & 7) == 0) {
      LoadTile16(p, h, kb, n, ks, vs, ld);
    } else {
      LoadTile(p, h, kb, n, ks, vs, ld);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int r = warp + i * kWarps;
      if (r >= rows) break;
      const int64_t t = t0 + r / p.G;
      if (t >= p.T) break;
      const int64_t qpos = p.pos0 + t;
      const int64_t kpos = kb + lane;
      float s = -INFINITY;
      if (lane < n && kpos <= qpos && (p.window <= 0 || kpos > qpos - p.window)) {
        s = 0.f;
        const float* qr = qs + r * D;
        const float* kr = ks + lane * ld;
        for (int d = 0; d < D; ++d) s += qr[d] * kr[d];
      }
      float mx = s;
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(mrow[i], mx);
      if (m_new == -INFINITY) continue;  // nothing visible yet for this row
      const float alpha = __expf(mrow[i] - m_new);
      const float pj = s == -INFINITY ? 0.f : __expf(s - m_new);
      float sum = pj;
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      lrow[i] = lrow[i] * alpha + sum;
      mrow[i] = m_new;
#pragma unroll
      for (int j = 0; j < DPL; ++j) acc[i][j] *= alpha;
      for (int jj = 0; jj < n; ++jj) {
        const float pb = __shfl_sync(0xffffffffu, pj, jj);
        const float* vr = vs + jj * ld;
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
          const int d = lane + 32 * j;
          if (d < D) acc[i][j] += pb * vr[d];
        }
      }
    }
    __syncthreads();
  }
  // Write: normalised rows (+ lse), or partials (normalised o, m, l) for the merge.
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int r = warp + i * kWarps;
    if (r >= rows) break;
    const int64_t t = t0 + r / p.G;
    if (t >= p.T) break;
    const int64_t hq = h * p.G + r % p.G;
    const int64_t row = t * p.heads + hq;
    const float inv = lrow[i] > 0.f ? 1.f / lrow[i] : 0.f;
    float* o = p.out + (static_cast<int64_t>(split) * p.T * p.heads + row) * p.D;
#pragma unroll
    for (int j = 0; j < DPL; ++j) {
      const int d = lane + 32 * j;
      if (d < D) o[d] = acc[i][j] * inv;
    }
    if (lane == 0) {
      if (p.splits > 1) {
        p.m[split * p.T * p.heads + row] = mrow[i];
        p.l[split * p.T * p.heads + row] = lrow[i];
      } else if (p.m != nullptr) {
        p.m[row] = lrow[i] > 0.f ? mrow[i] + logf(lrow[i]) : -INFINITY;
      }
    }
  }
}

// out[row] = sum_s w_s o_s / sum_s w_s with w_s = l_s exp(m_s - M); one block per row.
__global__ void MergeKernel(const float* po, const float* pm, const float* pl, int splits,
                            int64_t rows, int64_t D, float* out, float* lse) {
  const int64_t row = blockIdx.x;
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, pm[s * rows + row]);
  float L = 0.f;
  for (int s = 0; s < splits; ++s)
    if (pl[s * rows + row] > 0.f) L += pl[s * rows + row] * __expf(pm[s * rows + row] - M);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float l = pl[s * rows + row];
      if (l > 0.f) acc += l * __expf(pm[s * rows + row] - M) * po[(s * rows + row) * D + d];
    }
    out[row * D + d] = L > 0.f ? acc / L : 0.f;
  }
  if (threadIdx.x == 0 && lse != nullptr) lse[row] = L > 0.f ? M + logf(L) : -INFINITY;
}

size_t SmemBytes(int64_t D) {
  return static_cast<size_t>(2 * kKeys * (D + 1) + kMaxRows * D) * sizeof(float);
}

template <int DPL>
void Launch(const Params& p, dim3 grid, cudaStream_t stream) {
  // The shared memory of the largest head_dim this instantiation serves.
  OptInSharedMemory<AttnKernel<DPL>>(SmemBytes(32 * DPL));
  AttnKernel<DPL><<<grid, kWarps * 32, SmemBytes(p.D), stream>>>(p);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

// NEEDLE_CUDA_ATTN_DECODE=0: the tile kernel instead of the decode kernels (for comparisons);
// read per call, so that a test can switch it.
bool DecodeEnabled() {
  const char* e = std::getenv("NEEDLE_CUDA_ATTN_DECODE");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

}  // namespace

bool AttentionRows(const TmaDecodeRow* rows, int64_t n, const KVLayerView& kv, const AttnArgs& a,
                   int sm_count, AttnWorkspace& ws, cudaStream_t stream) {
  if (!DecodeEnabled() || !TmaDecodeChosen() || a.T != 1 || n < 1 || a.head_dim > kMaxD)
    return false;
  // (TmaDecodeAttentionRows refuses what the kernel does not take: f32 caches, other head_dims.)
  return TmaDecodeAttentionRows(MakeAttnParams(rows[0].q, kv, a, rows[0].out, nullptr), rows,
                                static_cast<int>(n), sm_count, ws, stream);
}

bool Attention(const float* q, const KVLayerView& kv, const AttnArgs& a, float* out, float* lse,
               int sm_count, AttnWorkspace& ws, cudaStream_t stream, const int64_t* dpos) {
  if (a.head_dim > kMaxD)
    Fail("CUDA attention: head_dim ", a.head_dim, " is above the supported ", kMaxD);
  if (kv.dtype != DType::kF32 && kv.dtype != DType::kF16 && kv.dtype != DType::kBF16)
    Fail("CUDA attention: KV cache type ", DTypeName(kv.dtype), " is not supported on the GPU ",
         "(use --kv-type f32, f16 or bf16)");
  if (a.T == 0) return false;
  Params p = MakeAttnParams(q, kv, a, out, lse);
  if (TensorCoreAttention(p, stream)) return false;  // prompts over 16-bit caches
  if (dpos != nullptr && a.T == 1 && DecodeEnabled()) {
    p.dpos = dpos;
    if (DecodeAttention(p, sm_count, ws, stream)) return true;
    p.dpos = nullptr;
  }
  if (DecodeEnabled() && DecodeAttention(p, sm_count, ws, stream)) return false;  // T == 1
  if (p.G > kMaxRows)
    Fail("CUDA attention: ", p.G, " query heads per KV head (max ", kMaxRows, ")");
  p.QT = std::max(1, kMaxRows / p.G);
  const int64_t qtiles = (a.T + p.QT - 1) / p.QT;
  // Split the keys when the query tiles alone leave the GPU under-filled (4 blocks per SM;
  // shared memory allows ~5 at head_dim 128), each split keeping at least 256 keys so that the
  // merge stays cheap.
  const int64_t blocks = qtiles * a.kv_heads, target = 4 * static_cast<int64_t>(sm_count);
  int64_t splits = 1;
  if (blocks < target)
    splits = std::clamp<int64_t>(target / blocks, 1, std::max<int64_t>(1, p.n_keys / 256));
  p.keys_per_split = (p.n_keys + splits - 1) / splits;
  UsePartials(p, splits, ws);
  const dim3 grid(static_cast<unsigned>(qtiles), static_cast<unsigned>(a.kv_heads),
                  static_cast<unsigned>(splits));
  const int64_t dpl = (a.head_dim + 31) / 32;
  if (dpl <= 2)
    Launch<2>(p, grid, stream);
  else if (dpl <= 4)
    Launch<4>(p, grid, stream);
  else
    Launch<8>(p, grid, stream);
  if (splits > 1) {
    const int64_t rows = a.T * a.heads;
    MergeKernel<<<static_cast<unsigned>(rows), 128, 0, stream>>>(p.out, p.m, p.l, p.splits, rows,
                                                                 a.head_dim, out, lse);
    NEEDLE_CUDA_CHECK_LAUNCH();
  }
  return false;
}

bool AttentionTileStats(const float* q, const KVLayerView& kv, const AttnArgs& a, float* out,
                        float* lse, int sm_count, AttnWorkspace& ws, cudaStream_t stream,
                        int64_t key0, int64_t key_end, float* stats) {
  if (a.T != 1 || key0 % 32 != 0 || key_end % 32 != 0 || key_end < key0 || !DecodeEnabled() ||
      !TmaDecodeChosen())
    return false;
  Params p = MakeAttnParams(q, kv, a, out, lse);
  p.tile_stats = stats;
  p.stats_key0 = key0;
  p.stats_key_end = key_end;
  return TmaDecodeAttention(p, sm_count, ws, stream);
}

}  // namespace needle::cuda
