#include "engine/cuda/device_plan.h"

#include "engine/base/error.h"
#include "engine/cuda/cuda_check.h"
#include "sparse_attn/plan_rules.h"

namespace needle::cuda {
namespace {

namespace pr = plan_rules;

constexpr int kThreads = 128;

// Block r: row r. Shared: the shortlist's scores and ids [k], the kept blocks [R], the selection
// [R + k] (kept first, then each chosen entry at nk + its rank), the retention [R], each
// shortlist entry's mark (kept or not) [k]. (Without the marks every thread walked the kept
// blocks for every entry, ~k x R shared reads in a row: 22 us a layer at k = 64, R = 16.)
__global__ void __launch_bounds__(kThreads)
    SelectKernel(const float* vals, const int32_t* ids, int64_t want, int k, const int32_t* ret,
                 const int32_t* rcount, int R, int32_t init_b, int32_t ctx_end, int topk,
                 int kv_heads, bool by_layer, const int32_t* table, int n_sel, int32_t* sel,
                 int32_t* kept, int32_t* kcount, int32_t* view, int64_t view_stride,
                 int64_t view_at) {
  extern __shared__ int32_t smem[];
  float* s_sc = reinterpret_cast<float*>(smem);
  int32_t* s_id = smem + k;
  int32_t* s_keep = s_id + k;
  int32_t* s_sel = s_keep + R;
  int32_t* s_ret = s_sel + R + k;
  int32_t* s_kept = s_ret + R;
  __shared__ int s_nk, s_rc;
  const int r = blockIdx.x, h0 = by_layer ? 0 : r, h1 = by_layer ? kv_heads : r + 1;
  // (Every global read first, in parallel: thread 0's serial part reads shared memory only.)
  for (int i = threadIdx.x; i < k; i += kThreads)
    s_sc[i] = vals[r * want + i], s_id[i] = ids[r * want + i];
  for (int i = threadIdx.x; i < R; i += kThreads) s_ret[i] = ret[h0 * R + i];
  if (threadIdx.x == 0) s_rc = rcount[h0];
  __syncthreads();
  if (threadIdx.x == 0) {
    s_nk = s_rc < 0 ? 0 : pr::KeepRetained(s_ret, s_rc, init_b, ctx_end, R, s_keep);
    for (int i = 0; i < s_nk; ++i) s_sel[i] = s_keep[i];
  }
  __syncthreads();
  const int nk = s_nk;
  for (int i = threadIdx.x; i < k; i += kThreads) s_kept[i] = pr::Holds(s_keep, nk, s_id[i]);
  __syncthreads();
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const int rank = pr::ShortlistRankOf(
        s_sc, s_id, k, [&](int j) { return s_kept[j] != 0; }, i);
    if (rank >= 0 && rank < topk - nk) s_sel[nk + rank] = s_id[i];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n_sel; i += kThreads) {
    const int32_t b = s_sel[i];
    const int j = pr::CountBelow(s_sel, n_sel, b);
    for (int h = h0; h < h1; ++h) {
      sel[h * n_sel + j] = b;
      view[h * view_stride + view_at + j] = table[b];
    }
  }
  for (int h = h0 + static_cast<int>(threadIdx.x); h < h1; h += kThreads) {
    kcount[h] = s_rc < 0 ? -1 : nk;
    for (int i = 0; i < nk; ++i) kept[h * R + i] = s_keep[i];
  }
}

// Block r: row r. Shared: the masses [n], the order [n], the blocks [n], the retention [R], the
// candidates and their marks [2n] each, the masses of the blocks' parts [kv heads of the row][n]
// [tiles]. Every step one item per thread: the parts' masses (the loads and exponentials of one
// part: one thread walking a block's tiles and heads took 14 us a layer), each block's mass (its
// parts added in tile order), the ranks, then plan_rules::KeepByMass in
// parallel: each candidate marked when it is the first of its value and placed by the count of
// marks before it (thread 0 walking the candidates alone took 7 us a layer).
__global__ void __launch_bounds__(kThreads)
    RetainKernel(const int32_t* sel, int n, const float* stats, int tiles, const float* lse,
                 int kv_heads, int G, bool by_layer, int R, int32_t* ret, int32_t* rcount) {
  extern __shared__ int32_t smem[];
  float* s_mass = reinterpret_cast<float*>(smem);
  int* s_order = smem + n;
  int32_t* s_blocks = smem + 2 * n;
  int32_t* s_out = smem + 3 * n;
  int32_t* s_cand = s_out + R;
  int* s_first = s_cand + 2 * n;
  float* s_part = reinterpret_cast<float*>(s_first + 2 * n);
  __shared__ int s_cnt;
  const int r = blockIdx.x, h0 = by_layer ? 0 : r, h1 = by_layer ? kv_heads : r + 1;
  const int parts = (h1 - h0) * n * tiles;
  for (int i = threadIdx.x; i < parts; i += kThreads) {
    const int h = h0 + i / (n * tiles), jt = i % (n * tiles);  // jt = j * tiles + tile
    s_part[i] =
        pr::BlockMass(stats + static_cast<int64_t>(h * n * tiles + jt) * G * 2, lse + h * G, G);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += kThreads) {
    s_blocks[j] = sel[h0 * n + j];
    float m = 0.f;
    for (int h = 0; h < h1 - h0; ++h) {
      float mh = 0.f;  // (the parts in tile order)
      for (int t = 0; t < tiles; ++t) mh += s_part[(h * n + j) * tiles + t];
      m = h == 0 ? mh : m + mh;
    }
    s_mass[j] = m;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += kThreads) s_order[pr::MassRank(s_mass, n, j)] = j;
  __syncthreads();
  for (int c = threadIdx.x; c < 2 * n; c += kThreads)
    s_cand[c] = pr::MassCandidate(s_blocks, s_order, c);
  __syncthreads();
  for (int c = threadIdx.x; c < 2 * n; c += kThreads) s_first[c] = pr::FirstCandidate(s_cand, c);
  __syncthreads();
  for (int c = threadIdx.x; c < 2 * n; c += kThreads) {
    if (s_first[c] == 0) continue;
    int at = 0;
    for (int e = 0; e < c; ++e) at += s_first[e];
    if (at < R) s_out[at] = s_cand[c];
  }
  if (threadIdx.x == 0) {
    int total = 0;
    for (int c = 0; c < 2 * n; ++c) total += s_first[c];
    s_cnt = total < R ? total : R;
  }
  __syncthreads();
  const int cnt = s_cnt;
  for (int i = threadIdx.x; i < cnt; i += kThreads) {
    const int at = pr::CountBelow(s_out, cnt, s_out[i]);  // ascending
    for (int h = h0; h < h1; ++h) ret[h * R + at] = s_out[i];
  }
  for (int h = h0 + static_cast<int>(threadIdx.x); h < h1; h += kThreads) rcount[h] = cnt;
}

}  // namespace

void SelectFromShortlist(const float* vals, const int32_t* ids, int64_t want, int64_t k,
                         const int32_t* ret, const int32_t* rcount, int64_t R, int64_t init_b,
                         int64_t ctx_end, int64_t topk, int64_t kv_heads, bool by_layer,
                         const int32_t* table, int64_t n_sel, int32_t* sel, int32_t* kept,
                         int32_t* kcount, int32_t* view, int64_t view_stride, int64_t view_at,
                         cudaStream_t stream) {
  NEEDLE_CHECK(k <= want && want <= kMaxDeviceShortlist && n_sel <= topk && R <= topk &&
               view_at + n_sel <= view_stride);
  if (n_sel <= 0) return;
  const size_t smem = static_cast<size_t>(2 * k + R + R + k + R + k) * 4;
  SelectKernel<<<static_cast<unsigned>(by_layer ? 1 : kv_heads), kThreads, smem, stream>>>(
      vals, ids, want, static_cast<int>(k), ret, rcount, static_cast<int>(R),
      static_cast<int32_t>(init_b), static_cast<int32_t>(ctx_end), static_cast<int>(topk),
      static_cast<int>(kv_heads), by_layer, table, static_cast<int>(n_sel), sel, kept, kcount, view,
      view_stride, view_at);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void RetainByMass(const int32_t* sel, int64_t n, const float* stats, int64_t tiles,
                  const float* lse, int64_t kv_heads, int64_t G, bool by_layer, int64_t R,
                  int32_t* ret, int32_t* rcount, cudaStream_t stream) {
  NEEDLE_CHECK(n <= kMaxDeviceShortlist && tiles >= 1);
  if (n <= 0 || R <= 0) return;
  const int64_t rows_heads = by_layer ? kv_heads : 1;
  const size_t smem = static_cast<size_t>(3 * n + R + 4 * n + rows_heads * n * tiles) * 4;
  NEEDLE_CHECK(smem <= 48 * 1024);
  RetainKernel<<<static_cast<unsigned>(by_layer ? 1 : kv_heads), kThreads, smem, stream>>>(
      sel, static_cast<int>(n), stats, static_cast<int>(tiles), lse, static_cast<int>(kv_heads),
      static_cast<int>(G), by_layer, static_cast<int>(R), ret, rcount);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

}  // namespace needle::cuda
