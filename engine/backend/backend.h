// The seam between the model graph (engine/model/model.cc, written once) and the hardware.
// A backend owns where activations live and implements every operator the graph calls.
// CpuBackend runs the Highway/oneTBB kernels (or the scalar reference ones); the CUDA backend
// is a second implementation of this same interface. Pointers passed to the operators are
// backend memory obtained from Alloc (host memory for the CPU backend, device memory for CUDA).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "engine/cpu/ops.h"
#include "engine/model/weights.h"
#include "kvcache/kv_cache.h"

namespace needle {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* Name() const = 0;

  // Makes the weights usable by this backend (the CPU uses the mappings in place; a GPU backend
  // copies them to device memory and re-points the views).
  virtual void PrepareWeights(ModelWeights& w) = 0;

  // Activation memory: n floats.
  virtual float* Alloc(size_t n) = 0;
  virtual void Free(float* p) = 0;
  virtual void ToHost(const float* src, size_t n, float* host_dst) = 0;
  // Host memory this backend copies to and from fastest (pinned for a GPU): n floats.
  virtual float* AllocHost(size_t n) { return new float[n]; }
  virtual void FreeHost(float* p) { delete[] p; }
  virtual void FromHost(const float* host_src, size_t n, float* dst) = 0;
  // The k largest of logits[V] (one row), by descending value, ties: lower id first, chosen
  // where the logits live: host_ids[k] and, unless null, host_vals[k]. k = 1 is greedy argmax.
  virtual void TopK(const float* logits, int64_t V, int64_t k, float* host_vals,
                    int32_t* host_ids) = 0;
  // Where this backend's KV caches must live (nullptr: host DRAM).
  virtual KVMemory* kv_memory() { return nullptr; }
  // Decode kernels for batches (the Engine turns this on): every row's results are independent of
  // the rows beside it whichever kernels run (batch size never changes an answer), but a backend
  // may have kernels faster for one row and others faster for many; on, every decode step (one
  // row or many) takes the latter, so a sequence gets the same bits alone in the Engine as in any
  // batch of it. The CPU's kernels are the same either way.
  virtual void PreferBatchKernels(bool on) { (void)on; }

  // ids: host array [T]; out: [T, hidden]
  virtual void Embed(const Weight& table, const int32_t* ids, int64_t T, float* out) = 0;
  virtual void MatMul(const float* x, int64_t T, const Weight& w, const Weight* bias, float* y) = 0;
  virtual void RmsNorm(const float* x, int64_t rows, int64_t D, const Weight& w, float eps,
                       float* y) = 0;
  virtual void Rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t pos0,
                    const std::vector<float>& inv_freq, float scaling) = 0;
  virtual void SiluMul(const float* gate, const float* up, int64_t n, float* out) = 0;
  virtual void Add(float* x, const float* y, int64_t n) = 0;
  // Appends k, v: [T, kv_heads, head_dim] at positions [pos0, pos0 + T) of `layer`.
  virtual void KVWrite(KVCache& cache, int64_t layer, int64_t pos0, int64_t T, const float* k,
                       const float* v) = 0;
  // See ops.h: spans == nullptr is dense causal attention; lse (optional) [T, heads].
  virtual void Attention(const float* q, const KVLayerView& kv, const AttnArgs& a,
                         const AttnSpans* spans, float* out, float* lse) = 0;

  // Fused forms of operator sequences of the graph. The defaults (backend.cc) run the operators
  // above in sequence, so a backend that keeps them computes exactly what the sequence does; the
  // CUDA backend overrides them for decode, one kernel each (engine/cuda/gemv.h).
  struct Projection {
    const Weight* w;     // [N, K]
    const Weight* bias;  // [N] or nullptr / absent
    float* y;            // [T, N]
  };
  // The RMSNorm that precedes a product, fused into it: the product reads
  // x' = x * rsqrt(mean(x^2) + eps) * w instead of x. The defaults write x' to scratch [T, K]
  // (RmsNorm) and multiply that. w == nullptr: no norm.
  struct InputNorm {
    const Weight* w = nullptr;  // [K]
    float eps = 0.f;
    float* scratch = nullptr;  // [T, K]
  };
  // y_i = x'[T, K] W_i^T + b_i for n projections of the same input (q, k, v; the LM head).
  virtual void Project(const float* x, int64_t T, const InputNorm& norm, const Projection* p,
                       int n);
  // y[T, N] += x[T, K] W^T + b (the residual add after a projection); scratch: [T, N].
  virtual void ProjectAdd(const float* x, int64_t T, const Weight& w, const Weight* bias, float* y,
                          float* scratch);
  // out[T, I] = silu(x' Wg^T + bg) * (x' Wu^T + bu); scratch: [T, I].
  virtual void GateUp(const float* x, int64_t T, const InputNorm& norm, const Weight& wg,
                      const Weight* bg, const Weight& wu, const Weight* bu, float* out,
                      float* scratch);
  // Rope of q [T, heads, D] and k [T, kv_heads, D] in place, then KVWrite of k and v.
  virtual void RopeKVWrite(float* q, float* k, const float* v, int64_t T, int64_t heads,
                           KVCache& cache, int64_t layer, int64_t pos0,
                           const std::vector<float>& inv_freq, float scaling);

  // RopeKVWrite and dense Attention of one decode step of n sequences at once (Model::
  // ForwardBatch): row i is q [heads, D] at q + i * heads * D, k and v [kv_heads, D] at
  // k + i * kv_heads * D, written at position caches[i]->size() of `layer` of its cache (every
  // cache one pool's), then attended over that cache into out [n, heads, D]; a: what the rows
  // share (heads, scale, window; pos0 unused); one set of frequencies. Each row gets the same bits
  // in any batch, a batch of one included (not necessarily Attention's: the CUDA backend cuts a
  // row's keys into longer splits). Returns false, having done nothing, where the backend has no
  // kernels for rows together (the default: the caller then runs them one by one).
  virtual bool DecodeRows(float* q, float* k, const float* v, int64_t n, KVCache* const* caches,
                          int64_t layer, const AttnArgs& a, const std::vector<float>& inv_freq,
                          float scaling, float* out) {
    (void)q, (void)k, (void)v, (void)n, (void)caches, (void)layer, (void)a, (void)inv_freq;
    (void)scaling, (void)out;
    return false;
  }
  // TopK with k = 1 (greedy argmax) of n rows, logits [n, V]: host_ids [n].
  virtual void ArgmaxRows(const float* logits, int64_t n, int64_t V, int32_t* host_ids) {
    for (int64_t i = 0; i < n; ++i) TopK(logits + i * V, V, 1, nullptr, host_ids + i);
  }

  // Project of q, k, v (qkv[3]) followed by RopeKVWrite of them: the q/k/v projection with the
  // rotary embedding and the cache write folded in (models without q/k norms).
  virtual void ProjectRopeKVWrite(const float* x, int64_t T, const InputNorm& norm,
                                  const Projection* qkv, int64_t heads, KVCache& cache,
                                  int64_t layer, int64_t pos0, const std::vector<float>& inv_freq,
                                  float scaling);

  // Recording one decode step's device work and replaying it (the CUDA backend's CUDA graphs).
  // While `body` runs inside Record, the operators read the token ids and the position from the
  // step inputs (SetStepInputs, read on the device when the work runs) instead of their
  // arguments, so one recording serves every later step of the same cache. Record runs body once
  // (the step's work is done when it returns) and returns the recording, or nullptr when this
  // backend or this body cannot be recorded. The KV blocks of the step must be assigned before
  // (KVCache::AssignBlocks): recorded work cannot touch host memory.
  class Recording {
   public:
    virtual ~Recording() = default;
    // Enqueues the recorded work; false (nothing enqueued) when it went stale (buffers it uses
    // were reallocated since): record again.
    virtual bool Replay() = 0;
  };
  virtual bool CanRecord() const { return false; }

  // A layer-major prompt's residual stream [rows, cols] kept in host memory (Model::RunLayerMajor,
  // when it does not fit the backend): its micro-batches go to the backend and back. A GPU backend
  // moves them on copy queues of their own, the next micro-batch's rows beside the current one's
  // work. The stream's rows are only ever read and written through it.
  class HostResidual {
   public:
    virtual ~HostResidual() = default;
    // Rows [s, s + n) in backend memory for the work queued after this call: loaded from the
    // stream (fill) or left as they are (the caller writes them). next_s, next_n: the rows the
    // next Acquire will ask for (n = 0: none), which may be loaded beside this one's work.
    virtual float* Acquire(int64_t s, int64_t n, bool fill, int64_t next_s, int64_t next_n) = 0;
    // The rows Acquire(s, n) returned go back into the stream once the work queued so far is
    // done; that slot is not used again before.
    virtual void Release(int64_t s, int64_t n) = 0;
  };
  // max_rows: the most rows one Acquire asks for.
  virtual std::unique_ptr<HostResidual> MakeHostResidual(int64_t rows, int64_t cols,
                                                         int64_t max_rows);
  // ids: host [T]; pos0: the position of ids[0]; inv_freq: the rotary frequencies of the step.
  virtual void SetStepInputs(const int32_t* ids, int64_t T, int64_t pos0,
                             const std::vector<float>& inv_freq) {}
  virtual std::unique_ptr<Recording> Record(const std::function<void()>& body) {
    body();
    return nullptr;
  }
};

// RAII for a backend activation buffer.
class BackendBuffer {
 public:
  BackendBuffer() = default;
  BackendBuffer(Backend& b, size_t n) : b_(&b), p_(b.Alloc(n)), n_(n) {}
  ~BackendBuffer() {
    if (p_ != nullptr) b_->Free(p_);
  }
  BackendBuffer(BackendBuffer&& o) noexcept : b_(o.b_), p_(o.p_), n_(o.n_) { o.p_ = nullptr; }
  BackendBuffer& operator=(BackendBuffer&& o) noexcept {
    std::swap(b_, o.b_);
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  float* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  Backend* b_ = nullptr;
  float* p_ = nullptr;
  size_t n_ = 0;
};

// The CPU backend: fast (Highway + oneTBB) kernels, or the scalar reference ones.
std::unique_ptr<Backend> MakeCpuBackend(ThreadingContext& tc, bool reference);

}  // namespace needle
