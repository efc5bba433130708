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

namespace needle {
namespace {
// The stream in AllocHost memory and one backend buffer: each Acquire loads, each Release stores,
// both waiting (FromHost / ToHost).
class CopyingResidual final : public Backend::HostResidual {
 public:
  CopyingResidual(Backend& b, int64_t rows, int64_t cols, int64_t max_rows)
      : b_(b),
        cols_(cols),
        host_(b.AllocHost(static_cast<size_t>(rows * cols))),
        slot_(b, static_cast<size_t>(max_rows * cols)) {}
  ~CopyingResidual() override { b_.FreeHost(host_); }
  float* Acquire(int64_t s, int64_t n, bool fill, int64_t, int64_t) override {
    if (fill) b_.FromHost(host_ + s * cols_, static_cast<size_t>(n * cols_), slot_.get());
    return slot_.get();
  }
  void Release(int64_t s, int64_t n) override {
    b_.ToHost(slot_.get(), static_cast<size_t>(n * cols_), host_ + s * cols_);
  }

 private:
  Backend& b_;
  int64_t cols_;
  float* host_;
  BackendBuffer slot_;
};
}  // namespace

std::unique_ptr<Backend::HostResidual> Backend::MakeHostResidual(int64_t rows, int64_t cols,
                                                                 int64_t max_rows) {
  return std::make_unique<CopyingResidual>(*this, rows, cols, max_rows);
}
}  // namespace needle
