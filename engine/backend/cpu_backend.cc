#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <numeric>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/base/error.h"

namespace needle {

namespace {

// Op selects the implementation namespace once, at construction, not per call.
template <bool kRef>
class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(ThreadingContext& tc) : tc_(tc) {}
  const char* Name() const override { return kRef ? "cpu-reference" : "cpu"; }

  void PrepareWeights(ModelWeights&) override {}

  float* Alloc(size_t n) override {
    void* p = std::aligned_alloc(64, ((n * sizeof(float)) + 63) & ~size_t{63});
    if (p == nullptr && n != 0)
      Fail("cannot allocate ", n * sizeof(float), " bytes of activations");
    return static_cast<float*>(p);
  }
  void Free(float* p) override { std::free(p); }
  void ToHost(const float* src, size_t n, float* dst) override {
    std::memcpy(dst, src, n * sizeof(float));
  }
  void FromHost(const float* src, size_t n, float* dst) override {
    std::memcpy(dst, src, n * sizeof(float));
  }
  void TopK(const float* l, int64_t V, int64_t k, float* vals, int32_t* ids) override {
    k = std::min(k, V);
    std::vector<int32_t> idx(static_cast<size_t>(V));
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                      [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    for (int64_t i = 0; i < k; ++i) {
      ids[i] = idx[i];
      if (vals != nullptr) vals[i] = l[idx[i]];
    }
  }

  void Embed(const Weight& table, const int32_t* ids, int64_t T, float* out) override {
    EmbedRows(table, ids, T, out);
  }
  void MatMul(const float* x, int64_t T, const Weight& w, const Weight* bias, float* y) override {
    if constexpr (kRef)
      ref::MatMul(x, T, w, bias, y, tc_);
    else
      fast::MatMul(x, T, w, bias, y, tc_);
  }
  void RmsNorm(const float* x, int64_t rows, int64_t D, const Weight& w, float eps,
               float* y) override {
    if constexpr (kRef)
      ref::RmsNorm(x, rows, D, w, eps, y, tc_);
    else
      fast::RmsNorm(x, rows, D, w, eps, y, tc_);
  }
  void Rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t pos0,
            const std::vector<float>& inv_freq, float scaling) override {
    if constexpr (kRef)
      ref::Rope(x, T, heads, D, pos0, inv_freq.data(), scaling, tc_);
    else
      fast::Rope(x, T, heads, D, pos0, inv_freq.data(), scaling, tc_);
  }
  void SiluMul(const float* gate, const float* up, int64_t n, float* out) override {
    if constexpr (kRef)
      ref::SiluMul(gate, up, n, out, tc_);
    else
      fast::SiluMul(gate, up, n, out, tc_);
  }
  void Add(float* x, const float* y, int64_t n) override {
    if constexpr (kRef)
      ref::Add(x, y, n, tc_);
    else
      fast::Add(x, y, n, tc_);
  }
  void KVWrite(KVCache& cache, int64_t layer, int64_t pos0, int64_t T, const float* k,
               const float* v) override {
    cache.Write(layer, pos0, T, k, v);
  }
  void Attention(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans,
                 float* out, float* lse) override {
    if constexpr (kRef)
      ref::Attention(q, kv, a, spans, out, lse, tc_);
    else
      fast::Attention(q, kv, a, spans, out, lse, tc_);
  }

 private:
  ThreadingContext& tc_;
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend(ThreadingContext& tc, bool reference) {
  if (reference) return std::make_unique<CpuBackend<true>>(tc);
  return std::make_unique<CpuBackend<false>>(tc);
}

}  // namespace needle
