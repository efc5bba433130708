// Block-sparse decode: equivalence with dense attention when the budget covers everything,
// selections equal to a brute-force scorer written plainly here, step/layer reuse, preselection
// with long answers, recall, validation, and the scoring kernel against its reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "engine/backend/backend.h"
#include "engine/cpu/ops.h"
#include "engine/model/model.h"
#include "sparse_attn/block_mass.h"
#include "sparse_attn/plan.h"
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

TEST(Sparse, EqualsDenseWhenTopkCoversEveryBlock) {
  ThreadingContext tc(2);
  const auto prompt = Tokens(61, 1), decode = Tokens(30, 2);
  ForEachSparseFixture(
      tc, prompt, decode, [&](const char* fx, Model& model, const std::vector<float>& dense) {
        const double mx = MaxAbs(dense);
        for (ReprType r : {ReprType::kMax, ReprType::kMean, ReprType::kQuest, ReprType::kDynamic}) {
          for (SelectMode m : {SelectMode::kLayer, SelectMode::kKVHead}) {
            for (int64_t presel : {0, 1000}) {
              SparseConfig c = SmallConfig(r, m);
              c.preselect_blocks = presel;
              std::unique_ptr<SparseAttention> keep;
              SparseAttention* pol = nullptr;
              const auto sparse = RunTokens(model, prompt, decode, &c, tc, &pol, &keep);
              ASSERT_EQ(sparse.size(), dense.size());
              EXPECT_LE(MaxDiff(sparse, dense, dense.size()), 1e-5 * mx)
                  << fx << " " << ReprTypeName(r) << " " << SelectModeName(m) << " presel "
                  << presel;
              // The last step really went through the sparse path, with Context blocks selected.
              const LayerPlan& p = pol->last_plan(1);
              EXPECT_FALSE(p.dense);
              EXPECT_GT(p.blocks[0].size(), 5u);
              for (double rc : pol->RecallPerLayer()) EXPECT_NEAR(rc, 1.0, 1e-5);
            }
          }
        }
      });
}

// ---- Brute force: representatives, votes and selection written plainly from the keys. ----

struct Synthetic {
  ModelConfig cfg;
  int64_t N = 600;  // prompt tokens
  std::vector<float> k, v, qp,
      qd;  // keys/values [N+1, Hk, D], prompt queries [N, H, D], decode query [H, D]
};

Synthetic MakeSynthetic(int64_t heads, int64_t kv_heads, int64_t D) {
  Synthetic s;
  s.cfg.num_layers = 1;
  s.cfg.num_heads = heads;
  s.cfg.num_kv_heads = kv_heads;
  s.cfg.head_dim = D;
  s.cfg.hidden_size = heads * D;
  s.cfg.sliding_window = {0};
  s.k = test::RandomVector((s.N + 1) * kv_heads * D, 1);
  s.v = test::RandomVector((s.N + 1) * kv_heads * D, 2);
  s.qp = test::RandomVector(s.N * heads * D, 3, 0.5f);
  s.qd = test::RandomVector(heads * D, 4);
  return s;
}

std::vector<std::vector<int32_t>> BruteForce(const Synthetic& s, const SparseConfig& c,
                                             const KVLayerView& kv) {
  const int64_t H = s.cfg.num_heads, Hk = s.cfg.num_kv_heads, D = s.cfg.head_dim, G = H / Hk,
                B = c.block_size;
  const int64_t P = s.N, pos = s.N;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  auto key = [&](int64_t h, int64_t j, int64_t d) { return kv.KAt(h, j, d); };
  // Votes of the last obs_window prompt queries over keys [0, P).
  std::vector<std::vector<double>> votes(Hk, std::vector<double>(P, 0.0));
  for (int64_t i = P - c.obs_window; i < P; ++i) {
    for (int64_t hq = 0; hq < H; ++hq) {
      const int64_t h = hq / G;
      std::vector<double> sc(i + 1);
      double mx = -1e300;
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += s.qp[(i * H + hq) * D + d] * key(h, j, d);
        sc[j] = dot * scale;
        mx = std::max(mx, sc[j]);
      }
      double sum = 0;
      for (double x : sc) sum += std::exp(x - mx);
      for (int64_t j = 0; j <= i; ++j) votes[h][j] += std::exp(sc[j] - mx) / sum;
    }
  }
  const int64_t init_blocks = c.init_end() / B, ctx_end = c.LocalBegin(pos) / B;
  // Block scores per KV head.
  std::vector<std::vector<double>> score(Hk, std::vector<double>(ctx_end, 0.0));
  for (int64_t h = 0; h < Hk; ++h) {
    for (int64_t b = init_blocks; b < ctx_end; ++b) {
      std::vector<double> mx(D, -INFINITY), mn(D, INFINITY), mean(D, 0), dyn(D, 0);
      for (int64_t j = b * B; j < (b + 1) * B; ++j)
        for (int64_t d = 0; d < D; ++d) {
          mx[d] = std::max(mx[d], static_cast<double>(key(h, j, d)));
          mn[d] = std::min(mn[d], static_cast<double>(key(h, j, d)));
          mean[d] += key(h, j, d) / static_cast<double>(B);
        }
      std::vector<int64_t> tok(B);
      std::iota(tok.begin(), tok.end(), b * B);
      std::stable_sort(tok.begin(), tok.end(),
                       [&](int64_t x, int64_t y) { return votes[h][x] > votes[h][y]; });
      for (int64_t r = 0; r < c.repr_count; ++r)
        for (int64_t d = 0; d < D; ++d) dyn[d] += key(h, tok[r], d);
      double sc = 0;
      if (c.rescore_blocks > 0) {  // (covering every candidate) the best single key
        sc = -INFINITY;
        for (int64_t j = b * B; j < (b + 1) * B; ++j) {
          double dot = 0;
          for (int64_t g = 0; g < G; ++g)
            for (int64_t d = 0; d < D; ++d) dot += s.qd[(h * G + g) * D + d] * key(h, j, d);
          sc = std::max(sc, dot);
        }
        score[h][b] = sc;
        continue;
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) {
          const double q = s.qd[(h * G + g) * D + d];
          switch (c.repr) {
            case ReprType::kMax:
              sc += q * mx[d];
              break;
            case ReprType::kMean:
              sc += q * mean[d];
              break;
            case ReprType::kDynamic:
              sc += q * dyn[d];
              break;
            case ReprType::kQuest:
              sc += std::max(q * mx[d], q * mn[d]);
              break;
          }
        }
      score[h][b] = sc;
    }
  }
  // Preselection: max-pooled votes summed per block.
  std::vector<std::vector<bool>> cand(Hk, std::vector<bool>(ctx_end, true));
  if (c.preselect_blocks > 0) {
    std::vector<std::vector<double>> bs(Hk, std::vector<double>(ctx_end, 0.0));
    for (int64_t h = 0; h < Hk; ++h)
      for (int64_t b = init_blocks; b < ctx_end; ++b)
        for (int64_t j = b * B; j < (b + 1) * B; ++j) {
          double m = 0;
          for (int64_t t = std::max<int64_t>(0, j - c.preselect_pool / 2);
               t <= std::min(P - 1, j + c.preselect_pool / 2); ++t)
            m = std::max(m, votes[h][t]);
          bs[h][b] += m;
        }
    auto keep_top = [&](const std::vector<double>& v, std::vector<bool>& flags) {
      std::vector<int64_t> ids;
      for (int64_t b = init_blocks; b < ctx_end; ++b) ids.push_back(b);
      std::stable_sort(ids.begin(), ids.end(), [&](int64_t x, int64_t y) { return v[x] > v[y]; });
      std::fill(flags.begin(), flags.end(), false);
      for (int64_t i = 0; i < std::min<int64_t>(c.preselect_blocks, ids.size()); ++i)
        flags[ids[i]] = true;
    };
    if (c.select == SelectMode::kLayer) {
      std::vector<double> sum(ctx_end, 0.0);
      for (int64_t h = 0; h < Hk; ++h)
        for (int64_t b = 0; b < ctx_end; ++b) sum[b] += bs[h][b];
      for (auto& f : cand) keep_top(sum, f);
    } else {
      for (int64_t h = 0; h < Hk; ++h) keep_top(bs[h], cand[h]);
    }
  }
  auto top = [&](const std::vector<double>& v, const std::vector<bool>& ok) {
    std::vector<int32_t> ids;
    for (int64_t b = init_blocks; b < ctx_end; ++b)
      if (ok[b]) ids.push_back(static_cast<int32_t>(b));
    std::stable_sort(ids.begin(), ids.end(), [&](int32_t x, int32_t y) { return v[x] > v[y]; });
    ids.resize(std::min<size_t>(ids.size(), c.topk));
    std::sort(ids.begin(), ids.end());
    return ids;
  };
  std::vector<std::vector<int32_t>> out(Hk);
  if (c.select == SelectMode::kLayer) {
    std::vector<double> sum(ctx_end, 0.0);
    for (int64_t h = 0; h < Hk; ++h)
      for (int64_t b = 0; b < ctx_end; ++b) sum[b] += score[h][b];
    for (auto& o : out) o = top(sum, cand[0]);
  } else {
    for (int64_t h = 0; h < Hk; ++h) out[h] = top(score[h], cand[h]);
  }
  return out;
}

TEST(Sparse, SelectionEqualsBruteForce) {
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  for (auto [H, Hk, D] :
       {std::tuple<int64_t, int64_t, int64_t>{8, 2, 64}, {7, 1, 128}, {4, 4, 64}}) {
    const Synthetic s = MakeSynthetic(H, Hk, D);
    for (ReprType r : {ReprType::kMax, ReprType::kMean, ReprType::kQuest, ReprType::kDynamic}) {
      for (SelectMode m : {SelectMode::kLayer, SelectMode::kKVHead}) {
        for (int64_t presel : {0, 12})
          for (int64_t rescore : {0, 64}) {  // 64: every candidate re-ranked by its best key
            if (rescore > 0 && r != ReprType::kQuest && r != ReprType::kMax) continue;
            SparseConfig c;
            c.rescore_blocks = rescore;
            c.block_size = 16;
            c.init_tokens = 16;
            c.local_window = 64;
            c.topk = 5;
            c.repr = r;
            c.repr_count = 3;
            c.obs_window = 24;
            c.select = m;
            c.dense_layers = 0;
            c.preselect_blocks = presel;
            c.retain_blocks = 0;  // selection by score alone (retention: its own test below)
            KVCache cache(KVCacheShape{1, Hk, D, s.N + 1, c.block_size, DType::kF32});
            cache.Write(0, 0, s.N + 1, s.k.data(), s.v.data());
            SparseAttention sp(s.cfg, c, *backend, tc, s.N + 1, DType::kF32);
            AttnArgs a{s.N, 0, H, Hk, D, 0, 1.0f / std::sqrt(static_cast<float>(D))};
            std::vector<float> out(s.N * H * D);
            cache.SetSize(s.N);
            sp.BeginStep(StepInfo{0, s.N, s.N, true});
            sp.Attend(0, s.qp.data(), a, cache, out.data());
            cache.SetSize(s.N + 1);
            a.T = 1;
            a.pos0 = s.N;
            sp.BeginStep(StepInfo{s.N, 1, 1, true});
            sp.Attend(0, s.qd.data(), a, cache, out.data());
            const LayerPlan& plan = sp.last_plan(0);
            ASSERT_FALSE(plan.dense);
            const auto want = BruteForce(s, c, cache.Layer(0));
            EXPECT_EQ(plan.blocks, want)
                << "H " << H << " Hk " << Hk << " " << ReprTypeName(r) << " " << SelectModeName(m)
                << " presel " << presel << " rescore " << rescore;
          }
      }
    }
  }
}

TEST(Sparse, TokenAndLayerStepReuseSelections) {
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  auto model = LoadModel(kFx + "/llama_llama3_hd128_f32", *backend);  // 2 layers
  SparseConfig c = SmallConfig(ReprType::kQuest, SelectMode::kKVHead);
  c.topk = 2;
  c.token_step = 3;
  c.layer_step = 2;
  const auto prompt = Tokens(60, 3);
  KVCache cache(model->CacheShape(80, DType::kF32, c.block_size));
  SparseAttention sp(model->config(), c, *backend, tc, 80, DType::kF32);
  model->set_attention(&sp);
  std::vector<float> logits;
  model->Forward(prompt.data(), 60, cache, false, &logits);
  std::vector<std::vector<int32_t>> first;
  int64_t sel_ctx_end = 0;
  bool grew = false;
  for (int step = 0; step < 8; ++step) {
    int32_t t = 5 + step;
    model->Forward(&t, 1, cache, false, &logits);
    const LayerPlan& l0 = sp.last_plan(0);
    const LayerPlan& l1 = sp.last_plan(1);
    EXPECT_EQ(l0.reused, step % 3 != 0) << "step " << step;
    EXPECT_TRUE(l1.reused) << "layer 1 reuses layer 0's selection at step " << step;
    const int64_t ctx_end = l0.local_begin / c.block_size;
    if (step % 3 == 0) first = l0.blocks, sel_ctx_end = ctx_end;
    // A reused selection is the earlier one plus every block that joined the Context since.
    for (size_t h = 0; h < first.size(); ++h)
      for (int32_t b : first[h])
        EXPECT_NE(std::find(l0.blocks[h].begin(), l0.blocks[h].end(), b), l0.blocks[h].end());
    EXPECT_EQ(l0.blocks, l1.blocks);
    for (auto& hb : l0.blocks)
      for (int64_t b = sel_ctx_end; b < ctx_end; ++b)
        EXPECT_NE(std::find(hb.begin(), hb.end(), b), hb.end())
            << "new Context block " << b << " missing";
    grew |= ctx_end > sel_ctx_end;
  }
  model->set_attention(nullptr);
}

TEST(Sparse, LongAnswersAfterPreselectionKeepNewBlocks) {
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  auto model = LoadModel(kFx + "/llama_llama3_hd128_f32", *backend);
  SparseConfig c = SmallConfig(ReprType::kMax, SelectMode::kLayer);
  c.topk = 2;
  c.preselect_blocks = 3;
  const auto prompt = Tokens(40, 4);
  const int64_t cap = 40 + 60;
  KVCache cache(model->CacheShape(cap, DType::kF32, c.block_size));
  SparseAttention sp(model->config(), c, *backend, tc, cap, DType::kF32);
  model->set_attention(&sp);
  std::vector<float> logits;
  model->Forward(prompt.data(), 40, cache, false, &logits);
  const int64_t presel_end = c.LocalBegin(39) / c.block_size;
  int64_t new_selected = 0;
  for (int step = 0; step < 60; ++step) {
    int32_t t = 7 + step % 200;
    model->Forward(&t, 1, cache, false, &logits);
    for (int64_t l = 0; l < 2; ++l) {
      const LayerPlan& p = sp.last_plan(l);
      const int64_t ctx_end = p.local_begin / c.block_size;
      // Candidates: the preselected prompt blocks plus every block generated since.
      EXPECT_EQ(p.candidates, c.preselect_blocks + (ctx_end - presel_end)) << "step " << step;
      for (int32_t b : p.blocks[0]) new_selected += b >= presel_end;
      ASSERT_EQ(p.AttendedTokens(0), p.init_end + 2 * c.block_size + (p.pos + 1 - p.local_begin));
    }
    for (float x : logits) ASSERT_TRUE(std::isfinite(x));
  }
  EXPECT_GT(new_selected, 0) << "blocks written after the prompt were never selected";
  EXPECT_EQ(cache.size(), cap);
  model->set_attention(nullptr);
}

TEST(Sparse, RecallBelowOneWithSmallBudget) {
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  auto model = LoadModel(kFx + "/qwen2_bias_gqa7_f32", *backend);
  SparseConfig c = SmallConfig(ReprType::kQuest, SelectMode::kKVHead);
  c.topk = 1;
  SparseAttention* pol = nullptr;
  std::unique_ptr<SparseAttention> keep;
  RunTokens(*model, Tokens(80, 5), Tokens(10, 6), &c, tc, &pol, &keep);
  for (double r : pol->RecallPerLayer()) {
    EXPECT_GT(r, 0.0);
    EXPECT_LT(r, 1.0);
  }
}

TEST(Sparse, ImpossibleSettingsAreRefusedByName) {
  auto expect = [](auto mutate, std::vector<std::string> parts) {
    SparseConfig c;
    mutate(c);
    test::ExpectErrorContaining([&] { c.Validate(); }, parts);
  };
  expect([](SparseConfig& c) { c.block_size = 0; }, {"block_size"});
  expect([](SparseConfig& c) { c.local_window = 64; }, {"local_window", "64", "block_size"});
  expect([](SparseConfig& c) { c.topk = 0; }, {"topk"});
  expect([](SparseConfig& c) { c.preselect_blocks = 8; }, {"preselect_blocks", "8", "topk", "32"});
  expect([](SparseConfig& c) { c.repr = ReprType::kDynamic, c.repr_count = 0; }, {"repr_count"});
  expect([](SparseConfig& c) { c.token_step = 0; }, {"token_step"});
  expect([](SparseConfig& c) { c.preselect_pool = 4; }, {"preselect_pool"});
  test::ExpectErrorContaining([] { ParseReprType("maximum", "--repr"); }, {"--repr", "maximum"});
  test::ExpectErrorContaining([] { ParseSelectMode("head", "--select"); }, {"--select", "head"});
}

TEST(Sparse, ScoringFastMatchesReference) {
  ThreadingContext tc(2);
  for (auto [H, Hk, D] :
       {std::tuple<int64_t, int64_t, int64_t>{4, 4, 64}, {8, 2, 128}, {7, 1, 64}, {16, 2, 72}}) {
    for (DType kvt : {DType::kF32, DType::kBF16}) {
      const int64_t B = 16, n_tok = 16 * 20;
      KVCache cache(KVCacheShape{1, Hk, D, n_tok, B, kvt});
      const auto k = test::RandomVector(n_tok * Hk * D, 9),
                 v = test::RandomVector(n_tok * Hk * D, 10);
      cache.Write(0, 0, n_tok, k.data(), v.data());
      for (ReprType r : {ReprType::kMax, ReprType::kMean, ReprType::kQuest, ReprType::kDynamic}) {
        RepresentativeStore reps(1, Hk, D, 20, r, kvt == DType::kF32 ? DType::kF32 : DType::kBF16);
        const auto votes = test::RandomVector(Hk * B, 11);
        for (int64_t b = 0; b < 20; ++b) {
          if (r == ReprType::kDynamic)
            reps.ComputeDynamic(0, b, cache.Layer(0), votes.data(), 3);
          else
            reps.ComputeFromKeys(0, b, cache.Layer(0));
        }
        for (int64_t nq : {1, 3}) {
          const auto q = test::RandomVector(nq * H * D, 12);
          std::vector<int32_t> ids = {0, 3, 4, 7, 19, 11};
          ScoreArgs a{q.data(), nq, H, Hk, D, ids.data(), static_cast<int64_t>(ids.size())};
          std::vector<float> f(Hk * ids.size()), rf(Hk * ids.size());
          fast::ScoreBlocks(reps, 0, a, f.data(), tc);
          ref::ScoreBlocks(reps, 0, a, rf.data(), tc);
          for (size_t i = 0; i < f.size(); ++i)
            EXPECT_NEAR(f[i], rf[i], 1e-4 * (std::fabs(rf[i]) + D)) << i;
        }
      }
    }
  }
}

// Block masses: the fast kernel against the double-precision reference on every KV type, and
// the meaning of a mass: with lse taken over exactly the blocks listed, each query head's masses
// sum to 1, so a KV head's sum to G. Tolerance: f32 dot products of D terms against double
// (|error| ~ D * 2^-24 * |q||k|, under 1e-5 here) pass through exp as a relative error of that
// size, plus Highway's Exp (a few ulp): 1e-4 relative. int8 keys are dequantised the same way
// in both, so the same bound holds.
TEST(Sparse, BlockMassFastMatchesReferenceAndSumsToOne) {
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  for (auto [H, Hk, D] :
       {std::tuple<int64_t, int64_t, int64_t>{8, 2, 64}, {7, 1, 128}, {4, 4, 72}}) {
    for (DType kvt : {DType::kF32, DType::kBF16, DType::kF16, DType::kI8}) {
      const int64_t B = 16, n_tok = 16 * 12 + 5;  // a partial last block
      KVCache cache(KVCacheShape{1, Hk, D, n_tok, B, kvt});
      const auto k = test::RandomVector(n_tok * Hk * D, 21),
                 v = test::RandomVector(n_tok * Hk * D, 22);
      cache.Write(0, 0, n_tok, k.data(), v.data());
      cache.SetSize(n_tok);
      const KVLayerView kv = cache.Layer(0);
      const auto q = test::RandomVector(H * D, 23, 2.0f);
      std::vector<std::vector<int32_t>> blocks(static_cast<size_t>(Hk));
      for (int64_t h = 0; h < Hk; ++h) blocks[h] = {1, 4, static_cast<int32_t>(5 + h), 12};
      for (bool remap : {false, true}) {
        // lse over exactly these blocks, from the attention kernel; remapped: each block scored
        // with its own further rotation of the query (q_per_block holds the rotated queries).
        AttnSpans spans;
        spans.offsets = {0};
        std::vector<float> inv_freq(static_cast<size_t>(D / 2)), qb;
        for (int64_t i = 0; i < D / 2; ++i)
          inv_freq[i] = static_cast<float>(std::pow(1000.0, -2.0 * i / static_cast<double>(D)));
        for (int64_t h = 0; h < Hk; ++h) {
          for (int32_t b : blocks[h]) {
            spans.spans.push_back({b * B, std::min<int64_t>((b + 1) * B, n_tok)});
            if (!remap) continue;
            const int64_t row = static_cast<int64_t>(spans.rot.size());
            spans.rot.push_back(static_cast<int32_t>(row));
            spans.rot_table.resize(spans.rot_table.size() + static_cast<size_t>(D));
            RotationRow(-37 * (row + 1), inv_freq.data(), D, &spans.rot_table[row * D]);
            qb.resize(qb.size() + static_cast<size_t>((H / Hk) * D));
            RotateRows(q.data() + h * (H / Hk) * D, H / Hk, D, &spans.rot_table[row * D],
                       qb.data() + qb.size() - (H / Hk) * D);
          }
          spans.offsets.push_back(static_cast<int64_t>(spans.spans.size()));
        }
        const float scale = 1.0f / std::sqrt(static_cast<float>(D));
        AttnArgs a{1, n_tok - 1, H, Hk, D, 0, scale};
        std::vector<float> out(H * D), lse(H);
        backend->Attention(q.data(), kv, a, &spans, out.data(), lse.data());
        BlockMassArgs args{q.data(), lse.data(), H, Hk, D, scale, &blocks};
        if (remap) args.q_per_block = qb.data();
        std::vector<std::vector<float>> f, r;
        fast::BlockMass(kv, args, &f, tc);
        ref::BlockMass(kv, args, &r, tc);
        for (int64_t h = 0; h < Hk; ++h) {
          double sum = 0;
          for (size_t i = 0; i < blocks[h].size(); ++i) {
            EXPECT_NEAR(f[h][i], r[h][i], 1e-4 * r[h][i] + 1e-7)
                << "H " << H << " D " << D << " " << DTypeName(kvt) << " head " << h << " block "
                << i;
            sum += r[h][i];
          }
          EXPECT_NEAR(sum, static_cast<double>(H / Hk), 1e-3)
              << DTypeName(kvt) << " remap " << remap;
        }
      }
    }
  }
}

// Retention: after a decode step, the selected blocks with the most attention mass (recomputed
// here from the step's plan), each followed by its successor, retain_blocks in all, are kept in
// the next selection, which still holds topk blocks; with retain_blocks = 0 nothing is kept.
TEST(Sparse, RetentionKeepsTheHighestMassBlocks) {
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  const int64_t H = 8, Hk = 2, D = 64, N = 600, B = 16;
  const Synthetic s = MakeSynthetic(H, Hk, D);
  const auto k = test::RandomVector((N + 2) * Hk * D, 31),
             v = test::RandomVector((N + 2) * Hk * D, 32);
  const auto q1 = test::RandomVector(H * D, 33);
  for (SelectMode m : {SelectMode::kLayer, SelectMode::kKVHead}) {
    for (int64_t retain : {0, 3}) {
      SparseConfig c;
      c.block_size = B;
      c.init_tokens = B;
      c.local_window = 64;
      c.topk = 12;
      c.retain_blocks = retain;
      c.select = m;
      c.dense_layers = 0;
      KVCache cache(KVCacheShape{1, Hk, D, N + 2, B, DType::kF32});
      cache.Write(0, 0, N + 2, k.data(), v.data());
      SparseAttention sp(s.cfg, c, *backend, tc, N + 2, DType::kF32);
      AttnArgs a{N, 0, H, Hk, D, 0, 1.0f / std::sqrt(static_cast<float>(D))};
      std::vector<float> out(N * H * D), lse(H);
      cache.SetSize(N);
      sp.BeginStep(StepInfo{0, N, N, true});
      sp.Attend(0, s.qp.data(), a, cache, out.data());
      // Step 0 at position N.
      cache.SetSize(N + 1);
      a.T = 1;
      a.pos0 = N;
      sp.BeginStep(StepInfo{N, 1, 1, true});
      sp.Attend(0, s.qd.data(), a, cache, out.data());
      const LayerPlan p0 = sp.last_plan(0);
      ASSERT_FALSE(p0.dense);
      // The first step keeps what the prompt's last query attended most (seeded at its end).
      EXPECT_EQ(p0.retained.size(), retain > 0 ? static_cast<size_t>(Hk) : 0u);
      for (size_t h = 0; h < p0.retained.size(); ++h) {
        EXPECT_EQ(p0.retained[h].size(), static_cast<size_t>(retain));
        for (int32_t b : p0.retained[h])
          EXPECT_TRUE(std::binary_search(p0.blocks[h].begin(), p0.blocks[h].end(), b));
      }
      // What step 0 should hand on: its lse over the plan's keys, then the block masses.
      AttnSpans spans;
      p0.ToSpans(Hk, &spans);
      backend->Attention(s.qd.data(), cache.Layer(0), a, &spans, out.data(), lse.data());
      std::vector<std::vector<float>> mass;
      ref::BlockMass(cache.Layer(0),
                     BlockMassArgs{s.qd.data(), lse.data(), H, Hk, D, a.scale, &p0.blocks}, &mass,
                     tc);
      // The heaviest blocks, each followed by its successor, `retain` in all.
      const auto want = test::KeptByMass(mass, p0.blocks, m == SelectMode::kLayer, retain);
      // Step 1 at position N + 1.
      cache.SetSize(N + 2);
      a.pos0 = N + 1;
      sp.BeginStep(StepInfo{N + 1, 1, 1, true});
      sp.Attend(0, q1.data(), a, cache, out.data());
      const LayerPlan& p1 = sp.last_plan(0);
      const std::string what = std::string(SelectModeName(m)) + " retain " + std::to_string(retain);
      if (retain == 0) {
        EXPECT_TRUE(p1.retained.empty()) << what;
        continue;
      }
      ASSERT_EQ(p1.retained.size(), static_cast<size_t>(Hk)) << what;
      for (int64_t h = 0; h < Hk; ++h) {
        EXPECT_EQ(p1.retained[h], want[h]) << what << " head " << h;
        EXPECT_EQ(p1.blocks[h].size(), static_cast<size_t>(c.topk)) << what;
        for (int32_t b : p1.retained[h])
          EXPECT_TRUE(std::binary_search(p1.blocks[h].begin(), p1.blocks[h].end(), b)) << what;
      }
    }
  }
}

}  // namespace
}  // namespace needle
