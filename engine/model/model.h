// The decoder-only transformer graph shared by every supported architecture (Llama, Mistral,
// Qwen2, Qwen3) and every backend: the architectures differ only in flags of ModelConfig (biases,
// q/k norm, sliding windows, rope scaling), the backends only behind the Backend interface.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/model/config.h"
#include "engine/model/rope.h"
#include "engine/model/weights.h"
#include "kvcache/kv_cache.h"

namespace needle {

// How one layer's queries attend to the cache. Dense attention is the default; the block-sparse
// attention of sparse_attn/ is another implementation of this interface.
// What the model is about to run: tokens [pos0, pos0 + T) of a Forward call of call_T tokens.
struct StepInfo {
  int64_t pos0 = 0;
  int64_t T = 0;
  int64_t call_T = 0;         // > 1: a prompt (prefill); 1: a decode step
  bool last_of_call = false;  // the call's final micro-batch (for prefill: the prompt is complete)
  int64_t call_pos0 = 0;      // position of the call's first token
};

// Where a layer's new keys and values are written: a cache and its layer index.
struct KVTarget {
  KVCache* cache;
  int64_t layer;
};

class AttentionPolicy {
 public:
  virtual ~AttentionPolicy() = default;
  virtual void BeginStep(const StepInfo&) {}
  // The step's work is queued (before the model waits for its logits): a policy with host work
  // of its own still running waits for it here, asleep, rather than leave the backend's wait to
  // spin on a core that work needs (the hybrid engine's host worker).
  virtual void StepQueued() {}
  // q: [T, heads, head_dim] (rotated); the cache holds keys [0, a.pos0 + a.T) of `layer`.
  // out: [T, heads, head_dim].
  virtual void Attend(int64_t layer, const float* q, const AttnArgs& a, KVCache& cache,
                      float* out) = 0;
  // Where `layer`'s new keys and values go during the coming step (default: the model's cache).
  // The hybrid engine sends a prompt's sparse layers to a staging cache on the GPU.
  virtual KVTarget Target(int64_t layer, KVCache& cache) { return {&cache, layer}; }
  // How a prompt of T tokens runs: false, micro-batch by micro-batch through every layer; true,
  // layer by layer (every micro-batch through layer l before layer l + 1: only one layer's keys
  // of the whole prompt need to be at hand at a time). Same arithmetic either way.
  struct Prefill {
    bool layer_major = false;
    bool residual_in_backend = true;  // layer-major: the residual stream [T, hidden] in backend
                                      // memory (else in host memory, a micro-batch at a time)
  };
  virtual Prefill PrefillOrder(int64_t /*T*/) const { return {}; }
  // A layer-major prompt is over (every layer ran; the model cache's size is set).
  virtual void EndPrefill() {}
  // The sequence of `cache` goes on from token `tokens` (<= cache.size()): a new sequence that
  // begins with the tokens cached before it (as `needle ask`'s questions begin with the
  // document). The cache is truncated there (KVCache::Truncate), and the policy's state of
  // later tokens is dropped.
  virtual void Rewind(KVCache& cache, int64_t tokens) { cache.Truncate(tokens); }
  // Whether Attend takes a cache in the backend's own memory (a GPU's): the hybrid engine's,
  // which attends there and in host memory of its own. Policies that read the cache's keys from
  // the host (sparse attention on the CPU) do not.
  virtual bool AttendsBackendMemory() const { return false; }
};

class DenseAttention final : public AttentionPolicy {
 public:
  explicit DenseAttention(Backend& b) : b_(b) {}
  void Attend(int64_t layer, const float* q, const AttnArgs& a, KVCache& cache,
              float* out) override {
    b_.Attention(q, cache.Layer(layer), a, nullptr, out, nullptr);
  }

 private:
  Backend& b_;
};

class Model {
 public:
  Model(ModelConfig cfg, ModelWeights weights, Backend& backend);

  const ModelConfig& config() const { return cfg_; }
  // Replaces the EOS ids that generation stops at (e.g. none, for --ignore-eos).
  void set_eos_token_ids(std::vector<int64_t> ids) { cfg_.eos_token_ids = std::move(ids); }
  const ModelWeights& weights() const { return w_; }
  Backend& backend() { return b_; }
  void set_attention(AttentionPolicy* p) { attn_ = p != nullptr ? p : &dense_; }
  // Called after each micro-batch of a Forward call with (tokens done, tokens in the call).
  void set_progress(std::function<void(int64_t, int64_t)> f) { progress_ = std::move(f); }
  // Drops the recorded decode step (the next one records again): for benchmarks and tests that
  // change the backend's kernels between steps of one cache.
  void ResetRecording() {
    recording_.reset();
    recorded_ = unrecordable_ = 0;
  }
  // Tokens processed per internal step of a long prompt (bounds activation memory).
  void set_ubatch(int64_t n) { ubatch_ = n > 0 ? n : 512; }
  int64_t ubatch() const { return ubatch_; }

  KVCacheShape CacheShape(int64_t capacity, DType kv_dtype, int64_t block_size = 128) const;

  // Runs ids[T] at positions [cache.size(), cache.size() + T) and appends them to the cache.
  // logits (host): [T, vocab] when all_logits, else [1, vocab] for the last token; nullptr: none
  // (the cache alone).
  void Forward(const int32_t* ids, int64_t T, KVCache& cache, bool all_logits,
               std::vector<float>* logits);
  // The same, returning the greedy next token (first maximum of the last token's logits),
  // chosen by the backend where the logits are (on the GPU, only the id is copied back).
  int32_t ForwardGreedy(const int32_t* ids, int64_t T, KVCache& cache);
  // The same, returning the last token's k largest logits (descending, ties: lower id first):
  // vals[k], top_ids[k], selected where the logits are.
  void ForwardTopK(const int32_t* ids, int64_t T, KVCache& cache, int64_t k, float* vals,
                   int32_t* top_ids);
  // One decode token for each of n sequences in one step (continuous batching's decode rows):
  // row i is ids[i] at position caches[i]->size() of its own cache (caches may share a
  // BlockPool), appended there. The projections, the MLP and the LM head are one product over
  // the n rows; RoPE, the K/V write and attention run per sequence through its own block table.
  // next[i]: the greedy next token of row i (as ForwardGreedy's). logits (optional, host):
  // [n, vocab]. policies (optional): row i's attention policy (its own sequence's state, e.g. a
  // SparseAttention; null: dense), stepped for its row alone; on a backend whose caches live
  // outside host memory (the GPU), dense attention only for now. The model's own policy
  // (set_attention) must be the default.
  void ForwardBatch(const int32_t* ids, int64_t n, KVCache* const* caches, int32_t* next,
                    std::vector<float>* logits = nullptr,
                    AttentionPolicy* const* policies = nullptr);

 private:
  // What a forward call returns: every row's logits (logits_host), or the last row's top k.
  struct Selection {
    int64_t k = 0;
    float* vals = nullptr;  // may be null
    int32_t* ids = nullptr;
  };
  // The activations of a step of T tokens (backend memory); logits [rows, vocab] on demand.
  struct Buffers {
    Buffers(Backend& b, const ModelConfig& c, int64_t T);
    int64_t T;
    BackendBuffer x, h, q, k, v, att, gate, up, logits;
  };
  void Run(const int32_t* ids, int64_t T, KVCache& cache, bool all_logits, float* logits_host,
           const Selection* sel);
  // A prompt layer by layer (AttentionPolicy::PrefillOrder).
  void RunLayerMajor(const int32_t* ids, int64_t T, KVCache& cache, bool all_logits,
                     float* logits_host, const Selection* sel, bool residual_in_backend);
  // One layer of a step of T tokens: x [T, hidden] (backend memory) in, updated in place; buf
  // holds the layer's other activations.
  void LayerBody(int64_t l, int64_t T, int64_t pos0, const RopeFreqs& rope, KVCache& cache,
                 Buffers& buf, float* x);
  // The attention arguments of layer l for T queries from pos0.
  AttnArgs LayerAttnArgs(int64_t l, int64_t T, int64_t pos0, const RopeFreqs& rope) const;
  // A layer after its attention: o projection and MLP, each added to x [T, hidden]; reads
  // buf.att [T, q_dim].
  void LayerTail(const LayerWeights& L, int64_t T, Buffers& buf, float* x);
  // Final norm and LM head of the last `rows` of x [T, hidden] into buf.logits.
  void Head(const float* x, int64_t T, int64_t rows, Buffers& buf);
  void Step(const int32_t* ids, int64_t T, int64_t pos0, const RopeFreqs& rope, KVCache& cache,
            bool all_logits, float* logits_host, const Selection* sel);
  // The device work of a step: the layers, then the final norm and LM head of the last
  // `logit_rows` tokens into buf.logits (none when 0).
  void StepBody(const int32_t* ids, int64_t T, int64_t pos0, const RopeFreqs& rope, KVCache& cache,
                Buffers& buf, int64_t logit_rows);
  // A decode step through the backend's recording (CUDA graph) of it; false when the backend
  // cannot record this step (nothing done).
  bool RecordedDecode(const int32_t* ids, int64_t pos0, const RopeFreqs& rope, KVCache& cache);

  ModelConfig cfg_;
  ModelWeights w_;
  Backend& b_;
  DenseAttention dense_;
  AttentionPolicy* attn_;
  int64_t ubatch_ = 512;
  std::function<void(int64_t, int64_t)> progress_;
  // Decode (T = 1) keeps its activations, so that a recording of the step stays valid.
  std::unique_ptr<Buffers> decode_;
  // The recorded decode step and the cache it was recorded for (KVCache::id: a new cache may
  // reuse a freed one's addresses); a cache the backend could not record for is remembered so
  // that it is not tried every step. 0: none.
  std::unique_ptr<Backend::Recording> recording_;
  uint64_t recorded_ = 0, unrecordable_ = 0;
};

// Loads config.json (+ generation_config.json) and the safetensors weights of a model folder.
// before_upload (optional) sees the configuration and the weights in host memory before the
// backend copies them anywhere: the place to refuse what will not fit (the hybrid's GPU budget).
using BeforeUpload = std::function<void(const ModelConfig&, const ModelWeights&)>;
std::unique_ptr<Model> LoadModel(const std::string& dir, Backend& backend,
                                 const BeforeUpload& before_upload = nullptr);
// Builds a model of config.json's shapes with random weights of `dtype`.
// progress: as MakeDummyWeights's.
std::unique_ptr<Model> MakeDummyModel(const std::string& config_path, DType dtype, Backend& backend,
                                      ThreadingContext& tc,
                                      const std::function<void(size_t, size_t)>& progress = nullptr,
                                      const BeforeUpload& before_upload = nullptr);

}  // namespace needle
