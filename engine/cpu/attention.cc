// Dense causal attention over the KV cache (GQA, optional sliding window), for prefill and decode.
// Work items are (query token, KV head, key split): each reads its keys and values once for all
// G query heads of the group (GQA without repeating K/V), folds them in chunks of kChunk keys with
// an online softmax into one PartialAttention per head, and the splits of one (token, head) are
// merged in split order, so results do not depend on the thread count's scheduling.
// Key splits exist only when (tokens x KV heads) alone cannot feed the threads: long decode.
#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/attention/partial.h"
#include "engine/base/error.h"
#include "engine/cpu/ops.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/cpu/attention.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

// Per-target code shared between op families (after highway.h, as Highway requires).
#include "engine/cpu/load-inl.h"
#include "hwy/contrib/math/math-inl.h"

HWY_BEFORE_NAMESPACE();
namespace needle {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

constexpr int64_t kChunk = 128;         // keys scored before their values are accumulated
constexpr int64_t kMinSplitKeys = 512;  // never split finer than this

// Folds keys [j0, j1) of one KV head into the partials of G query heads.
// q: [G, D] (consecutive heads), k/v: [tokens, D] of type KT, part[g].out: [D].
template <typename KT>
HWY_INLINE void FoldKeys(const float* HWY_RESTRICT q, int64_t G, int64_t D,
                         const KT* HWY_RESTRICT k, const KT* HWY_RESTRICT v, int64_t j0, int64_t j1,
                         float scale, PartialAttention* part,
                         float* HWY_RESTRICT scores /* [G, kChunk] */) {
  const hn::ScalableTag<float> df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t c1 = std::min(j1, c0 + kChunk), n = c1 - c0;
    // Scores s[g][j] = scale * q_g . k_j
    for (int64_t j = 0; j < n; ++j) {
      const KT* kj = k + (c0 + j) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * D;
        auto acc = hn::Zero(df);
        int64_t d = 0;
        for (; d + L <= D; d += L)
          acc = hn::MulAdd(hn::LoadU(df, qg + d), LoadF32(df, kj + d), acc);
        float s = ReduceF32(df, acc);
        for (; d < D; ++d) s += qg[d] * ScalarF32(kj[d]);
        scores[g * kChunk + j] = s * scale;
      }
    }
    // Online softmax update per head, then p_j * v_j accumulated.
    for (int64_t g = 0; g < G; ++g) {
      PartialAttention& P = part[g];
      float* s = scores + g * kChunk;
      float mx = P.m;
      for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
      const float corr = P.empty() ? 0.0f : std::exp(P.m - mx);
      float sum = 0.0f;
      int64_t j = 0;
      const auto vmx = hn::Set(df, mx);
      for (; j + L <= n; j += L) {
        const auto e = hn::Exp(df, hn::Sub(hn::LoadU(df, s + j), vmx));
        hn::StoreU(e, df, s + j);
        sum += ReduceF32(df, e);
      }
      for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
      float* o = P.out;
      if (corr != 1.0f) {
        const auto vc = hn::Set(df, corr);
        int64_t d = 0;
        for (; d + L <= D; d += L) hn::StoreU(hn::Mul(hn::LoadU(df, o + d), vc), df, o + d);
        for (; d < D; ++d) o[d] *= corr;
      }
      P.l = P.l * corr + sum;
      P.m = mx;
      P.n += n;
    }
    for (int64_t j = 0; j < n; ++j) {
      const KT* vj = v + (c0 + j) * D;
      int64_t d = 0;
      for (; d + L <= D; d += L) {
        const auto vv = LoadF32(df, vj + d);
        for (int64_t g = 0; g < G; ++g) {
          float* o = part[g].out + d;
          hn::StoreU(hn::MulAdd(hn::Set(df, scores[g * kChunk + j]), vv, hn::LoadU(df, o)), df, o);
        }
      }
      for (; d < D; ++d) {
        const float vs = ScalarF32(vj[d]);
        for (int64_t g = 0; g < G; ++g) part[g].out[d] += scores[g * kChunk + j] * vs;
      }
    }
  }
}

template <typename KT>
void AttentionT(const float* q, const KVLayerView& kv, const AttnArgs& a, float* out,
                ThreadingContext& tc) {
  const int64_t D = a.head_dim, G = a.heads / a.kv_heads, Hk = a.kv_heads;
  const KT* kbase = static_cast<const KT*>(kv.k);
  const KT* vbase = static_cast<const KT*>(kv.v);
  // Visible keys of query t: [lo(t), pos0 + t].
  auto lo_of = [&](int64_t t) {
    const int64_t p = a.pos0 + t;
    return a.window > 0 ? std::max<int64_t>(0, p - a.window + 1) : int64_t{0};
  };
  const int64_t max_keys = a.pos0 + a.T - lo_of(a.T - 1);
  int64_t splits = 1;
  const int64_t items = a.T * Hk;
  const int64_t want = 4 * tc.threads();
  if (items < want) {
    splits = std::min((want + items - 1) / items, (max_keys + kMinSplitKeys - 1) / kMinSplitKeys);
    splits = std::max<int64_t>(splits, 1);
  }
  // Partial outputs: [T, Hk, splits, G, D] plus m/l/n in the PartialAttention objects.
  std::vector<float> pbuf(static_cast<size_t>(a.T * Hk * splits * G * D));
  std::vector<PartialAttention> parts(static_cast<size_t>(a.T * Hk * splits * G));
  tc.ParallelFor(static_cast<size_t>(items * splits), 1, [&](size_t b, size_t e) HWY_ATTR {
    std::vector<float> scores(static_cast<size_t>(G * kChunk));
    for (size_t item = b; item < e; ++item) {
      const int64_t sp = static_cast<int64_t>(item) % splits;
      const int64_t th = static_cast<int64_t>(item) / splits;
      const int64_t t = th / Hk, h = th % Hk;
      const int64_t lo = lo_of(t), hi = a.pos0 + t + 1;
      const int64_t per = (hi - lo + splits - 1) / splits;
      const int64_t j0 = std::min(hi, lo + sp * per), j1 = std::min(hi, j0 + per);
      PartialAttention* p = &parts[static_cast<size_t>(item * G)];
      for (int64_t g = 0; g < G; ++g) p[g] = PartialAttention(pbuf.data() + (item * G + g) * D, D);
      const float* qg = q + (t * a.heads + h * G) * D;
      FoldKeys(qg, G, D, kbase + h * kv.head_stride, vbase + h * kv.head_stride, j0, j1, a.scale, p,
               scores.data());
    }
  });
  // Merge the splits of each (token, KV head) in order and normalise.
  tc.ParallelFor(static_cast<size_t>(items), 4, [&](size_t b, size_t e) {
    for (size_t th = b; th < e; ++th) {
      const int64_t t = static_cast<int64_t>(th) / Hk, h = static_cast<int64_t>(th) % Hk;
      for (int64_t g = 0; g < G; ++g) {
        PartialAttention& acc = parts[static_cast<size_t>((th * splits) * G + g)];
        for (int64_t sp = 1; sp < splits; ++sp)
          acc.Merge(parts[static_cast<size_t>((th * splits + sp) * G + g)]);
        acc.Finalize(out + (t * a.heads + h * G + g) * D);
      }
    }
  });
}

void AttentionImpl(const float* q, const KVLayerView& kv, const AttnArgs& a, float* out,
                   ThreadingContext& tc) {
  switch (kv.dtype) {
    case DType::kF32:
      AttentionT<float>(q, kv, a, out, tc);
      break;
    case DType::kBF16:
      AttentionT<hwy::bfloat16_t>(q, kv, a, out, tc);
      break;
    case DType::kF16:
      AttentionT<hwy::float16_t>(q, kv, a, out, tc);
      break;
    default:
      Fail("attention: unsupported KV cache type ", DTypeName(kv.dtype));
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace needle
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace needle {
HWY_EXPORT(AttentionImpl);
namespace fast {
void Attention(const float* q, const KVLayerView& kv, const AttnArgs& a, float* out,
               ThreadingContext& tc) {
  HWY_DYNAMIC_DISPATCH(AttentionImpl)(q, kv, a, out, tc);
}
}  // namespace fast
}  // namespace needle
#endif
