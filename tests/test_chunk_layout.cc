// A sparse prefill chunk as the hybrid engine's GPU attends it (engine/cuda/chunk_layout.h): the
// block table over the staging layer plus the copied and rotated head blocks give the same
// attention as the CPU's spans (AppendQuerySpans, the query rotated per span), here on the host
// with the reference kernels (CI); the GPU's copy kernel (GatherRotate) against the host's copy,
// and the chunks' scoring queries combined on the GPU (GroupChunkQueries) against the host's.
//
// Tolerances: both sides compute f32 softmax attention over the same keys; they differ in where
// the remap's rotation goes (the query per span, or the key), one f32 rotation each: a few 2^-24
// relative per product, so outputs and log-sum-exps agree within 1e-5 of their scale (a key
// missing, doubled or rotated by the wrong delta moves them by far more). The GPU's rotation
// rounds each product and sum on its own as RotateRows does: f32 bits equal; a bf16 key may
// round differently only where the f32 value sits on a rounding boundary, so within one bf16 ulp.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <vector>

#include "engine/cpu/ops.h"
#include "engine/cuda/chunk_layout.h"
#include "kvcache/kv_cache.h"
#include "sparse_attn/plan.h"
#include "sparse_attn/scoring.h"
#include "tests/gpu_test_util.h"
#include "tests/test_util.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/block_select.h"
#include "engine/cuda/context_gather.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#endif

namespace needle {
namespace {

// What GatherRotate does, on a host cache (layer 0).
void CopyOnHost(KVCache& c, const ChunkLayout& l) {
  const int64_t B = c.shape().block_size, D = c.shape().head_dim, Hk = c.shape().kv_heads;
  const size_t es = DTypeSize(c.shape().dtype), hb = static_cast<size_t>(B * D) * es;
  std::vector<float> row(static_cast<size_t>(D)), out(static_cast<size_t>(D));
  for (size_t i = 0; i < l.src.size(); ++i)
    for (bool v : {false, true}) {
      const uint8_t* s = c.BlockData(0, v, 0) + static_cast<size_t>(l.src[i]) * hb;
      uint8_t* d = c.BlockData(0, v, 0) + static_cast<size_t>(l.dst[i]) * hb;
      if (v || l.rot[i] < 0) {
        std::memcpy(d, s, hb);
        continue;
      }
      for (int64_t t = 0; t < B; ++t) {
        for (int64_t j = 0; j < D; ++j)
          row[j] = LoadAsF32(c.shape().dtype, s, static_cast<size_t>(t * D + j));
        RotateRows(row.data(), 1, D, l.rot_table.data() + l.rot[i] * D, out.data());
        for (int64_t j = 0; j < D; ++j) StoreFromF32(c.shape().dtype, d, t * D + j, out[j]);
      }
    }
  (void)Hk;
}

struct Case {
  int64_t ie, lb, c0, T, k;
  bool remap, same;  // same: every KV head selects the same blocks
};

TEST(ChunkLayout, EqualsSpanAttentionOnTheHost) {
  const int64_t B = 16, D = 32, Hk = 3, G = 2, H = Hk * G, P = 40 * B;
  ThreadingContext tc(1);
  std::vector<float> inv_freq(static_cast<size_t>(D / 2));
  for (int64_t i = 0; i < D / 2; ++i)
    inv_freq[i] = static_cast<float>(std::pow(10000.0, -2.0 * static_cast<double>(i) / D));
  const std::vector<Case> cases = {
      {16, 16, 0, 40, 0, false, true},     // the prompt's first chunk, inside Initial
      {16, 16, 5, 7, 0, true, true},       // a chunk ending inside Initial
      {32, 32, 40, 30, 0, true, true},     // no Context yet
      {16, 320, 330, 50, 5, false, true},  // layer selection
      {16, 320, 330, 50, 5, false, false}, {16, 320, 330, 50, 5, true, true},
      {32, 400, 400, 64, 7, true, false},  {32, 480, 600, 40, 1, true, false},
  };
  for (const Case& cs : cases) {
    const int64_t X = ChunkExtraSlots(cs.ie, 8, B), nb = P / B;
    KVCache cache(KVCacheShape(1, Hk, D, P + X * B, B, DType::kF32));
    cache.Write(0, 0, P, test::RandomVector(static_cast<size_t>(P * Hk * D), 3, 1.f).data(),
                test::RandomVector(static_cast<size_t>(P * Hk * D), 4).data());
    cache.SetSize(P);
    // Selections: k distinct Context blocks per head, ascending.
    std::mt19937 rng(static_cast<uint32_t>(cs.k * 7 + cs.lb));
    std::vector<std::vector<int32_t>> sel(static_cast<size_t>(Hk));
    for (int64_t h = 0; h < Hk; ++h) {
      if (h > 0 && cs.same) {
        sel[h] = sel[0];
        continue;
      }
      std::vector<int32_t> all;
      for (int64_t b = cs.ie / B; b < cs.lb / B; ++b) all.push_back(static_cast<int32_t>(b));
      std::shuffle(all.begin(), all.end(), rng);
      sel[h].assign(all.begin(), all.begin() + cs.k);
      std::sort(sel[h].begin(), sel[h].end());
    }
    const float* rel = cs.remap ? inv_freq.data() : nullptr;
    AttnArgs a;
    a.T = cs.T, a.pos0 = cs.c0, a.heads = H, a.kv_heads = Hk, a.head_dim = D;
    a.scale = 1.f / std::sqrt(static_cast<float>(D));
    const std::vector<float> q = test::RandomVector(static_cast<size_t>(cs.T * H * D), 5, 1.f);
    // The CPU's spans.
    AttnSpans spans;
    spans.offsets.assign(1, 0);
    std::map<int64_t, int32_t> rows;
    for (int64_t t = 0; t < cs.T; ++t)
      for (int64_t h = 0; h < Hk; ++h)
        AppendQuerySpans(cs.ie, sel[h], B, cs.lb, cs.c0 + t, rel, D, &spans, &rows);
    std::vector<float> want(q.size()), want_lse(static_cast<size_t>(cs.T * H));
    KVLayerView kv = cache.Layer(0);
    kv.n_tokens = cs.c0 + cs.T;
    ref::Attention(q.data(), kv, a, &spans, want.data(), want_lse.data(), tc);
    // The GPU's layout, its copies made on the host.
    ChunkLayout l;
    LayoutChunk(
        PlanExecutor::Chunk{cs.ie, cs.lb, &sel, rel}, cs.c0, cs.T, B, Hk, D,
        [&](int64_t b) { return cache.SlotOf(0, b); }, nb, &l);
    for (int32_t d : l.dst) ASSERT_GE(d, nb * Hk) << "a copy overwrites a prompt block";
    if (!cs.remap && cs.same) {
      EXPECT_TRUE(l.src.empty()) << "nothing to copy";
    }
    CopyOnHost(cache, l);
    KVLayerView v = cache.Layer(0);
    v.table = l.table.data();
    AttnArgs a2 = a;
    a2.pos0 = l.pos0;
    v.n_tokens = a2.pos0 + a2.T;
    ASSERT_EQ(static_cast<int64_t>(l.table.size()), (v.n_tokens + B - 1) / B);
    std::vector<float> got(q.size()), got_lse(want_lse.size());
    ref::Attention(q.data(), v, a2, nullptr, got.data(), got_lse.data(), tc);
    const std::string what = "ie " + std::to_string(cs.ie) + " lb " + std::to_string(cs.lb) +
                             " c0 " + std::to_string(cs.c0) + " k " + std::to_string(cs.k) +
                             " remap " + std::to_string(cs.remap) + " same " +
                             std::to_string(cs.same);
    for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-5) << what << " " << i;
    for (size_t i = 0; i < want_lse.size(); ++i)
      ASSERT_NEAR(got_lse[i], want_lse[i], 1e-5 * std::max(1.f, std::fabs(want_lse[i])))
          << what << " lse " << i;
  }
}

#ifdef NEEDLE_HAVE_CUDA
// The kernel's copies equal the host's: f32 bits, bf16 within one ulp.
TEST(ChunkLayout, GatherRotateEqualsHost) {
  NEEDLE_REQUIRE_GPU(gpu);
  const int64_t B = 16, D = 64, Hk = 2, P = 20 * B;
  std::vector<float> inv_freq(static_cast<size_t>(D / 2));
  for (int64_t i = 0; i < D / 2; ++i)
    inv_freq[i] = static_cast<float>(std::pow(500000.0, -2.0 * static_cast<double>(i) / D));
  for (DType t : {DType::kF32, DType::kBF16}) {
    const int64_t X = ChunkExtraSlots(32, 4, B), nb = P / B;
    KVCache cache(KVCacheShape(1, Hk, D, P + X * B, B, t));
    cache.Write(0, 0, P, test::RandomVector(static_cast<size_t>(P * Hk * D), 8, 2.f).data(),
                test::RandomVector(static_cast<size_t>(P * Hk * D), 9).data());
    const std::vector<std::vector<int32_t>> sel = {{3, 7, 9, 12}, {2, 7, 10, 11}};
    ChunkLayout l;
    LayoutChunk(
        PlanExecutor::Chunk{32, 14 * B, &sel, inv_freq.data()}, 15 * B, 20, B, Hk, D,
        [&](int64_t b) { return cache.SlotOf(0, b); }, nb, &l);
    ASSERT_FALSE(l.src.empty());
    const size_t bytes = cache.BlockBytes() * static_cast<size_t>(nb + X);
    cudaStream_t s = CudaBackendStream(*gpu);
    uint8_t *dk = nullptr, *dv = nullptr;
    int32_t* ints = nullptr;
    float* rows = nullptr;
    const size_t n = l.src.size();
    NEEDLE_CUDA_CHECK(cudaMalloc(&dk, bytes));
    NEEDLE_CUDA_CHECK(cudaMalloc(&dv, bytes));
    NEEDLE_CUDA_CHECK(cudaMalloc(&ints, 3 * n * sizeof(int32_t)));
    NEEDLE_CUDA_CHECK(cudaMalloc(&rows, l.rot_table.size() * sizeof(float)));
    NEEDLE_CUDA_CHECK(cudaMemcpy(dk, cache.BlockData(0, false, 0), bytes, cudaMemcpyHostToDevice));
    NEEDLE_CUDA_CHECK(cudaMemcpy(dv, cache.BlockData(0, true, 0), bytes, cudaMemcpyHostToDevice));
    NEEDLE_CUDA_CHECK(cudaMemcpy(ints, l.src.data(), n * 4, cudaMemcpyHostToDevice));
    NEEDLE_CUDA_CHECK(cudaMemcpy(ints + n, l.dst.data(), n * 4, cudaMemcpyHostToDevice));
    NEEDLE_CUDA_CHECK(cudaMemcpy(ints + 2 * n, l.rot.data(), n * 4, cudaMemcpyHostToDevice));
    NEEDLE_CUDA_CHECK(
        cudaMemcpy(rows, l.rot_table.data(), l.rot_table.size() * 4, cudaMemcpyHostToDevice));
    cuda::GatherRotate(dk, dv, t, ints, ints + n, ints + 2 * n, rows, static_cast<int64_t>(n), B, D,
                       s);
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<uint8_t> gk(bytes), gv(bytes);
    NEEDLE_CUDA_CHECK(cudaMemcpy(gk.data(), dk, bytes, cudaMemcpyDeviceToHost));
    NEEDLE_CUDA_CHECK(cudaMemcpy(gv.data(), dv, bytes, cudaMemcpyDeviceToHost));
    for (void* p : {static_cast<void*>(dk), static_cast<void*>(dv), static_cast<void*>(ints),
                    static_cast<void*>(rows)})
      cudaFree(p);
    CopyOnHost(cache, l);
    EXPECT_EQ(std::memcmp(gv.data(), cache.BlockData(0, true, 0), bytes), 0) << "values";
    const size_t es = DTypeSize(t), elems = bytes / es;
    const float ulp = t == DType::kF32 ? 0.f : 1.f / 128;
    for (size_t i = 0; i < elems; ++i) {
      const float want = LoadAsF32(t, cache.BlockData(0, false, 0), i),
                  got = LoadAsF32(t, gk.data(), i);
      ASSERT_LE(std::fabs(got - want), ulp * std::fabs(want)) << KVTypeName(t) << " key " << i;
    }
  }
}

// The chunks' combined scoring queries equal the host's (the planner's ScoringQueries rotation,
// then GroupQueries) bit for bit: the same f32 operations in the same order.
TEST(ChunkLayout, GroupChunkQueriesEqualsHost) {
  NEEDLE_REQUIRE_GPU(gpu);
  const int64_t heads = 28, Hk = 4, D = 128, rows = 300;
  std::vector<float> inv_freq(static_cast<size_t>(D / 2));
  for (int64_t i = 0; i < D / 2; ++i)
    inv_freq[i] = static_cast<float>(std::pow(1e6, -2.0 * static_cast<double>(i) / D));
  const std::vector<float> q = test::RandomVector(static_cast<size_t>(rows * heads * D), 21, 1.f);
  // (first row, tokens, shift): rotated and not, one of a single query.
  const std::vector<std::array<int64_t, 3>> chunks = {
      {0, 100, 0}, {100, 150, 2048 - 4096}, {250, 49, -77777}, {299, 1, 12345}};
  cudaStream_t s = CudaBackendStream(*gpu);
  for (bool quest : {false, true}) {
    std::vector<int32_t> spec;
    std::vector<float> rot;
    for (size_t c = 0; c < chunks.size(); ++c) {
      const bool r = chunks[c][2] != 0;
      spec.insert(spec.end(),
                  {static_cast<int32_t>(chunks[c][0]), static_cast<int32_t>(chunks[c][1]),
                   r ? static_cast<int32_t>(rot.size() / D) : -1});
      if (r) {
        rot.resize(rot.size() + static_cast<size_t>(D));
        RotationRow(chunks[c][2], inv_freq.data(), D, rot.data() + rot.size() - D);
      }
    }
    float *dq = nullptr, *drot = nullptr, *dout = nullptr;
    int32_t* dspec = nullptr;
    const size_t n_out = chunks.size() * 2 * static_cast<size_t>(Hk * D);
    NEEDLE_CUDA_CHECK(cudaMalloc(&dq, q.size() * 4));
    NEEDLE_CUDA_CHECK(cudaMalloc(&drot, rot.size() * 4));
    NEEDLE_CUDA_CHECK(cudaMalloc(&dout, n_out * 4));
    NEEDLE_CUDA_CHECK(cudaMalloc(&dspec, spec.size() * 4));
    NEEDLE_CUDA_CHECK(cudaMemcpy(dq, q.data(), q.size() * 4, cudaMemcpyHostToDevice));
    NEEDLE_CUDA_CHECK(cudaMemcpy(drot, rot.data(), rot.size() * 4, cudaMemcpyHostToDevice));
    NEEDLE_CUDA_CHECK(cudaMemcpy(dspec, spec.data(), spec.size() * 4, cudaMemcpyHostToDevice));
    cuda::GroupChunkQueries(dq, dspec, static_cast<int64_t>(chunks.size()), heads, Hk, D, quest,
                            drot, dout, s);
    std::vector<float> got(n_out);
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(s));
    NEEDLE_CUDA_CHECK(cudaMemcpy(got.data(), dout, n_out * 4, cudaMemcpyDeviceToHost));
    for (void* p : {static_cast<void*>(dq), static_cast<void*>(drot), static_cast<void*>(dout),
                    static_cast<void*>(dspec)})
      cudaFree(p);
    for (size_t c = 0; c < chunks.size(); ++c) {
      const int64_t T = chunks[c][1];
      std::vector<float> sq(q.begin() + chunks[c][0] * heads * D,
                            q.begin() + (chunks[c][0] + T) * heads * D);
      if (chunks[c][2] != 0) {
        std::vector<float> row(static_cast<size_t>(D)), in = sq;
        RotationRow(chunks[c][2], inv_freq.data(), D, row.data());
        RotateRows(in.data(), T * heads, D, row.data(), sq.data());
      }
      std::vector<float> qa(static_cast<size_t>(Hk * D)), qb(qa.size());
      GroupQueries(ScoreArgs{sq.data(), T, heads, Hk, D, nullptr, 0}, quest, qa.data(), qb.data());
      for (int64_t i = 0; i < Hk * D; ++i) {
        ASSERT_EQ(got[(c * 2) * Hk * D + i], qa[i]) << "quest " << quest << " chunk " << c;
        ASSERT_EQ(got[(c * 2 + 1) * Hk * D + i], qb[i]) << "quest " << quest << " chunk " << c;
      }
    }
  }
}
#endif

}  // namespace
}  // namespace needle
