// The device plan's selection and retention of one row (device_plan.h SelectFromShortlist,
// RetainByMass), as device functions of one thread block: their own kernels run them, and the
// fused top-k (block_select.cu TopBlocksSelect) runs the selection once its block has written
// the row's shortlist, after the retention of the layer's previous step where it is pending.
#pragma once

#include <cstdint>

#include "engine/cuda/device_plan.h"
#include "sparse_attn/plan_rules.h"

namespace needle::cuda {

// pr::CountBelow by a whole warp (every lane gets it): the entries of list [n] below b, 32
// compared a ballot.
__device__ inline int WarpCountBelow(const int32_t* list, int n, int32_t b, int lane) {
  int j = 0;
  for (int o0 = 0; o0 < n; o0 += 32) {
    const int o = o0 + lane;
    j += __popc(__ballot_sync(0xffffffffu, o < n && list[o] < b));
  }
  return j;
}

// SelectRow's last part where one ring table serves every head: selected block i (warp i %
// warps) at its place in ascending order (pr::CountBelow, 32 entries a ballot), its ring slot
// read meanwhile; the lanes write the heads h0 .. h1 of the row (a thread an entry walking all
// of them: 1.5 us of the fused top-k's kernel; 0.85 so).
__device__ inline void WriteSelection(const SelectArgs& a, const int32_t* s_sel, int h0, int h1) {
  const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
  const int warps = static_cast<int>(blockDim.x >> 5);
  for (int i = warp; i < a.n_sel; i += warps) {
    const int32_t b = s_sel[i];
    const int32_t slot = a.table[b];
    const int j = WarpCountBelow(s_sel, a.n_sel, b, lane);
    for (int h = h0 + lane; h < h1; h += 32) {
      a.sel[h * a.n_sel + j] = b;
      a.view[h * a.view_stride + a.view_at + j] = slot;
    }
  }
}

// The same with a table per head (SelectArgs::table_head_stride) and the CPU's holes
// (SelectArgs::cpu): the selection in ascending order first (into s_sorted [n_sel], shared),
// then warp h - h0 writes head h's entries, 32 at a time, and its holes' positions by a ballot.
__device__ inline void SplitSelection(const SelectArgs& a, const int32_t* s_sel, int32_t* s_sorted,
                                      int h0, int h1) {
  const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
  const int warps = static_cast<int>(blockDim.x >> 5);
  for (int i = warp; i < a.n_sel; i += warps) {
    const int32_t b = s_sel[i];
    const int j = WarpCountBelow(s_sel, a.n_sel, b, lane);
    if (lane == 0) s_sorted[j] = b;
  }
  __syncthreads();
  for (int h = h0 + warp; h < h1; h += warps) {
    const int32_t* table = a.table + h * a.table_head_stride;
    int holes = 0;
    for (int j0 = 0; j0 < a.n_sel; j0 += 32) {
      const int j = j0 + lane;
      const bool on = j < a.n_sel;
      const int32_t b = on ? s_sorted[j] : 0;
      const int32_t slot = on ? table[b] : 0;
      if (on) {
        a.sel[h * a.n_sel + j] = b;
        a.view[h * a.view_stride + a.view_at + j] = slot;
      }
      const unsigned m = __ballot_sync(0xffffffffu, on && slot < 0);
      if (a.cpu != nullptr && on && slot < 0)
        a.cpu[h * a.n_sel + holes + __popc(m & ((1u << lane) - 1u))] = j;
      holes += __popc(m);
    }
    if (a.cpu_count != nullptr && lane == 0) a.cpu_count[h] = holes;
  }
}

// Row blockIdx.x. vals, ids [rows][want]: the shortlist, its first k entries valid (written by
// this block, or by an earlier kernel). smem: SelectSharedBytes(k, R) of shared memory: the
// shortlist's scores and ids [k], the kept blocks [R], the selection [R + k] (kept first, then
// each chosen entry at nk + its rank), the retention [R], each shortlist entry's mark (kept or
// not) [k]. (Without the marks every thread walked the kept blocks for every entry, ~k x R
// shared reads in a row: 22 us a layer at k = 64, R = 16.) in_smem: the shortlist's scores and
// ids are already there (the fused top-k wrote them), vals and ids not read.
__device__ inline void SelectRow(const SelectArgs& a, const float* vals, const int32_t* ids,
                                 int64_t want, int k, int32_t* smem, bool in_smem = false) {
  namespace pr = plan_rules;
  const int R = a.R, nt = static_cast<int>(blockDim.x);
  float* s_sc = reinterpret_cast<float*>(smem);
  int32_t* s_id = smem + k;
  int32_t* s_keep = s_id + k;
  int32_t* s_sel = s_keep + R;
  int32_t* s_ret = s_sel + R + k;
  int32_t* s_kept = s_ret + R;
  __shared__ int s_nk, s_rc;
  const int r = blockIdx.x, h0 = a.by_layer ? 0 : r, h1 = a.by_layer ? a.kv_heads : r + 1;
  // (Every global read first, in parallel: thread 0's serial part reads shared memory only.)
  if (!in_smem)
    for (int i = threadIdx.x; i < k; i += nt)
      s_sc[i] = vals[r * want + i], s_id[i] = ids[r * want + i];
  for (int i = threadIdx.x; i < R; i += nt) s_ret[i] = a.ret[h0 * R + i];
  if (threadIdx.x == 0) s_rc = a.rcount[h0];
  __syncthreads();
  const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
  const int warps = nt / 32;  // (blockDim.x: a multiple of 32)
  if (warp == 0) {
    // pr::KeepRetained by one ballot: the retained blocks inside the Context, in order, the
    // first R of them (thread 0 walking them took 0.83 us of the fused top-k's kernel in a 1M
    // step on the H100; 0.29 so).
    const int rc = s_rc < 0 ? 0 : s_rc;
    if (rc <= 32) {
      const int32_t b = lane < rc ? s_ret[lane] : 0;
      const bool in = lane < rc && b >= a.init_b && b < a.ctx_end;
      const unsigned m = __ballot_sync(0xffffffffu, in);
      const int at = __popc(m & ((1u << lane) - 1u));
      if (in && at < R) s_keep[at] = b, s_sel[at] = b;
      if (lane == 0) s_nk = min(__popc(m), R);
    } else if (lane == 0) {
      s_nk = pr::KeepRetained(s_ret, rc, a.init_b, a.ctx_end, R, s_keep);
      for (int i = 0; i < s_nk; ++i) s_sel[i] = s_keep[i];
    }
  }
  __syncthreads();
  const int nk = s_nk;
  for (int i = threadIdx.x; i < k; i += nt) s_kept[i] = pr::Holds(s_keep, nk, s_id[i]);
  __syncthreads();
  // pr::ShortlistRankOf of entry i by warp i % warps, its lanes comparing 32 entries at a time
  // (a thread walking all k entries for its own took 3.3 us of the fused top-k's kernel at k =
  // 40; 1.1 so).
  for (int i = warp; i < k; i += warps) {
    if (s_kept[i] != 0) continue;  // (the warp's: a kept entry has no rank)
    const float si = s_sc[i];
    const int32_t di = s_id[i];
    int rank = 0;
    for (int j0 = 0; j0 < k; j0 += 32) {
      const int j = j0 + lane;
      const bool above = j < k && j != i && pr::Better(s_sc[j], s_id[j], si, di) && s_kept[j] == 0;
      rank += __popc(__ballot_sync(0xffffffffu, above));
    }
    if (lane == 0 && rank < a.topk - nk) s_sel[nk + rank] = di;
  }
  __syncthreads();
  if (a.table_head_stride != 0 || a.cpu != nullptr) {
    SplitSelection(a, s_sel, s_kept, h0, h1);
  } else {
    WriteSelection(a, s_sel, h0, h1);
  }
  for (int h = h0 + static_cast<int>(threadIdx.x); h < h1; h += nt) {
    a.kcount[h] = s_rc < 0 ? -1 : nk;
    for (int i = 0; i < nk; ++i) a.kept[h * R + i] = s_keep[i];
  }
}

// The device plan's retention of row blockIdx.x (device_plan.h RetainByMass). smem:
// RetainSharedBytes(a) of shared memory: the masses [n], the order [n], the blocks [n], the
// retention [R], the candidates and their marks [2n] each, the masses of the blocks' parts [kv
// heads of the row][n] [tiles]. Every step one item per thread: the parts' masses (the loads and
// exponentials of one part: one thread walking a block's tiles and heads took 14 us a layer), each
// block's mass (its parts added in tile order), the ranks, then plan_rules::KeepByMass in parallel:
// each candidate marked when it is the first of its value and placed by the count of marks before
// it (thread 0 walking the candidates alone took 7 us a layer).
__device__ inline void RetainRow(const RetainArgs& a, int32_t* smem) {
  namespace pr = plan_rules;
  const int n = a.n, tiles = a.tiles, G = a.G, R = a.R, nt = static_cast<int>(blockDim.x);
  const int32_t* sel = a.sel;
  const float *stats = a.stats, *lse = a.lse;
  float* s_mass = reinterpret_cast<float*>(smem);
  int* s_order = smem + n;
  int32_t* s_blocks = smem + 2 * n;
  int32_t* s_out = smem + 3 * n;
  int32_t* s_cand = s_out + R;
  int* s_first = s_cand + 2 * n;
  float* s_part = reinterpret_cast<float*>(s_first + 2 * n);
  __shared__ int s_cnt;
  const int r = blockIdx.x, h0 = a.by_layer ? 0 : r, h1 = a.by_layer ? a.kv_heads : r + 1;
  const int parts = (h1 - h0) * n * tiles;
  for (int i = threadIdx.x; i < parts; i += nt) {
    const int h = h0 + i / (n * tiles), jt = i % (n * tiles);  // jt = j * tiles + tile
    s_part[i] =
        pr::BlockMass(stats + static_cast<int64_t>(h * n * tiles + jt) * G * 2, lse + h * G, G);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += nt) {
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
  for (int j = threadIdx.x; j < n; j += nt) s_order[pr::MassRank(s_mass, n, j)] = j;
  __syncthreads();
  for (int c = threadIdx.x; c < 2 * n; c += nt) s_cand[c] = pr::MassCandidate(s_blocks, s_order, c);
  __syncthreads();
  for (int c = threadIdx.x; c < 2 * n; c += nt) s_first[c] = pr::FirstCandidate(s_cand, c);
  __syncthreads();
  for (int c = threadIdx.x; c < 2 * n; c += nt) {
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
  for (int i = threadIdx.x; i < cnt; i += nt) {
    const int at = pr::CountBelow(s_out, cnt, s_out[i]);  // ascending
    for (int h = h0; h < h1; ++h) a.ret[h * R + at] = s_out[i];
  }
  for (int h = h0 + static_cast<int>(threadIdx.x); h < h1; h += nt) a.rcount[h] = cnt;
}

}  // namespace needle::cuda
