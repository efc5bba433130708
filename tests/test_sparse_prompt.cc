// Block-sparse attention over a prompt and beyond the trained length: sparse chunked prefill
// against dense prefill, block-wise position remapping against explicitly re-rotated keys, and
// the watch behind eval --needle-hits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <numeric>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/cpu/ops.h"
#include "engine/model/model.h"
#include "sparse_attn/observation.h"
#include "sparse_attn/plan.h"
#include "sparse_attn/representatives.h"
#include "sparse_attn/scoring.h"
#include "sparse_attn/sparse_attention.h"
#include "tests/sparse_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

using test::ForEachSparseFixture;
using test::kFx;
using test::MaxAbs;
using test::MaxDiff;
using test::RunTokens;
using test::SmallConfig;
using test::Tokens;

// set_watch: with topk covering every block, every query attends the watched tokens (share 1 in
// every layer, sparse prefill's last chunk included); unwatched, nothing is measured.
TEST(Sparse, WatchCountsTheAttendedShare) {
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  auto model = LoadModel(kFx + "/llama_llama3_hd128_f32", *backend);
  const auto prompt = Tokens(61, 1), decode = Tokens(6, 2);
  for (bool sparse_prefill : {false, true}) {
    SparseConfig c = SmallConfig(ReprType::kQuest, SelectMode::kKVHead);
    c.sparse_prefill = sparse_prefill;
    c.prefill_chunk = 8;
    const int64_t cap = static_cast<int64_t>(prompt.size() + decode.size());
    KVCache cache(model->CacheShape(cap, DType::kF32, c.block_size));
    SparseAttention sp(model->config(), c, *backend, tc, cap, DType::kF32);
    sp.set_watch(20, 23);  // a Context block for every query that follows it by 8 or more
    model->set_attention(&sp);
    std::vector<float> logits;
    model->Forward(prompt.data(), static_cast<int64_t>(prompt.size()), cache, false, &logits);
    for (int32_t t : decode) model->Forward(&t, 1, cache, false, &logits);
    model->set_attention(nullptr);
    for (double h : sp.WatchPerLayer()) EXPECT_DOUBLE_EQ(h, 1.0) << sparse_prefill;
    sp.set_watch(0, 0);
    for (double h : sp.WatchPerLayer()) EXPECT_EQ(h, -1.0);
  }
}

// Sparse chunked prefill equals dense prefill when topk covers every block, and when one chunk
// covers the prompt (no Context before its first query); with a small budget it attends less
// (its logits differ) and stays finite.
TEST(Sparse, SparsePrefillEqualsDenseWhenItCoversEverything) {
  ThreadingContext tc(2);
  const auto prompt = Tokens(61, 1), decode = Tokens(12, 2);
  ForEachSparseFixture(
      tc, prompt, decode, [&](const char* fx, Model& model, const std::vector<float>& dense) {
        const double mx = MaxAbs(dense);
        for (ReprType r : {ReprType::kMax, ReprType::kMean, ReprType::kQuest})
          for (SelectMode m : {SelectMode::kLayer, SelectMode::kKVHead})
            for (int64_t chunk : {8, 64}) {
              SparseConfig c = SmallConfig(r, m);
              c.sparse_prefill = true;
              c.prefill_chunk = chunk;  // 8: topk covers; 64: one chunk covers the prompt
              if (chunk == 64) c.topk = 1;
              const auto sparse = RunTokens(model, prompt, {}, &c, tc);
              EXPECT_LE(MaxDiff(sparse, dense, sparse.size()), 1e-5 * mx)
                  << fx << " " << ReprTypeName(r) << " " << SelectModeName(m) << " chunk " << chunk;
            }
        SparseConfig small = SmallConfig(ReprType::kQuest, SelectMode::kKVHead);
        small.sparse_prefill = true;
        small.prefill_chunk = 8;
        small.topk = 1;
        const auto s = RunTokens(model, prompt, decode, &small, tc);
        ASSERT_EQ(s.size(), dense.size());
        double diff = 0;
        for (size_t i = 0; i < s.size(); ++i) {
          ASSERT_TRUE(std::isfinite(s[i])) << i;
          diff = std::max(diff, static_cast<double>(std::fabs(s[i] - dense[i])));
        }
        EXPECT_GT(diff, 1e-3 * mx) << fx << ": a one-block budget attended everything";
      });
}

// A prompt in micro-batches leaves the planner as the whole prompt at once does: the observation
// window (only the prompt's last obs_window queries are kept, whatever the micro-batches) votes
// for the same Dynamic representatives and the same preselection.
TEST(Sparse, MicroBatchesLeaveTheSameObservationWindow) {
  const int64_t D = 16, Hk = 2, H = 4, B = 4, N = 100;
  const ModelConfig m = test::AttentionShapes(1, H, Hk, D);
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  // Keys of the prompt and of one decode token; queries of the prompt and of the decode token.
  const auto k = test::RandomVector((N + 1) * Hk * D, 5),
             v = test::RandomVector((N + 1) * Hk * D, 6);
  auto q = test::RandomVector((N + 1) * H * D, 7, 2.f);
  // Query 94 (the oldest the window of 6 keeps, in the next-to-last micro-batch) looks hard at
  // token 9 alone: without it, token 9 is not its block's most-voted.
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d)
      q[(94 * H + h) * D + d] = 4.f * k[(9 * Hk + h / (H / Hk)) * D + d];
  KVCache cache(KVCacheShape{1, Hk, D, N + 1, B, DType::kF32});
  cache.Write(0, 0, N + 1, k.data(), v.data());
  for (ReprType r : {ReprType::kDynamic, ReprType::kQuest}) {
    SparseConfig c;
    c.block_size = B, c.init_tokens = 4, c.local_window = 8, c.topk = 3, c.dense_layers = 0;
    // A window of 6 spans the last two micro-batches; one query's votes move the most-voted
    // token of some block (repr_count 1).
    c.repr = r, c.repr_count = 1, c.obs_window = 6, c.preselect_blocks = 5, c.retain_blocks = 0;
    std::string plans[2];
    std::vector<uint8_t> reps[2];
    for (int64_t ub : {N, int64_t{16}}) {  // the whole prompt; micro-batches of 16 (the last: 4)
      SparseAttention sp(m, c, *backend, tc, N + 1, DType::kF32);
      std::ostringstream plan;
      sp.set_plan_sink(&plan);
      std::vector<float> out(static_cast<size_t>(N * H * D));
      for (int64_t p0 = 0; p0 < N; p0 += ub) {
        const int64_t T = std::min(ub, N - p0);
        sp.BeginStep(StepInfo{p0, T, N, p0 + T == N, 0});
        AttnArgs a{T, p0, H, Hk, D, 0, 0.25f};
        sp.Attend(0, q.data() + p0 * H * D, a, cache, out.data() + p0 * H * D);
      }
      // One decode step: its plan shows the selection the window's votes allow.
      sp.BeginStep(StepInfo{N, 1, 1, true, N});
      std::vector<float> o1(static_cast<size_t>(H * D));
      AttnArgs a1{1, N, H, Hk, D, 0, 0.25f};
      sp.Attend(0, q.data() + N * H * D, a1, cache, o1.data());
      const int i = ub == N ? 0 : 1;
      plans[i] = plan.str();
      for (int64_t b = c.init_end() / B; b < N / B - 2; ++b) {
        const auto* p = static_cast<const uint8_t*>(sp.representatives().Block(0, b));
        reps[i].insert(reps[i].end(), p, p + Hk * sp.representatives().rows() * D * 4);
      }
    }
    EXPECT_EQ(plans[1], plans[0]) << static_cast<int>(r);
    EXPECT_EQ(reps[1], reps[0]) << static_cast<int>(r);
    if (r != ReprType::kDynamic) continue;
    // And they are the votes of the prompt's last obs_window queries, no more, no fewer.
    QueryWindow w(c.obs_window, H, D);
    for (int64_t p = N - c.obs_window; p < N; ++p) w.Push(q.data() + p * H * D, nullptr, p);
    KVLayerView kv = cache.Layer(0);
    kv.n_tokens = N;
    std::vector<float> wout(static_cast<size_t>(c.obs_window * H * D)), votes;
    ref::Attention(w.q().data(), kv, AttnArgs{c.obs_window, N - c.obs_window, H, Hk, D, 0, 0.25f},
                   nullptr, wout.data(), w.lse().data(), tc);
    ObservationVotes(kv, w, H, 0.25f, 0, N, tc, &votes);
    RepresentativeStore want(1, Hk, D, N / B + 1, ReprType::kDynamic, DType::kF32);
    std::vector<uint8_t> want_bytes;
    std::vector<float> bv(static_cast<size_t>(Hk * B));
    for (int64_t b = c.init_end() / B; b < N / B - 2; ++b) {
      for (int64_t h = 0; h < Hk; ++h)
        std::copy_n(votes.data() + h * N + b * B, B, bv.data() + h * B);
      want.ComputeDynamic(0, b, kv, bv.data(), c.repr_count);
      const auto* p = static_cast<const uint8_t*>(want.Block(0, b));
      want_bytes.insert(want_bytes.end(), p, p + Hk * D * 4);
    }
    EXPECT_EQ(reps[1], want_bytes);
  }
}

// Block-wise position remapping against a reference that re-rotates the keys explicitly: the
// attended keys (Initial, two Context blocks per KV head, Local) rotated at their remapped,
// contiguous positions in a second cache, attended densely by the query rotated at its remapped
// position, give what the kernel gives from the keys rotated at their true positions with the
// remap's query rotations.
TEST(Sparse, PositionRemapEqualsExplicitlyReRotatedKeys) {
  const int64_t D = 16, Hk = 2, G = 2, H = Hk * G, B = 4, ie = 4, lb = 40, p = 45;
  std::vector<float> inv_freq(static_cast<size_t>(D / 2));
  for (int64_t i = 0; i < D / 2; ++i)
    inv_freq[i] = static_cast<float>(std::pow(500.0, -2.0 * i / static_cast<double>(D)));
  std::vector<float> row(static_cast<size_t>(D));
  const auto rotated = [&](const float* x, int64_t rows, int64_t pos) {
    RotationRow(pos, inv_freq.data(), D, row.data());
    std::vector<float> y(static_cast<size_t>(rows * D));
    RotateRows(x, rows, D, row.data(), y.data());
    return y;
  };
  const auto k = test::RandomVector((p + 1) * Hk * D, 3),
             v = test::RandomVector((p + 1) * Hk * D, 4);
  const auto q = test::RandomVector(H * D, 5);
  // The cache as needle keeps it: keys rotated at their true positions.
  KVCache truth(KVCacheShape{1, Hk, D, p + 1, B, DType::kF32});
  for (int64_t j = 0; j <= p; ++j)
    truth.Write(0, j, 1, rotated(&k[j * Hk * D], Hk, j).data(), &v[j * Hk * D]);
  truth.SetSize(p + 1);
  const std::vector<std::vector<int32_t>> blocks = {{2, 7}, {5, 6}};
  AttnSpans spans;
  spans.offsets.assign(1, 0);
  std::map<int64_t, int32_t> rows;
  for (int64_t h = 0; h < Hk; ++h)
    AppendQuerySpans(ie, blocks[h], B, lb, p, inv_freq.data(), D, &spans, &rows);
  AttnArgs a{1, p, H, Hk, D, 0, 0.25f};
  ThreadingContext tc(2);
  std::vector<float> got(static_cast<size_t>(H * D)), got_lse(static_cast<size_t>(H));
  const auto qp = rotated(q.data(), H, p);
  fast::Attention(qp.data(), truth.Layer(0), a, &spans, got.data(), got_lse.data(), tc);
  std::vector<float> ref_out(got.size()), ref_lse(got_lse.size());
  ref::Attention(qp.data(), truth.Layer(0), a, &spans, ref_out.data(), ref_lse.data(), tc);
  for (int64_t h = 0; h < Hk; ++h) {
    // The reference: head h's attended keys at contiguous positions 0 .. n-1, the query at n-1.
    std::vector<int64_t> keys;
    for (int64_t j = 0; j < ie; ++j) keys.push_back(j);
    for (int32_t b : blocks[h])
      for (int64_t j = b * B; j < (b + 1) * B; ++j) keys.push_back(j);
    for (int64_t j = lb; j <= p; ++j) keys.push_back(j);
    const int64_t n = static_cast<int64_t>(keys.size());
    KVCache moved(KVCacheShape{1, 1, D, n, B, DType::kF32});
    for (int64_t i = 0; i < n; ++i)
      moved.Write(0, i, 1, rotated(&k[(keys[i] * Hk + h) * D], 1, i).data(),
                  &v[(keys[i] * Hk + h) * D]);
    moved.SetSize(n);
    const auto qh = rotated(&q[h * G * D], G, n - 1);
    AttnArgs ra{1, n - 1, G, 1, D, 0, 0.25f};
    std::vector<float> want(static_cast<size_t>(G * D)), want_lse(static_cast<size_t>(G));
    ref::Attention(qh.data(), moved.Layer(0), ra, nullptr, want.data(), want_lse.data(), tc);
    for (int64_t i = 0; i < G * D; ++i) {
      EXPECT_NEAR(got[h * G * D + i], want[i], 2e-5) << "head " << h << " " << i;
      EXPECT_NEAR(ref_out[h * G * D + i], want[i], 2e-5) << "head " << h << " " << i;
    }
    for (int64_t g = 0; g < G; ++g) EXPECT_NEAR(got_lse[h * G + g], want_lse[g], 2e-5);
  }
  // Without the remap the same spans score at the true distances: a different result.
  AttnSpans plain = spans;
  plain.rot.clear();
  std::vector<float> other(got.size());
  fast::Attention(qp.data(), truth.Layer(0), a, &plain, other.data(), nullptr, tc);
  double diff = 0;
  for (size_t i = 0; i < got.size(); ++i)
    diff = std::max(diff, double{std::fabs(got[i] - other[i])});
  EXPECT_GT(diff, 1e-3);
}

}  // namespace
}  // namespace needle

namespace needle {
namespace {

// With --pos-remap, blocks are scored where the remap puts them: representatives from the keys
// rotated back to their block's start, and the query rotated by RemapScoreShift(lb). For Mean
// representatives the score is linear, so it must equal the mean over the block's keys of the
// unrotated query placed W = (p - lb) + topk * B / 2 positions past the block's start, dotted with
// each key at its offset in the block, whatever the block's true position. Tolerance: f32 sums of
// D products of O(1) terms, rotated twice (~1e-5); 1e-4 relative.
TEST(Sparse, RemappedScoresPlaceEveryBlockAtOneDistance) {
  ThreadingContext tc(1);
  const int64_t D = 16, B = 8, n_blocks = 6, n_tok = B * n_blocks, p = 1000, lb = 980;
  std::vector<float> inv_freq(D / 2);
  for (int64_t i = 0; i < D / 2; ++i) inv_freq[i] = std::pow(100.f, -2.f * i / D);
  SparseConfig cfg;
  cfg.block_size = B, cfg.topk = 4;
  // Keys at their positions 0 .. n_tok - 1: raw keys kr, stored rotated by their position.
  const auto kr = test::RandomVector(n_tok * D, 31), v = test::RandomVector(n_tok * D, 32);
  std::vector<float> ks(kr.size()), row(D);
  for (int64_t t = 0; t < n_tok; ++t) {
    RotationRow(t, inv_freq.data(), D, row.data());
    RotateRows(kr.data() + t * D, 1, D, row.data(), ks.data() + t * D);
  }
  KVCache cache(KVCacheShape{1, 1, D, n_tok, B, DType::kF32});
  cache.Write(0, 0, n_tok, ks.data(), v.data());
  RepresentativeStore reps(1, 1, D, n_blocks, ReprType::kMean, DType::kF32);
  for (int64_t b = 0; b < n_blocks; ++b)
    reps.ComputeFromKeys(0, b, cache.Layer(0), inv_freq.data());
  // The query: raw qr at position p, as attention gets it (rotated by p), then shifted.
  const auto qr = test::RandomVector(D, 33);
  std::vector<float> qs(D), sq(D);
  RotationRow(p, inv_freq.data(), D, row.data());
  RotateRows(qr.data(), 1, D, row.data(), qs.data());
  RotationRow(cfg.RemapScoreShift(lb), inv_freq.data(), D, row.data());
  RotateRows(qs.data(), 1, D, row.data(), sq.data());
  std::vector<int32_t> ids(n_blocks);
  for (int64_t b = 0; b < n_blocks; ++b) ids[b] = static_cast<int32_t>(b);
  std::vector<float> got(n_blocks);
  fast::ScoreBlocks(reps, 0, ScoreArgs{sq.data(), 1, 1, 1, D, ids.data(), n_blocks}, got.data(),
                    tc);
  const int64_t W = (p - lb) + cfg.topk * B / 2;
  std::vector<float> qw(D), kj(D);
  RotationRow(W, inv_freq.data(), D, row.data());
  RotateRows(qr.data(), 1, D, row.data(), qw.data());
  for (int64_t b = 0; b < n_blocks; ++b) {
    double want = 0;
    for (int64_t j = 0; j < B; ++j) {
      RotationRow(j, inv_freq.data(), D, row.data());
      RotateRows(kr.data() + (b * B + j) * D, 1, D, row.data(), kj.data());
      for (int64_t d = 0; d < D; ++d) want += static_cast<double>(qw[d]) * kj[d] / B;
    }
    EXPECT_NEAR(got[b], want, 1e-4 * (std::fabs(want) + 1)) << "block " << b;
  }
  // Without the shift and the relative representatives, a block's score depends on where it is.
  RepresentativeStore plain(1, 1, D, n_blocks, ReprType::kMean, DType::kF32);
  for (int64_t b = 0; b < n_blocks; ++b) plain.ComputeFromKeys(0, b, cache.Layer(0));
  std::vector<float> at_true(n_blocks);
  fast::ScoreBlocks(plain, 0, ScoreArgs{qs.data(), 1, 1, 1, D, ids.data(), n_blocks},
                    at_true.data(), tc);
  double diff = 0;
  for (int64_t b = 0; b < n_blocks; ++b) diff += std::fabs(at_true[b] - got[b]);
  EXPECT_GT(diff, 1e-3);
}

// The CPU executor plus the shortlists of PlanExecutor::ChunkTop (the hybrid engine's GPU): each
// row's `want` best candidates scored here from the chunk's own queries, handed back in reverse
// order with the scores, for the chunks the planner marked executor_top.
class ShortlistExecutor final : public CpuPlanExecutor {
 public:
  ShortlistExecutor(Backend& b, ThreadingContext& tc, SparseAttention& sp)
      : CpuPlanExecutor(b), tc_(tc), sp_(sp) {}
  // Before each micro-batch, as the hybrid engine queues its shortlists: its queries q (host,
  // [a.T, heads, D]).
  void Queue(const float* q, const AttnArgs& a, const KVLayerView& kv) {
    q_ = q, pos0_ = a.pos0;
    chunks_ = sp_.PrefillChunkScoring(0, a, kv);
  }
  bool ChunkTop(int64_t layer, const AttnArgs& a, std::vector<std::vector<Scored>>* top) override {
    const auto it = std::find_if(chunks_.begin(), chunks_.end(),
                                 [&](const auto& ck) { return ck.c0 == a.pos0; });
    if (it == chunks_.end() || !it->executor_top) return false;
    int64_t want = 0;
    bool sum = false;
    sp_.ChunkShortlist(&want, &sum);
    const int64_t n = it->cand_end - it->cand_first;
    std::vector<int32_t> ids(static_cast<size_t>(n));
    std::iota(ids.begin(), ids.end(), static_cast<int32_t>(it->cand_first));
    std::vector<float> sc(static_cast<size_t>(a.kv_heads * n));
    fast::ScoreBlocks(sp_.representatives(), layer,
                      ScoreArgs{q_ + (a.pos0 - pos0_) * a.heads * a.head_dim, a.T, a.heads,
                                a.kv_heads, a.head_dim, ids.data(), n},
                      sc.data(), tc_);
    if (sum) SumOverHeads(sc.data(), a.kv_heads, n);
    top->assign(sum ? 1 : static_cast<size_t>(a.kv_heads), {});
    for (size_t r = 0; r < top->size(); ++r) {
      const float* row = sc.data() + r * n;
      std::vector<int32_t> best = TopK(row, ids.data(), n, want);
      for (auto b = best.rbegin(); b != best.rend(); ++b)
        (*top)[r].push_back({row[*b - it->cand_first], *b});
    }
    ++used;
    return true;
  }
  // Every chunk's queries combined here, as the hybrid engine combines them where they are.
  bool ChunkQueries(int64_t, const AttnArgs& a, float* qa, float* qb) override {
    const auto it = std::find_if(chunks_.begin(), chunks_.end(),
                                 [&](const auto& ck) { return ck.c0 == a.pos0; });
    if (it == chunks_.end()) return false;
    GroupQueries(ScoreArgs{q_ + (a.pos0 - pos0_) * a.heads * a.head_dim, a.T, a.heads, a.kv_heads,
                           a.head_dim, nullptr, 0},
                 sp_.config().repr == ReprType::kQuest, qa, qb);
    return true;
  }
  int64_t used = 0;  // chunks whose shortlist came from here

 private:
  ThreadingContext& tc_;
  SparseAttention& sp_;
  const float* q_ = nullptr;
  int64_t pos0_ = 0;
  std::vector<SparseAttention::ChunkSpec> chunks_;
};

// A sparse prefill whose chunks are ranked from an executor's shortlists (the hybrid engine scores
// them on the GPU) attends exactly what the planner's own scoring selects: same outputs, same
// decode plans. Micro-batches of 32 with a Local window of 8: the chunks whose candidates reach
// into their micro-batch are scored by the planner (both paths run). With re-ranking by the best
// key (rescore 6 of topk 3), the shortlists are the candidates to re-rank, and the best keys are
// scored from the executor's combined queries. The prompt's last query re-ranking more than the
// executor's shortlist holds (rescore_last 1000) is scored by the planner.
TEST(Sparse, ChunkShortlistsFromTheExecutorSelectAsThePlanner) {
  // (N: the last micro-batch is the prompt's last query alone, its candidates all before it.)
  const int64_t D = 16, Hk = 2, H = 4, B = 4, N = 161, ub = 32;
  const ModelConfig m = test::AttentionShapes(1, H, Hk, D);
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  const auto k = test::RandomVector((N + 1) * Hk * D, 11),
             v = test::RandomVector((N + 1) * Hk * D, 12);
  const auto q = test::RandomVector((N + 1) * H * D, 13, 2.f);
  KVCache cache(KVCacheShape{1, Hk, D, N + 1, B, DType::kF32});
  cache.Write(0, 0, N + 1, k.data(), v.data());
  for (const auto& [rescore, last] : {std::pair<int64_t, int64_t>{0, 0}, {6, 0}, {0, 1000}})
    for (ReprType r : {ReprType::kQuest, ReprType::kMax, ReprType::kMean})
      for (SelectMode sm : {SelectMode::kLayer, SelectMode::kKVHead}) {
        SparseConfig c;
        c.block_size = B, c.init_tokens = 4, c.local_window = 8, c.topk = 3, c.dense_layers = 0;
        c.repr = r, c.select = sm, c.sparse_prefill = true, c.prefill_chunk = 8;
        c.rescore_blocks = rescore, c.rescore_last = last;
        std::string plans[2];
        std::vector<float> outs[2];
        int64_t used = 0;
        for (int run = 0; run < 2; ++run) {
          SparseAttention sp(m, c, *backend, tc, N + 1, DType::kF32);
          ShortlistExecutor ex(*backend, tc, sp);
          if (run == 1) sp.set_executor(&ex);
          std::ostringstream plan;
          sp.set_plan_sink(&plan);
          std::vector<float> out(static_cast<size_t>((N + 1) * H * D));
          for (int64_t p0 = 0; p0 < N; p0 += ub) {
            const int64_t T = std::min(ub, N - p0);
            sp.BeginStep(StepInfo{p0, T, N, p0 + T == N, 0});
            AttnArgs a{T, p0, H, Hk, D, 0, 0.25f};
            KVLayerView kv = cache.Layer(0);
            kv.n_tokens = p0 + T;
            if (run == 1) ex.Queue(q.data() + p0 * H * D, a, kv);
            sp.Attend(0, q.data() + p0 * H * D, a, cache, out.data() + p0 * H * D);
          }
          sp.BeginStep(StepInfo{N, 1, 1, true, N});
          AttnArgs a1{1, N, H, Hk, D, 0, 0.25f};
          sp.Attend(0, q.data() + N * H * D, a1, cache, out.data() + N * H * D);
          plans[run] = plan.str();
          outs[run] = out;
          used = ex.used;
        }
        const std::string what = std::string(ReprTypeName(r)) + " " + SelectModeName(sm) +
                                 " rescore " + std::to_string(rescore) + " last " +
                                 std::to_string(last);
        EXPECT_GE(used, 8) << what;
        EXPECT_LT(used, N / c.prefill_chunk - 1) << what << ": every chunk came from the executor";
        EXPECT_EQ(plans[1], plans[0]) << what;
        EXPECT_EQ(MaxDiff(outs[1], outs[0], outs[0].size()), 0.0) << what;
      }
}

}  // namespace
}  // namespace needle
