#include "sparse_attn/observation.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "engine/cpu/ops.h"
#include "sparse_attn/plan_rules.h"

namespace needle {

void QueryWindow::Push(const float* q, const float* lse, int64_t pos) {
  if (size() == cap_) {  // drop the oldest (windows are small: erase is cheap)
    q_.erase(q_.begin(), q_.begin() + heads_ * dim_);
    lse_.erase(lse_.begin(), lse_.begin() + heads_);
    pos_.erase(pos_.begin());
  }
  q_.insert(q_.end(), q, q + heads_ * dim_);
  if (lse != nullptr)
    lse_.insert(lse_.end(), lse, lse + heads_);
  else
    lse_.insert(lse_.end(), static_cast<size_t>(heads_), 0.0f);
  pos_.push_back(pos);
}

void ObservationVotes(const KVLayerView& kv, const QueryWindow& w, int64_t heads, float scale,
                      int64_t b, int64_t e, ThreadingContext& tc, std::vector<float>* votes) {
  const int64_t Hk = kv.kv_heads, G = heads / Hk, D = kv.head_dim, W = w.size(), n = e - b;
  votes->assign(static_cast<size_t>(Hk * n), 0.0f);
  if (W == 0 || n <= 0) return;
  constexpr int64_t kChunk = 512;
  std::vector<float> qh(static_cast<size_t>(W * G * D)), x(static_cast<size_t>(kChunk * D)),
      s(static_cast<size_t>(kChunk * W * G));
  for (int64_t h = 0; h < Hk; ++h) {
    // The group's window queries as a matrix [W * G, D]: row (i, g).
    for (int64_t i = 0; i < W; ++i)
      for (int64_t g = 0; g < G; ++g)
        std::copy_n(w.q().data() + (i * heads + h * G + g) * D, D, qh.data() + (i * G + g) * D);
    const Weight wq{"obs_queries", DType::kF32, W * G, D, qh.data()};
    float* vh = votes->data() + h * n;
    for (int64_t c0 = b; c0 < e; c0 += kChunk) {
      const int64_t m = std::min(e, c0 + kChunk) - c0;
      fast::KVRowsToF32(kv, false, h, c0, c0 + m, x.data());
      fast::MatMul(x.data(), m, wq, nullptr, s.data(), tc);  // s [m, W * G]
      tc.ParallelFor(static_cast<size_t>(m), 32, [&](size_t jb, size_t je) {
        for (size_t j = jb; j < je; ++j) {
          const int64_t key = c0 + static_cast<int64_t>(j);
          float acc = 0.0f;
          for (int64_t i = 0; i < W; ++i) {
            if (w.pos()[i] < key) continue;  // causal: the query never saw this key
            for (int64_t g = 0; g < G; ++g)
              acc += std::exp(s[j * W * G + i * G + g] * scale - w.lse()[i * heads + h * G + g]);
          }
          vh[key - b] = acc;
        }
      });
    }
  }
}

std::vector<std::vector<uint8_t>> Preselect(const std::vector<float>& votes, int64_t kv_heads,
                                            int64_t n_keys, int64_t block_size, int64_t first_block,
                                            int64_t end_block, int64_t count, int64_t pool,
                                            SelectMode mode) {
  std::vector<std::vector<uint8_t>> flags(
      static_cast<size_t>(kv_heads),
      std::vector<uint8_t>(static_cast<size_t>(std::max<int64_t>(end_block, 0)), 0));
  const int64_t nb = end_block - first_block;
  if (nb <= 0) return flags;
  std::vector<float> block_score(static_cast<size_t>(kv_heads * nb), 0.0f);
  const int64_t half = pool / 2;
  for (int64_t h = 0; h < kv_heads; ++h) {
    const float* v = votes.data() + h * n_keys;
    for (int64_t bi = 0; bi < nb; ++bi) {
      const int64_t b0 = (first_block + bi) * block_size;
      float s = 0.0f;
      for (int64_t j = b0; j < b0 + block_size; ++j) {
        float m = 0.0f;  // votes are >= 0
        for (int64_t k = std::max<int64_t>(0, j - half); k <= std::min(n_keys - 1, j + half); ++k)
          m = std::max(m, v[k]);
        s += m;
      }
      block_score[h * nb + bi] = s;
    }
  }
  std::vector<int32_t> ids(static_cast<size_t>(nb));
  std::iota(ids.begin(), ids.end(), static_cast<int32_t>(first_block));
  if (mode == SelectMode::kLayer) {
    std::vector<float> sum(static_cast<size_t>(nb), 0.0f);
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t bi = 0; bi < nb; ++bi) sum[bi] += block_score[h * nb + bi];
    for (int32_t b : TopK(sum.data(), ids.data(), nb, count))
      for (auto& f : flags) f[b] = 1;
  } else {
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int32_t b : TopK(block_score.data() + h * nb, ids.data(), nb, count)) flags[h][b] = 1;
  }
  return flags;
}

std::vector<int32_t> TopK(const float* scores, const int32_t* ids, int64_t n, int64_t k) {
  k = std::min(k, n);
  thread_local std::vector<std::pair<float, int32_t>> v;  // (kept: no allocation per call)
  v.resize(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) v[i] = {scores[i], ids[i]};
  auto better = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return plan_rules::Better(a.first, a.second, b.first, b.second);
  };
  if (k < n) std::nth_element(v.begin(), v.begin() + k, v.end(), better);
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) out.push_back(v[i].second);
  std::sort(out.begin(), out.end());
  return out;
}
}  // namespace needle
