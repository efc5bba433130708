// Scalar reference implementations of the CPU operators: no SIMD, no threads, obvious loops.
#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/base/error.h"
#include "engine/cpu/ops.h"

namespace needle {

void EmbedRows(const Weight& table, const int32_t* ids, int64_t T, float* out) {
  const int64_t H = table.cols;
  for (int64_t t = 0; t < T; ++t) {
    if (ids[t] < 0 || ids[t] >= table.rows)
      Fail("token id ", ids[t], " is outside the vocabulary [0, ", table.rows, ")");
    for (int64_t i = 0; i < H; ++i)
      out[t * H + i] = LoadAsF32(table.dtype, table.data, static_cast<size_t>(ids[t] * H + i));
  }
}

void ItemSpans(const AttnArgs& a, const AttnSpans* spans, int64_t t, int64_t h,
               std::vector<KeySpan>* out) {
  out->clear();
  if (spans == nullptr) {
    const int64_t p = a.pos0 + t;
    const int64_t lo = a.window > 0 ? std::max<int64_t>(0, p - a.window + 1) : 0;
    out->push_back({lo, p + 1});
    return;
  }
  const int64_t i = t * a.kv_heads + h;
  out->assign(spans->spans.begin() + spans->offsets[i],
              spans->spans.begin() + spans->offsets[i + 1]);
}

void RotationRow(int64_t delta, const float* inv_freq, int64_t D, float* row) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float angle = static_cast<float>(delta) * inv_freq[i];
    row[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
    row[half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
  }
}

void RotateRows(const float* q, int64_t rows, int64_t D, const float* row, float* out) {
  const int64_t half = D / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = q + r * D;
    float* y = out + r * D;
    for (int64_t i = 0; i < half; ++i) {
      const float c = row[i], s = row[half + i], x1 = x[i], x2 = x[half + i];
      y[i] = x1 * c - x2 * s;
      y[half + i] = x2 * c + x1 * s;
    }
    for (int64_t i = 2 * half; i < D; ++i) y[i] = x[i];
  }
}

void RopeTable(int64_t T, int64_t D, int64_t pos0, const float* inv_freq, float scaling,
               float* cos_out, float* sin_out) {
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float pos = static_cast<float>(pos0 + t);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[i];  // f32 product, as torch's f32 matmul of the two
      cos_out[t * half + i] = static_cast<float>(std::cos(static_cast<double>(angle))) * scaling;
      sin_out[t * half + i] = static_cast<float>(std::sin(static_cast<double>(angle))) * scaling;
    }
  }
}

namespace ref {

void MatMul(const float* x, int64_t T, const Weight& w, const Weight* bias, float* y,
            ThreadingContext&) {
  const int64_t N = w.rows, K = w.cols;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k)
        acc += x[t * K + k] * LoadAsF32(w.dtype, w.data, static_cast<size_t>(n * K + k));
      if (bias != nullptr && bias->present()) acc += LoadAsF32(bias->dtype, bias->data, n);
      y[t * N + n] = acc;
    }
  }
}

void RmsNorm(const float* x, int64_t rows, int64_t D, const Weight& w, float eps, float* y,
             ThreadingContext&) {
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(x[r * D + i]) * x[r * D + i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / D) + eps);
    for (int64_t i = 0; i < D; ++i)
      y[r * D + i] = (x[r * D + i] * inv) * LoadAsF32(w.dtype, w.data, i);
  }
}

void Rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t pos0, const float* inv_freq,
          float scaling, ThreadingContext&) {
  const int64_t half = D / 2;
  std::vector<float> c(T * half), s(T * half);
  RopeTable(T, D, pos0, inv_freq, scaling, c.data(), s.data());
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        const float co = c[t * half + i], si = s[t * half + i];
        v[i] = a * co - b * si;
        v[i + half] = b * co + a * si;
      }
    }
  }
}

void SiluMul(const float* gate, const float* up, int64_t n, float* out, ThreadingContext&) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void Add(float* x, const float* y, int64_t n, ThreadingContext&) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void Attention(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans,
               float* out, float* lse, ThreadingContext&) {
  const int64_t D = a.head_dim, G = a.heads / a.kv_heads;
  std::vector<KeySpan> sp;
  std::vector<int64_t> keys, key_span;
  std::vector<float> s, qrot;
  for (int64_t t = 0; t < a.T; ++t) {
    for (int64_t h = 0; h < a.heads; ++h) {
      const int64_t kvh = h / G;
      ItemSpans(a, spans, t, kvh, &sp);
      keys.clear();
      key_span.clear();
      for (size_t x = 0; x < sp.size(); ++x)
        for (int64_t j = sp[x].begin; j < sp[x].end; ++j)
          keys.push_back(j), key_span.push_back(static_cast<int64_t>(x));
      const float* q0 = q + (t * a.heads + h) * D;
      const int64_t base = spans != nullptr ? spans->offsets[t * a.kv_heads + kvh] : 0;
      s.assign(keys.size(), 0.0f);
      float mx = -INFINITY;
      for (size_t i = 0; i < keys.size(); ++i) {
        const float* qv = q0;
        const int32_t r =
            spans != nullptr && !spans->rot.empty() ? spans->rot[base + key_span[i]] : -1;
        if (r >= 0) {
          qrot.resize(static_cast<size_t>(D));
          RotateRows(q0, 1, D, spans->rot_table.data() + r * D, qrot.data());
          qv = qrot.data();
        }
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += qv[d] * kv.KAt(kvh, keys[i], d);
        s[i] = dot * a.scale;
        mx = std::max(mx, s[i]);
      }
      float sum = 0.0f;
      for (auto& e : s) sum += (e = std::exp(e - mx));
      float* o = out + (t * a.heads + h) * D;
      for (int64_t d = 0; d < D; ++d) {
        float acc = 0.0f;
        for (size_t i = 0; i < keys.size(); ++i) acc += s[i] * kv.VAt(kvh, keys[i], d);
        o[d] = keys.empty() ? 0.0f : acc / sum;
      }
      if (lse != nullptr) lse[t * a.heads + h] = keys.empty() ? -INFINITY : mx + std::log(sum);
    }
  }
}

}  // namespace ref
}  // namespace needle
