// Retention's block masses handed over late (PlanExecutor::TakesLateMass / LateMass, what the
// hybrid engine's device placement does so that the host need not wait for the GPU at every
// layer): the planner's plans over many decode steps are the same as with the masses at once.
#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "sparse_attn/block_mass.h"
#include "sparse_attn/sparse_attention.h"
#include "tests/sparse_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

// The CPU executor, but every step's masses come from LateMass, computed then from the query and
// lse it kept (so a planner that used them before asking, or with other blocks, would differ).
class LateExecutor final : public CpuPlanExecutor {
 public:
  LateExecutor(Backend& b, ThreadingContext& tc, int64_t layers)
      : CpuPlanExecutor(b), b_(b), tc_(tc), kept_(layers) {}
  bool TakesLateMass(int64_t, const LayerPlan&) override { return take_ = true; }
  bool Planned(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv,
               const LayerPlan& plan, float* out, float* lse,
               std::vector<std::vector<float>>* mass) override {
    EXPECT_TRUE(take_ ? mass == nullptr : true);
    plan.ToSpans(a.kv_heads, &spans_, a.inv_freq, a.head_dim);
    Kept& k = kept_[static_cast<size_t>(layer)];
    k.q.assign(q, q + a.heads * a.head_dim);
    k.lse.assign(static_cast<size_t>(a.heads), 0.f);
    k.a = a, k.kv = kv;
    b_.Attention(q, kv, a, &spans_, out, k.lse.data());
    if (!take_)
      std::copy(k.lse.begin(), k.lse.end(), lse);
    else
      std::fill(lse, lse + a.heads, -1e30f);  // (not to be read)
    take_ = false;
    return false;
  }
  void LateMass(int64_t layer, const std::vector<std::vector<int32_t>>& blocks, float* lse,
                std::vector<std::vector<float>>* mass) override {
    const Kept& k = kept_[static_cast<size_t>(layer)];
    std::copy(k.lse.begin(), k.lse.end(), lse);
    fast::BlockMass(k.kv,
                    BlockMassArgs{k.q.data(), k.lse.data(), k.a.heads, k.a.kv_heads, k.a.head_dim,
                                  k.a.scale, &blocks},
                    mass, tc_);
    ++late;
  }
  int64_t late = 0;

 private:
  struct Kept {
    std::vector<float> q, lse;
    AttnArgs a;
    KVLayerView kv;
  };
  Backend& b_;
  ThreadingContext& tc_;
  std::vector<Kept> kept_;
  AttnSpans spans_;
  bool take_ = false;
};

TEST(LateMass, SamePlansAsMassesAtOnce) {
  const int64_t D = 16, Hk = 2, H = 8, B = 4, N = 120, steps = 24, L = 2;
  const ModelConfig m = test::AttentionShapes(L, H, Hk, D);
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  const int64_t T = N + steps;
  const auto k = test::RandomVector(L * T * Hk * D, 21), v = test::RandomVector(L * T * Hk * D, 22);
  const auto q = test::RandomVector(L * T * H * D, 23, 2.f);
  KVCache cache(KVCacheShape{L, Hk, D, T, B, DType::kF32});
  for (int64_t l = 0; l < L; ++l)
    cache.Write(l, 0, T, k.data() + l * T * Hk * D, v.data() + l * T * Hk * D);
  for (SelectMode sm : {SelectMode::kKVHead, SelectMode::kLayer}) {
    SparseConfig c;
    c.block_size = B, c.init_tokens = 4, c.local_window = 8, c.topk = 6, c.dense_layers = 0;
    c.retain_blocks = 3, c.select = sm;
    std::string plans[2];
    int64_t late = 0;
    for (int run = 0; run < 2; ++run) {
      SparseAttention sp(m, c, *backend, tc, T, DType::kF32);
      LateExecutor ex(*backend, tc, L);
      if (run == 1) sp.set_executor(&ex);
      std::ostringstream plan;
      sp.set_plan_sink(&plan);
      std::vector<float> out(static_cast<size_t>(N * H * D));
      sp.BeginStep(StepInfo{0, N, N, true, 0});
      for (int64_t l = 0; l < L; ++l)
        sp.Attend(l, q.data() + l * T * H * D, AttnArgs{N, 0, H, Hk, D, 0, 0.25f}, cache,
                  out.data());
      for (int64_t p = N; p < T; ++p) {
        sp.BeginStep(StepInfo{p, 1, 1, true, p});
        for (int64_t l = 0; l < L; ++l)
          sp.Attend(l, q.data() + (l * T + p) * H * D, AttnArgs{1, p, H, Hk, D, 0, 0.25f}, cache,
                    out.data());
      }
      plans[run] = plan.str();
      late = ex.late;
    }
    EXPECT_GE(late, (steps - 1) * L) << SelectModeName(sm);
    EXPECT_NE(plans[0].find("\"retained\""), std::string::npos);
    EXPECT_EQ(plans[1], plans[0]) << SelectModeName(sm);
  }
}

}  // namespace
}  // namespace needle
