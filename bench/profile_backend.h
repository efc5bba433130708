// A Backend that forwards every operator to another one (the CUDA backend) and, while enabled,
// records a CUDA event on the stream after each: the time between consecutive events is the GPU
// time of that operator, launch gaps included, since the host enqueues ahead of the GPU. Summed
// per operator class over one decode step, that is where the step's time goes (Nsight Systems
// does not run on the GPU machine). Disabled, it only forwards, and recording (CUDA graphs)
// passes through.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/cuda/cuda_check.h"

namespace needle::bench {

class ProfileBackend final : public Backend {
 public:
  ProfileBackend(Backend& inner, cudaStream_t stream) : in_(inner), stream_(stream) {}
  ~ProfileBackend() override {
    for (cudaEvent_t e : pool_) cudaEventDestroy(e);
  }

  // Starts a profile (events from now on), or ends it: {class, ms} and the whole span in ms.
  void Begin() {
    marks_.clear();
    on_ = true;
    Mark("");
  }
  std::map<std::string, double> End(double* total_ms) {
    on_ = false;
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::map<std::string, double> ms;
    for (size_t i = 1; i < marks_.size(); ++i) {
      float t = 0.f;
      NEEDLE_CUDA_CHECK(cudaEventElapsedTime(&t, pool_[i - 1], pool_[i]));
      ms[marks_[i]] += t;
    }
    float all = 0.f;
    if (marks_.size() > 1)
      NEEDLE_CUDA_CHECK(cudaEventElapsedTime(&all, pool_[0], pool_[marks_.size() - 1]));
    *total_ms = all;
    return ms;
  }

  const char* Name() const override { return in_.Name(); }
  void PrepareWeights(ModelWeights& w) override { in_.PrepareWeights(w); }
  float* Alloc(size_t n) override { return in_.Alloc(n); }
  void Free(float* p) override { in_.Free(p); }
  void ToHost(const float* src, size_t n, float* dst) override {
    in_.ToHost(src, n, dst);
    Mark("logits to host");
  }
  void FromHost(const float* src, size_t n, float* dst) override { in_.FromHost(src, n, dst); }
  void TopK(const float* l, int64_t V, int64_t k, float* vals, int32_t* ids) override {
    in_.TopK(l, V, k, vals, ids);
    Mark("top-k");
  }
  KVMemory* kv_memory() override { return in_.kv_memory(); }
  void Embed(const Weight& t, const int32_t* ids, int64_t T, float* out) override {
    in_.Embed(t, ids, T, out);
    Mark("embed");
  }
  void MatMul(const float* x, int64_t T, const Weight& w, const Weight* b, float* y) override {
    in_.MatMul(x, T, w, b, y);
    Mark(w.name.find("lm_head") != std::string::npos || w.name.find("embed") != std::string::npos
             ? "lm_head"
             : "matmul (other)");
  }
  void RmsNorm(const float* x, int64_t rows, int64_t D, const Weight& w, float eps,
               float* y) override {
    in_.RmsNorm(x, rows, D, w, eps, y);
    Mark("rms_norm");
  }
  void Rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t pos0,
            const std::vector<float>& f, float s) override {
    in_.Rope(x, T, heads, D, pos0, f, s);
    Mark("rope + kv write");
  }
  void SiluMul(const float* g, const float* u, int64_t n, float* out) override {
    in_.SiluMul(g, u, n, out);
    Mark("silu_mul");
  }
  void Add(float* x, const float* y, int64_t n) override {
    in_.Add(x, y, n);
    Mark("add");
  }
  void KVWrite(KVCache& c, int64_t layer, int64_t pos0, int64_t T, const float* k,
               const float* v) override {
    in_.KVWrite(c, layer, pos0, T, k, v);
    Mark("rope + kv write");
  }
  void Attention(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* s,
                 float* out, float* lse) override {
    in_.Attention(q, kv, a, s, out, lse);
    Mark("attention");
  }
  void Project(const float* x, int64_t T, const InputNorm& norm, const Projection* p,
               int n) override {
    in_.Project(x, T, norm, p, n);
    Mark(n == 3 ? "norm + q/k/v proj" : "norm + lm_head");
  }
  void ProjectAdd(const float* x, int64_t T, const Weight& w, const Weight* b, float* y,
                  float* scratch) override {
    in_.ProjectAdd(x, T, w, b, y, scratch);
    Mark(w.name.find("o_proj") != std::string::npos ? "o_proj + residual" : "down + residual");
  }
  void GateUp(const float* x, int64_t T, const InputNorm& norm, const Weight& wg, const Weight* bg,
              const Weight& wu, const Weight* bu, float* out, float* scratch) override {
    in_.GateUp(x, T, norm, wg, bg, wu, bu, out, scratch);
    Mark("norm + gate/up + silu");
  }
  void RopeKVWrite(float* q, float* k, const float* v, int64_t T, int64_t heads, KVCache& cache,
                   int64_t layer, int64_t pos0, const std::vector<float>& f, float s) override {
    in_.RopeKVWrite(q, k, v, T, heads, cache, layer, pos0, f, s);
    Mark("rope + kv write");
  }
  void ProjectRopeKVWrite(const float* x, int64_t T, const InputNorm& norm, const Projection* qkv,
                          int64_t heads, KVCache& cache, int64_t layer, int64_t pos0,
                          const std::vector<float>& f, float s) override {
    in_.ProjectRopeKVWrite(x, T, norm, qkv, heads, cache, layer, pos0, f, s);
    Mark("norm + q/k/v proj + rope + kv write");
  }
  bool CanRecord() const override { return !on_ && in_.CanRecord(); }
  void SetStepInputs(const int32_t* ids, int64_t T, int64_t pos0,
                     const std::vector<float>& f) override {
    in_.SetStepInputs(ids, T, pos0, f);
  }
  std::unique_ptr<Recording> Record(const std::function<void()>& body) override {
    return in_.Record(body);
  }

 private:
  void Mark(const char* cls) {
    if (!on_) return;
    if (marks_.size() == pool_.size()) {
      cudaEvent_t e;
      NEEDLE_CUDA_CHECK(cudaEventCreate(&e));
      pool_.push_back(e);
    }
    NEEDLE_CUDA_CHECK(cudaEventRecord(pool_[marks_.size()], stream_));
    marks_.emplace_back(cls);
  }

  Backend& in_;
  cudaStream_t stream_;
  bool on_ = false;
  std::vector<cudaEvent_t> pool_;
  std::vector<std::string> marks_;
};

}  // namespace needle::bench
