#include "engine/model/model.h"

#include <algorithm>
#include <cmath>

#include "engine/base/error.h"

namespace needle {

Model::Model(ModelConfig cfg, ModelWeights weights, Backend& backend)
    : cfg_(std::move(cfg)), w_(std::move(weights)), b_(backend), dense_(backend), attn_(&dense_) {
  NEEDLE_CHECK(static_cast<int64_t>(w_.layers.size()) == cfg_.num_layers);
  b_.PrepareWeights(w_);
}

KVCacheShape Model::CacheShape(int64_t capacity, DType kv_dtype, int64_t block_size) const {
  return KVCacheShape{cfg_.num_layers, cfg_.num_kv_heads, cfg_.head_dim,
                      capacity,        block_size,        kv_dtype};
}

void Model::Forward(const int32_t* ids, int64_t T, KVCache& cache, bool all_logits,
                    std::vector<float>* logits) {
  logits->assign(static_cast<size_t>((all_logits ? std::max<int64_t>(T, 0) : 1) * cfg_.vocab_size),
                 0.0f);
  Run(ids, T, cache, all_logits, logits->data(), nullptr);
}

int32_t Model::ForwardGreedy(const int32_t* ids, int64_t T, KVCache& cache) {
  int32_t next = 0;
  const Selection sel{1, nullptr, &next};
  Run(ids, T, cache, false, nullptr, &sel);
  return next;
}

void Model::ForwardTopK(const int32_t* ids, int64_t T, KVCache& cache, int64_t k, float* vals,
                        int32_t* top_ids) {
  if (k <= 0 || k > cfg_.vocab_size)
    Fail("top-k selection: k = ", k, " is outside [1, ", cfg_.vocab_size, "]");
  const Selection sel{k, vals, top_ids};
  Run(ids, T, cache, false, nullptr, &sel);
}

void Model::Run(const int32_t* ids, int64_t T, KVCache& cache, bool all_logits, float* logits_host,
                const Selection* sel) {
  if (T <= 0) Fail("forward: no tokens to process");
  const int64_t pos0 = cache.size();
  if (pos0 + T > cache.shape().capacity)
    Fail("context overflow: ", pos0, " cached + ", T, " new tokens exceed the context of ",
         cache.shape().capacity, " tokens");
  for (int64_t t = 0; t < T; ++t)
    if (ids[t] < 0 || ids[t] >= cfg_.vocab_size)
      Fail("token id ", ids[t], " at index ", t, " is outside the vocabulary [0, ", cfg_.vocab_size,
           ")");
  // Like transformers, one forward call rotates all of its tokens with the frequencies of the
  // sequence length it ends at (only dynamic NTK scaling depends on it).
  const RopeFreqs rope = ComputeRopeFreqs(cfg_, pos0 + T);
  const int64_t V = cfg_.vocab_size;
  for (int64_t s = 0; s < T; s += ubatch_) {
    const int64_t n = std::min(ubatch_, T - s);
    const bool last = s + n == T;
    float* dst = nullptr;
    if (logits_host != nullptr && all_logits)
      dst = logits_host + s * V;
    else if (logits_host != nullptr && last)
      dst = logits_host;
    attn_->BeginStep(StepInfo{pos0 + s, n, T, last});
    Step(ids + s, n, pos0 + s, rope, cache, all_logits, dst, last ? sel : nullptr);
    cache.SetSize(pos0 + s + n);
    if (progress_) progress_(s + n, T);
  }
}

void Model::Step(const int32_t* ids, int64_t T, int64_t pos0, const RopeFreqs& rope, KVCache& cache,
                 bool all_logits, float* logits_host, const Selection* sel) {
  const ModelConfig& c = cfg_;
  const int64_t H = c.hidden_size, Q = c.q_dim(), KVd = c.kv_dim(), I = c.intermediate_size;
  const int64_t D = c.head_dim;
  BackendBuffer x(b_, T * H), h(b_, T * H), q(b_, T * Q), k(b_, T * KVd), v(b_, T * KVd),
      att(b_, T * Q), gate(b_, T * I), up(b_, T * I);

  b_.Embed(w_.embed, ids, T, x.get());
  AttnArgs a;
  a.T = T;
  a.pos0 = pos0;
  a.heads = c.num_heads;
  a.kv_heads = c.num_kv_heads;
  a.head_dim = D;
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = w_.layers[static_cast<size_t>(l)];
    b_.RmsNorm(x.get(), T, H, L.attn_norm, static_cast<float>(c.rms_norm_eps), h.get());
    b_.MatMul(h.get(), T, L.wq, &L.bq, q.get());
    b_.MatMul(h.get(), T, L.wk, &L.bk, k.get());
    b_.MatMul(h.get(), T, L.wv, &L.bv, v.get());
    if (c.qk_norm) {
      b_.RmsNorm(q.get(), T * c.num_heads, D, L.q_norm, static_cast<float>(c.rms_norm_eps),
                 q.get());
      b_.RmsNorm(k.get(), T * c.num_kv_heads, D, L.k_norm, static_cast<float>(c.rms_norm_eps),
                 k.get());
    }
    b_.Rope(q.get(), T, c.num_heads, D, pos0, rope.inv_freq, rope.attention_scaling);
    b_.Rope(k.get(), T, c.num_kv_heads, D, pos0, rope.inv_freq, rope.attention_scaling);
    b_.KVWrite(cache, l, pos0, T, k.get(), v.get());
    a.window = c.sliding_window[static_cast<size_t>(l)];
    attn_->Attend(l, q.get(), a, cache, att.get());
    b_.MatMul(att.get(), T, L.wo, &L.bo, h.get());
    b_.Add(x.get(), h.get(), T * H);

    b_.RmsNorm(x.get(), T, H, L.mlp_norm, static_cast<float>(c.rms_norm_eps), h.get());
    b_.MatMul(h.get(), T, L.w_gate, &L.b_gate, gate.get());
    b_.MatMul(h.get(), T, L.w_up, &L.b_up, up.get());
    b_.SiluMul(gate.get(), up.get(), T * I, gate.get());
    b_.MatMul(gate.get(), T, L.w_down, &L.b_down, h.get());
    b_.Add(x.get(), h.get(), T * H);
  }
  if (logits_host == nullptr && sel == nullptr) return;
  // Only the rows whose logits are wanted go through the final norm and the LM head.
  const int64_t rows = all_logits && sel == nullptr ? T : 1;
  const float* last = x.get() + (T - rows) * H;
  b_.RmsNorm(last, rows, H, w_.final_norm, static_cast<float>(c.rms_norm_eps), h.get());
  BackendBuffer lg(b_, rows * c.vocab_size);
  b_.MatMul(h.get(), rows, w_.lm_head, nullptr, lg.get());
  if (sel != nullptr)
    b_.TopK(lg.get(), c.vocab_size, sel->k, sel->vals, sel->ids);
  else
    b_.ToHost(lg.get(), static_cast<size_t>(rows * c.vocab_size), logits_host);
}

std::unique_ptr<Model> LoadModel(const std::string& dir, Backend& backend) {
  ModelConfig cfg = LoadModelConfig(dir + "/config.json");
  MergeGenerationConfig(dir + "/generation_config.json", &cfg);
  ModelWeights w = LoadWeights(dir, cfg);
  return std::make_unique<Model>(std::move(cfg), std::move(w), backend);
}

std::unique_ptr<Model> MakeDummyModel(const std::string& config_path, DType dtype, Backend& backend,
                                      ThreadingContext& tc) {
  ModelConfig cfg = LoadModelConfig(config_path);
  ModelWeights w = MakeDummyWeights(cfg, dtype, 1234, tc);
  return std::make_unique<Model>(std::move(cfg), std::move(w), backend);
}

}  // namespace needle
