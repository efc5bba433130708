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
  KVCacheShape s;
  s.layers = cfg_.num_layers;
  s.kv_heads = cfg_.num_kv_heads;
  s.head_dim = cfg_.head_dim;
  s.capacity = capacity;
  s.block_size = block_size;
  s.dtype = kv_dtype;
  return s;
}

void Model::Forward(const int32_t* ids, int64_t T, KVCache& cache, bool all_logits,
                    std::vector<float>* logits) {
  if (logits == nullptr) {  // the cache alone (a prefix for later prompts)
    Run(ids, T, cache, false, nullptr, nullptr);
    return;
  }
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
  const AttentionPolicy::Prefill order =
      T > 1 ? attn_->PrefillOrder(T) : AttentionPolicy::Prefill{};
  if (order.layer_major) {
    RunLayerMajor(ids, T, cache, all_logits, logits_host, sel, order.residual_in_backend);
    return;
  }
  for (int64_t s = 0; s < T; s += ubatch_) {
    const int64_t n = std::min(ubatch_, T - s);
    const bool last = s + n == T;
    float* dst = nullptr;
    if (logits_host != nullptr && all_logits)
      dst = logits_host + s * V;
    else if (logits_host != nullptr && last)
      dst = logits_host;
    attn_->BeginStep(StepInfo{pos0 + s, n, T, last, pos0});
    Step(ids + s, n, pos0 + s, rope, cache, all_logits, dst, last ? sel : nullptr);
    cache.SetSize(pos0 + s + n);
    if (progress_) progress_(s + n, T);
  }
}

Model::Buffers::Buffers(Backend& b, const ModelConfig& c, int64_t T_)
    : T(T_),
      x(b, T * c.hidden_size),
      h(b, T * c.hidden_size),
      q(b, T * c.q_dim()),
      k(b, T * c.kv_dim()),
      v(b, T * c.kv_dim()),
      att(b, T * c.q_dim()),
      gate(b, T * c.intermediate_size),
      up(b, T * c.intermediate_size) {}

void Model::Step(const int32_t* ids, int64_t T, int64_t pos0, const RopeFreqs& rope, KVCache& cache,
                 bool all_logits, float* logits_host, const Selection* sel) {
  // Only the rows whose logits are wanted go through the final norm and the LM head.
  const bool want = logits_host != nullptr || sel != nullptr;
  const int64_t rows = !want ? 0 : (all_logits && sel == nullptr ? T : 1);
  Buffers* buf = nullptr;
  std::unique_ptr<Buffers> local;
  if (T == 1) {
    if (decode_ == nullptr) decode_ = std::make_unique<Buffers>(b_, cfg_, 1);
    buf = decode_.get();
    if (!(rows == 1 && RecordedDecode(ids, pos0, rope, cache)))
      StepBody(ids, T, pos0, rope, cache, *buf, rows);
  } else {
    local = std::make_unique<Buffers>(b_, cfg_, T);
    buf = local.get();
    StepBody(ids, T, pos0, rope, cache, *buf, rows);
  }
  attn_->StepQueued();
  if (!want) return;
  if (sel != nullptr)
    b_.TopK(buf->logits.get(), cfg_.vocab_size, sel->k, sel->vals, sel->ids);
  else
    b_.ToHost(buf->logits.get(), static_cast<size_t>(rows * cfg_.vocab_size), logits_host);
}

bool Model::RecordedDecode(const int32_t* ids, int64_t pos0, const RopeFreqs& rope,
                           KVCache& cache) {
  const uint64_t key = cache.id();
  if (attn_ != &dense_ || !b_.CanRecord() || key == unrecordable_) return false;
  // The recorded work cannot assign blocks (host memory): assign this step's now.
  for (int64_t l = 0; l < cfg_.num_layers; ++l) cache.AssignBlocks(l, pos0, 1);
  b_.SetStepInputs(ids, 1, pos0, rope.inv_freq);
  if (recording_ != nullptr && recorded_ == key && recording_->Replay()) return true;
  recording_.reset();
  recording_ = b_.Record([&] { StepBody(ids, 1, pos0, rope, cache, *decode_, 1); });
  if (recording_ != nullptr)
    recorded_ = key;
  else
    unrecordable_ = key;
  return true;  // Record ran the step either way
}

void Model::StepBody(const int32_t* ids, int64_t T, int64_t pos0, const RopeFreqs& rope,
                     KVCache& cache, Buffers& buf, int64_t logit_rows) {
  b_.Embed(w_.embed, ids, T, buf.x.get());
  for (int64_t l = 0; l < cfg_.num_layers; ++l)
    LayerBody(l, T, pos0, rope, cache, buf, buf.x.get());
  if (logit_rows > 0) Head(buf.x.get(), T, logit_rows, buf);
}

void Model::LayerBody(int64_t l, int64_t T, int64_t pos0, const RopeFreqs& rope, KVCache& cache,
                      Buffers& buf, float* x) {
  const ModelConfig& c = cfg_;
  const int64_t D = c.head_dim;
  const float eps = static_cast<float>(c.rms_norm_eps);
  float *h = buf.h.get(), *q = buf.q.get(), *k = buf.k.get(), *v = buf.v.get();
  const AttnArgs a = LayerAttnArgs(l, T, pos0, rope);
  const LayerWeights& L = w_.layers[static_cast<size_t>(l)];
  const KVTarget kv = attn_->Target(l, cache);
  const Backend::Projection qkv[3] = {{&L.wq, &L.bq, q}, {&L.wk, &L.bk, k}, {&L.wv, &L.bv, v}};
  if (c.qk_norm) {  // the q/k norms come between the projection and the rotation
    b_.Project(x, T, {&L.attn_norm, eps, h}, qkv, 3);
    b_.RmsNorm(q, T * c.num_heads, D, L.q_norm, eps, q);
    b_.RmsNorm(k, T * c.num_kv_heads, D, L.k_norm, eps, k);
    b_.RopeKVWrite(q, k, v, T, c.num_heads, *kv.cache, kv.layer, pos0, rope.inv_freq,
                   rope.attention_scaling);
  } else {
    b_.ProjectRopeKVWrite(x, T, {&L.attn_norm, eps, h}, qkv, c.num_heads, *kv.cache, kv.layer, pos0,
                          rope.inv_freq, rope.attention_scaling);
  }
  attn_->Attend(l, q, a, cache, buf.att.get());
  LayerTail(L, T, buf, x);
}

AttnArgs Model::LayerAttnArgs(int64_t l, int64_t T, int64_t pos0, const RopeFreqs& rope) const {
  AttnArgs a;
  a.T = T;
  a.pos0 = pos0;
  a.heads = cfg_.num_heads;
  a.kv_heads = cfg_.num_kv_heads;
  a.head_dim = cfg_.head_dim;
  a.scale = 1.0f / std::sqrt(static_cast<float>(cfg_.head_dim));
  a.inv_freq = rope.inv_freq.data();
  a.window = cfg_.sliding_window[static_cast<size_t>(l)];
  return a;
}

void Model::LayerTail(const LayerWeights& L, int64_t T, Buffers& buf, float* x) {
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  float *h = buf.h.get(), *gate = buf.gate.get(), *up = buf.up.get();
  b_.ProjectAdd(buf.att.get(), T, L.wo, &L.bo, x, h);
  b_.GateUp(x, T, {&L.mlp_norm, eps, h}, L.w_gate, &L.b_gate, L.w_up, &L.b_up, gate, up);
  b_.ProjectAdd(gate, T, L.w_down, &L.b_down, x, h);
}

void Model::Head(const float* x, int64_t T, int64_t rows, Buffers& buf) {
  const ModelConfig& c = cfg_;
  const float* last = x + (T - rows) * c.hidden_size;
  if (buf.logits.size() < static_cast<size_t>(rows * c.vocab_size))
    buf.logits = BackendBuffer(b_, static_cast<size_t>(rows * c.vocab_size));
  const Backend::Projection head{&w_.lm_head, nullptr, buf.logits.get()};
  b_.Project(last, rows, {&w_.final_norm, static_cast<float>(c.rms_norm_eps), buf.h.get()}, &head,
             1);
}

void Model::RunLayerMajor(const int32_t* ids, int64_t T, KVCache& cache, bool all_logits,
                          float* logits_host, const Selection* sel, bool residual_in_backend) {
  const int64_t pos0 = cache.size(), H = cfg_.hidden_size, V = cfg_.vocab_size;
  const RopeFreqs rope = ComputeRopeFreqs(cfg_, pos0 + T);
  const int64_t U = std::min(ubatch_, T);
  Buffers buf(b_, cfg_, U);
  // The residual stream of every token of the prompt: x of micro-batch s is rows [s, s + n), in
  // the backend (resident) or in host memory (host), whose micro-batches move in and out beside
  // the work (Backend::HostResidual).
  BackendBuffer resident;
  std::unique_ptr<Backend::HostResidual> host;
  if (residual_in_backend)
    resident = BackendBuffer(b_, static_cast<size_t>(T * H));
  else
    host = b_.MakeHostResidual(T, H, U);
  // Micro-batch s's x; next: the micro-batch that will be asked for after it (-1: none).
  const auto acquire = [&](int64_t s, bool fill, int64_t next) {
    if (residual_in_backend) return resident.get() + s * H;
    const int64_t n = std::min(U, T - s);
    return host->Acquire(s, n, fill, std::max<int64_t>(next, 0),
                         next < 0 ? 0 : std::min(U, T - next));
  };
  const auto release = [&](int64_t s) {
    if (!residual_in_backend) host->Release(s, std::min(U, T - s));
  };
  for (int64_t s = 0; s < T; s += U) {
    const int64_t n = std::min(U, T - s);
    float* x = acquire(s, false, -1);
    b_.Embed(w_.embed, ids + s, n, x);
    release(s);
  }
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    for (int64_t s = 0; s < T; s += U) {
      const int64_t n = std::min(U, T - s);
      // (The next micro-batch: of this layer, else the first of the next layer.)
      const int64_t next = s + U < T ? s + U : (l + 1 < cfg_.num_layers ? 0 : -1);
      float* x = acquire(s, true, next);
      attn_->BeginStep(StepInfo{pos0 + s, n, T, s + n == T, pos0});
      LayerBody(l, n, pos0 + s, rope, cache, buf, x);
      release(s);
    }
    if (progress_) progress_(T * (l + 1) / cfg_.num_layers, T);
  }
  cache.SetSize(pos0 + T);
  attn_->EndPrefill();
  const bool want = logits_host != nullptr || sel != nullptr;
  if (!want) return;
  if (all_logits && sel == nullptr) {
    for (int64_t s = 0; s < T; s += U) {
      const int64_t n = std::min(U, T - s);
      Head(acquire(s, true, s + U < T ? s + U : -1), n, n, buf);
      b_.ToHost(buf.logits.get(), static_cast<size_t>(n * V), logits_host + s * V);
      release(s);
    }
    return;
  }
  const int64_t s = (T - 1) / U * U;
  Head(acquire(s, true, -1), T - s, 1, buf);
  if (sel != nullptr)
    b_.TopK(buf.logits.get(), V, sel->k, sel->vals, sel->ids);
  else
    b_.ToHost(buf.logits.get(), static_cast<size_t>(V), logits_host);
}

std::unique_ptr<Model> LoadModel(const std::string& dir, Backend& backend,
                                 const BeforeUpload& before_upload) {
  ModelConfig cfg = LoadModelConfig(dir + "/config.json");
  MergeGenerationConfig(dir + "/generation_config.json", &cfg);
  ModelWeights w = LoadWeights(dir, cfg);
  if (before_upload) before_upload(cfg, w);
  return std::make_unique<Model>(std::move(cfg), std::move(w), backend);
}

std::unique_ptr<Model> MakeDummyModel(const std::string& config_path, DType dtype, Backend& backend,
                                      ThreadingContext& tc,
                                      const std::function<void(size_t, size_t)>& progress,
                                      const BeforeUpload& before_upload) {
  ModelConfig cfg = LoadModelConfig(config_path);
  ModelWeights w = MakeDummyWeights(cfg, dtype, 1234, tc, progress);
  if (before_upload) before_upload(cfg, w);
  return std::make_unique<Model>(std::move(cfg), std::move(w), backend);
}

}  // namespace needle
