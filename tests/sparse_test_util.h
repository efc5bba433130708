// Helpers of the sparse attention tests (test_sparse.cc, test_sparse_prompt.cc): a small budget,
// a run of prompt + decode tokens with or without a sparse policy, and comparisons.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/model/model.h"
#include "sparse_attn/sparse_attention.h"

namespace needle::test {

inline const std::string kFx = NEEDLE_FIXTURES_DIR;

// The attention shapes of a model without weights, for the planner's tests: `layers` layers of
// `heads` query heads over `kv_heads` KV heads of head_dim D, no sliding window.
inline ModelConfig AttentionShapes(int64_t layers, int64_t heads, int64_t kv_heads, int64_t D) {
  ModelConfig m;
  m.num_layers = layers, m.num_heads = heads, m.num_kv_heads = kv_heads, m.head_dim = D;
  m.hidden_size = heads * D;
  m.sliding_window.assign(static_cast<size_t>(layers), 0);
  return m;
}

// Small blocks and windows; topk covers every block of the tests' prompts.
inline SparseConfig SmallConfig(ReprType r, SelectMode m) {
  SparseConfig c;
  c.block_size = 4;
  c.init_tokens = 4;
  c.local_window = 8;
  c.topk = 1000;
  c.repr = r;
  c.repr_count = 2;
  c.obs_window = 8;
  c.select = m;
  c.dense_layers = 0;
  return c;
}

// Logits of a prompt (last row) and of `decode` fed tokens, dense or with a sparse policy.
inline std::vector<float> RunTokens(Model& m, const std::vector<int32_t>& prompt,
                                    const std::vector<int32_t>& decode, const SparseConfig* sc,
                                    ThreadingContext& tc, SparseAttention** policy_out = nullptr,
                                    std::unique_ptr<SparseAttention>* keep = nullptr) {
  const int64_t cap = static_cast<int64_t>(prompt.size() + decode.size());
  KVCache cache(m.CacheShape(cap, DType::kF32, sc ? sc->block_size : 128));
  std::unique_ptr<SparseAttention> sp;
  if (sc != nullptr) {
    sp = std::make_unique<SparseAttention>(m.config(), *sc, m.backend(), tc, cap, DType::kF32);
    sp->set_recall(true);
  }
  m.set_attention(sp.get());
  std::vector<float> all, step;
  m.Forward(prompt.data(), static_cast<int64_t>(prompt.size()), cache, false, &all);
  for (int32_t t : decode) {
    m.Forward(&t, 1, cache, false, &step);
    all.insert(all.end(), step.begin(), step.end());
  }
  m.set_attention(nullptr);
  if (policy_out != nullptr) *policy_out = sp.get();
  if (keep != nullptr) *keep = std::move(sp);
  return all;
}

inline std::vector<int32_t> Tokens(int n, int seed) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(3 + (i * 37 + seed * 11) % 250);
  return t;
}

// Largest |x|, and largest |a - b| over the first n entries.
// What retention keeps (the reference of SparseAttention's KeepByMass): per KV head, the blocks
// [kv_head][n] by descending mass [kv_head][n] (summed over KV heads when selecting per layer),
// each followed by its successor, `keep` in all, ascending.
template <typename T>
std::vector<std::vector<int32_t>> KeptByMass(const std::vector<std::vector<T>>& mass,
                                             const std::vector<std::vector<int32_t>>& blocks,
                                             bool per_layer, int64_t keep) {
  const size_t Hk = blocks.size();
  std::vector<std::vector<int32_t>> kept(Hk);
  for (size_t h = 0; h < Hk; ++h) {
    std::vector<T> mh = mass[h];  // (summed in T, as the planner sums)
    if (per_layer)
      for (size_t g = 0; g < Hk; ++g)
        if (g != h)
          for (size_t i = 0; i < mh.size(); ++i) mh[i] += mass[g][i];
    std::vector<size_t> order(mh.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return mh[x] > mh[y]; });
    for (size_t i : order)
      for (int32_t b : {blocks[h][i], blocks[h][i] + 1})
        if (static_cast<int64_t>(kept[h].size()) < keep &&
            std::find(kept[h].begin(), kept[h].end(), b) == kept[h].end())
          kept[h].push_back(b);
    std::sort(kept[h].begin(), kept[h].end());
  }
  return kept;
}

inline double MaxAbs(const std::vector<float>& x) {
  double m = 0;
  for (float v : x) m = std::max(m, static_cast<double>(std::fabs(v)));
  return m;
}
inline double MaxDiff(const std::vector<float>& a, const std::vector<float>& b, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, static_cast<double>(std::fabs(a[i] - b[i])));
  return m;
}

// f(fixture name, model, the model's dense logits of prompt + decode) for the two fixtures the
// sparse-equals-dense tests use.
inline void ForEachSparseFixture(
    ThreadingContext& tc, const std::vector<int32_t>& prompt, const std::vector<int32_t>& decode,
    const std::function<void(const char*, Model&, const std::vector<float>&)>& f) {
  for (const char* fx : {"/llama_llama3_hd128_f32", "/qwen2_bias_gqa7_f32"}) {
    auto backend = MakeCpuBackend(tc, false);
    auto model = LoadModel(kFx + fx, *backend);
    f(fx, *model, RunTokens(*model, prompt, decode, nullptr, tc));
  }
}

}  // namespace needle::test
