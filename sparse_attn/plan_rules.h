// The decode selection's rules as plain functions over arrays, for an executor that plans a step
// where the KV lies (PlanExecutor::PlanDecode: the GPU's kernels, engine/cuda/device_plan.cu,
// run them one element per thread) and for the CPU reference executor of the tests. They restate
// SparseAttention::SelectBlocks and Retain (sparse_attention.cc) for the case without
// preselection, re-ranking or remapping; tests/test_executor_plan.cc checks that plans made with
// them equal the planner's own.
//
// One row (a KV head, or the layer's one row with SelectMode::kLayer) of a step:
//   1. keep: the row's retained blocks (ascending) that are still Context blocks
//      [init_b, ctx_end), at most R (SparseConfig::retained());
//   2. the best topk - |keep| of the shortlist's other entries, ranked higher score first, then
//      lower block id (Better);
//   3. the selection: both, ascending.
// Retention for the next step: each selected block's mass (the softmax mass the step's query
// heads of its group put on it, BlockMass), the blocks by descending mass (ties: lower position in
// the selection first, as a stable sort), each followed by its successor, the first R distinct of
// them, ascending.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define NEEDLE_HD __host__ __device__
#else
#define NEEDLE_HD
#endif

namespace needle::plan_rules {

// Whether (score sa, block ia) ranks before (sb, ib).
NEEDLE_HD inline bool Better(float sa, int32_t ia, float sb, int32_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

NEEDLE_HD inline bool Holds(const int32_t* a, int n, int32_t x) {
  for (int i = 0; i < n; ++i)
    if (a[i] == x) return true;
  return false;
}

// Step 1: keep[0, returned) from ret[0, n) (ascending).
NEEDLE_HD inline int KeepRetained(const int32_t* ret, int n, int32_t init_b, int32_t ctx_end, int R,
                                  int32_t* keep) {
  int k = 0;
  for (int i = 0; i < n && k < R; ++i)
    if (ret[i] >= init_b && ret[i] < ctx_end) keep[k++] = ret[i];
  return k;
}

// Step 2: shortlist entry i (sc, id [n], distinct ids, any order) is chosen when the value
// returned is below topk - nk: its rank among the entries not kept; -1 for a kept entry.
// kept(j): whether entry j's block is kept (Holds(keep, nk, id[j]); a kernel marks them once,
// one entry per thread, instead of every thread walking keep for every entry).
template <typename Kept>
NEEDLE_HD inline int ShortlistRankOf(const float* sc, const int32_t* id, int n, Kept&& kept,
                                     int i) {
  if (kept(i)) return -1;
  int r = 0;
  for (int j = 0; j < n; ++j)
    if (j != i && Better(sc[j], id[j], sc[i], id[i]) && !kept(j)) ++r;
  return r;
}
NEEDLE_HD inline int ShortlistRank(const float* sc, const int32_t* id, int n, const int32_t* keep,
                                   int nk, int i) {
  return ShortlistRankOf(
      sc, id, n, [&](int j) { return Holds(keep, nk, id[j]); }, i);
}

// Step 3: x's place in the ascending order of the distinct a[0, n).
NEEDLE_HD inline int CountBelow(const int32_t* a, int n, int32_t x) {
  int c = 0;
  for (int i = 0; i < n; ++i) c += a[i] < x ? 1 : 0;
  return c;
}

// A block's mass from its softmax sums st [G][2] = {m, l} (AttendBlocks' / cuda::BlockStats'
// stats) and the lse [G] of its group's query heads over everything the step attended.
NEEDLE_HD inline float BlockMass(const float* st, const float* lse, int G) {
  float mass = 0.f;
  for (int g = 0; g < G; ++g)
    if (st[2 * g + 1] > 0.f && lse[g] != -INFINITY)
      mass += st[2 * g + 1] * expf(st[2 * g] - lse[g]);
  return mass;
}

// (The GPU's decode kernel sums each 32-key tile of a block: the block's mass is then the sum of
// its tiles' BlockMass, added in tile order.)

// One block's softmax sums st [G][2] from its T tiles' tiles [T][G][2] (as the decode kernel
// writes them): m the tiles' largest m, l the sum of their l scaled to it, in tile order; a block
// whose tiles are all empty (l 0) gets {-inf, 0}. Its BlockMass then equals the sum of the
// tiles' within f32 rounding. (The hybrid's GPU share, whose masses the host computes.)
NEEDLE_HD inline void BlockFromTiles(const float* tiles, int T, int G, float* st) {
  for (int g = 0; g < G; ++g) {
    float m = -INFINITY, l = 0.f;
    for (int t = 0; t < T; ++t)
      if (tiles[(t * G + g) * 2 + 1] > 0.f) m = fmaxf(m, tiles[(t * G + g) * 2]);
    if (m != -INFINITY)
      for (int t = 0; t < T; ++t) {
        const float* x = tiles + (t * G + g) * 2;
        if (x[1] > 0.f) l += x[1] * expf(x[0] - m);
      }
    st[2 * g] = m, st[2 * g + 1] = l;
  }
}

// Entry i's place in the descending order of mass [n] (ties: lower index first).
NEEDLE_HD inline int MassRank(const float* mass, int n, int i) {
  int r = 0;
  for (int j = 0; j < n; ++j) r += (mass[j] > mass[i] || (mass[j] == mass[i] && j < i)) ? 1 : 0;
  return r;
}

NEEDLE_HD inline void SortAscending(int32_t* a, int n) {
  for (int i = 1; i < n; ++i)
    for (int j = i; j > 0 && a[j - 1] > a[j]; --j) {
      const int32_t t = a[j];
      a[j] = a[j - 1], a[j - 1] = t;
    }
}

// Retention's candidates: c = 0, 1, ... 2n - 1 is block blocks[order[c / 2]] (order: indices by
// MassRank) for even c, its successor for odd c.
NEEDLE_HD inline int32_t MassCandidate(const int32_t* blocks, const int* order, int c) {
  return blocks[order[c >> 1]] + (c & 1);
}
// Whether candidate c of cand [2n] (cand[c] = MassCandidate(blocks, order, c)) is the first of
// its value.
NEEDLE_HD inline bool FirstCandidate(const int32_t* cand, int c) {
  for (int e = 0; e < c; ++e)
    if (cand[e] == cand[c]) return false;
  return true;
}
// Retention: the first R distinct candidates into out (ascending); returns their count. (Walked
// in order, a candidate is the first of its value when out does not hold it yet; a kernel marks
// the first candidates in parallel with FirstCandidate instead and places each by the count of
// marks before it: tests/test_executor_plan.cc checks that the two agree.)
NEEDLE_HD inline int KeepByMass(const int32_t* blocks, const int* order, int n, int R,
                                int32_t* out) {
  int k = 0;
  for (int c = 0; c < 2 * n && k < R; ++c) {
    const int32_t b = MassCandidate(blocks, order, c);
    if (!Holds(out, k, b)) out[k++] = b;
  }
  SortAscending(out, k);
  return k;
}

}  // namespace needle::plan_rules
