// The default fused operators of Backend: the operator sequences they stand for.
#include "engine/backend/backend.h"

namespace needle {

// x, or x normalised into norm.scratch.
static const float* Normalised(Backend& b, const float* x, int64_t T, int64_t K,
                               const Backend::InputNorm& norm) {
  if (norm.w == nullptr) return x;
  b.RmsNorm(x, T, K, *norm.w, norm.eps, norm.scratch);
  return norm.scratch;
}

void Backend::Project(const float* x, int64_t T, const InputNorm& norm, const Projection* p,
                      int n) {
  if (n == 0) return;
  const float* in = Normalised(*this, x, T, p[0].w->cols, norm);
  for (int i = 0; i < n; ++i) MatMul(in, T, *p[i].w, p[i].bias, p[i].y);
}

void Backend::ProjectAdd(const float* x, int64_t T, const Weight& w, const Weight* bias, float* y,
                         float* scratch) {
  MatMul(x, T, w, bias, scratch);
  Add(y, scratch, T * w.rows);
}

void Backend::GateUp(const float* x, int64_t T, const InputNorm& norm, const Weight& wg,
                     const Weight* bg, const Weight& wu, const Weight* bu, float* out,
                     float* scratch) {
  const float* in = Normalised(*this, x, T, wg.cols, norm);
  MatMul(in, T, wg, bg, out);
  MatMul(in, T, wu, bu, scratch);
  SiluMul(out, scratch, T * wg.rows, out);
}

void Backend::RopeKVWrite(float* q, float* k, const float* v, int64_t T, int64_t heads,
                          KVCache& cache, int64_t layer, int64_t pos0,
                          const std::vector<float>& inv_freq, float scaling) {
  const int64_t kv_heads = cache.shape().kv_heads, D = cache.shape().head_dim;
  Rope(q, T, heads, D, pos0, inv_freq, scaling);
  Rope(k, T, kv_heads, D, pos0, inv_freq, scaling);
  KVWrite(cache, layer, pos0, T, k, v);
}

void Backend::ProjectRopeKVWrite(const float* x, int64_t T, const InputNorm& norm,
                                 const Projection* qkv, int64_t heads, KVCache& cache,
                                 int64_t layer, int64_t pos0, const std::vector<float>& inv_freq,
                                 float scaling) {
  Project(x, T, norm, qkv, 3);
  RopeKVWrite(qkv[0].y, qkv[1].y, qkv[2].y, T, heads, cache, layer, pos0, inv_freq, scaling);
}

}  // namespace needle
