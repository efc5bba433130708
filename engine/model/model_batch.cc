// Model::ForwardBatch: decode rows of several sequences in one step (model.h).
#include <algorithm>
#include <cmath>

#include "engine/base/error.h"
#include "engine/model/model.h"

namespace needle {

void Model::ForwardBatch(const int32_t* ids, int64_t n, KVCache* const* caches, int32_t* next,
                         std::vector<float>* logits, AttentionPolicy* const* policies) {
  if (n <= 0) Fail("batched decode: no sequences");
  if (attn_ != &dense_)
    Fail("batched decode: the model has a policy set; pass each row's policy instead");
  const auto policy = [&](int64_t i) -> AttentionPolicy& {
    return policies != nullptr && policies[i] != nullptr ? *policies[i] : dense_;
  };
  if (policies != nullptr && b_.kv_memory() != nullptr)
    for (int64_t i = 0; i < n; ++i)
      if (policies[i] != nullptr && !policies[i]->AttendsBackendMemory())
        Fail("batched decode: sequence ", i, "'s attention reads host memory; its cache is in ",
             b_.kv_memory()->Name());
  const ModelConfig& c = cfg_;
  const int64_t V = c.vocab_size, D = c.head_dim, H = c.num_heads, Hk = c.num_kv_heads;
  std::vector<RopeFreqs> rope;  // per sequence: dynamic scaling depends on its length
  rope.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    KVCache& cache = *caches[i];
    const int64_t p = cache.size();
    if (p + 1 > cache.shape().capacity)
      Fail("context overflow: sequence ", i, " of the batch has ", p,
           " cached tokens, its context is ", cache.shape().capacity);
    if (ids[i] < 0 || ids[i] >= V)
      Fail("token id ", ids[i], " of sequence ", i, " is outside the vocabulary [0, ", V, ")");
    for (int64_t j = 0; j < i; ++j)
      if (caches[j] == caches[i]) Fail("batched decode: sequence ", i, " repeats sequence ", j);
    rope.push_back(ComputeRopeFreqs(c, p + 1));
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = caches[i]->size();
    policy(i).BeginStep(StepInfo{p, 1, 1, true, p});
  }
  // Every row dense with one set of frequencies: the rows' rotary embedding, cache writes and
  // attention may go to the backend together (Backend::DecodeRows).
  bool together = true;
  for (int64_t i = 0; i < n; ++i)
    together &= (policies == nullptr || policies[i] == nullptr) &&
                rope[i].inv_freq == rope[0].inv_freq &&
                rope[i].attention_scaling == rope[0].attention_scaling;
  Buffers buf(b_, c, n);
  float *x = buf.x.get(), *h = buf.h.get(), *q = buf.q.get(), *k = buf.k.get(), *v = buf.v.get();
  const float eps = static_cast<float>(c.rms_norm_eps);
  b_.Embed(w_.embed, ids, n, x);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = w_.layers[static_cast<size_t>(l)];
    const Backend::Projection qkv[3] = {{&L.wq, &L.bq, q}, {&L.wk, &L.bk, k}, {&L.wv, &L.bv, v}};
    b_.Project(x, n, {&L.attn_norm, eps, h}, qkv, 3);  // q [n, H, D], k and v [n, Hk, D]
    if (c.qk_norm) {
      b_.RmsNorm(q, n * H, D, L.q_norm, eps, q);
      b_.RmsNorm(k, n * Hk, D, L.k_norm, eps, k);
    }
    if (together &&
        b_.DecodeRows(q, k, v, n, caches, l, LayerAttnArgs(l, 1, caches[0]->size(), rope[0]),
                      rope[0].inv_freq, rope[0].attention_scaling, buf.att.get())) {
      LayerTail(L, n, buf, x);
      continue;
    }
    for (int64_t i = 0; i < n; ++i) {
      KVCache& cache = *caches[i];
      const int64_t p = cache.size();
      float* qi = q + i * H * D;
      const KVTarget kv = policy(i).Target(l, cache);
      b_.RopeKVWrite(qi, k + i * Hk * D, v + i * Hk * D, 1, H, *kv.cache, kv.layer, p,
                     rope[i].inv_freq, rope[i].attention_scaling);
      const AttnArgs a = LayerAttnArgs(l, 1, p, rope[i]);
      policy(i).Attend(l, qi, a, cache, buf.att.get() + i * H * D);
    }
    LayerTail(L, n, buf, x);
  }
  Head(x, n, n, buf);
  b_.ArgmaxRows(buf.logits.get(), n, V, next);
  for (int64_t i = 0; i < n; ++i) caches[i]->SetSize(caches[i]->size() + 1);
  if (logits != nullptr) {
    logits->resize(static_cast<size_t>(n * V));
    b_.ToHost(buf.logits.get(), static_cast<size_t>(n * V), logits->data());
  }
}

}  // namespace needle
