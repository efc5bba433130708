// The AVX512-BF16 decode fold (bf16dot.h: Query, BlockFolder). Compiled without ISA flags: the
// functions that use AVX-512 carry their target attribute and run only after
// avx512::HasBf16() said yes.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "engine/base/dtype.h"
#include "engine/base/error.h"
#include "engine/cpu/avx512.h"
#include "engine/cpu/bf16dot.h"
#include "engine/cpu/with_size.h"

namespace needle::bf16dot {
namespace {

constexpr int kHeadTile = 8;    // heads whose products of one key row are formed together
constexpr int kValueHeads = 6;  // value accumulators: 6 heads x 4 vectors of 16 channels
constexpr int kValueChunks = 4;

// Lane i of the result = the sum of the lanes of v[i], i < 16 (v overwritten): a tree of
// pairwise even / odd sums, 45 operations for 16 dot products instead of a reduction each.
NEEDLE_BF16_TARGET inline __m512 SumEach(__m512* v) {
  alignas(64) static const int32_t kEven[16] = {0,  2,  4,  6,  8,  10, 12, 14,
                                                16, 18, 20, 22, 24, 26, 28, 30};
  alignas(64) static const int32_t kOdd[16] = {1,  3,  5,  7,  9,  11, 13, 15,
                                               17, 19, 21, 23, 25, 27, 29, 31};
  const __m512i even = _mm512_load_si512(kEven), odd = _mm512_load_si512(kOdd);
  // Each level halves the vectors: pair (a, b) -> lanes (a0 + a1, a2 + a3, ..., b0 + b1, ...).
  for (int n = 16; n > 1; n /= 2)
    for (int i = 0; i < n / 2; ++i)
      v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], even, v[2 * i + 1]),
                           _mm512_permutex2var_ps(v[2 * i], odd, v[2 * i + 1]));
  return v[0];
}

// s[g][j0 .. j0 + 16) for GT heads from g0 (rows of s np apart): keys j0 + r, r < live.
template <int GT>
NEEDLE_BF16_TARGET void ScoreKeys(const uint32_t* q, int64_t g0, const uint16_t* k, int64_t j0,
                                  int64_t live, int64_t D, int64_t np, float* s) {
  const int64_t C = D / 32;
  __m512 t[GT][16];
  for (int64_t r = 0; r < 16; ++r) {
    if (r >= live) {
      for (int g = 0; g < GT; ++g) t[g][r] = _mm512_setzero_ps();
      continue;
    }
    const uint16_t* row = k + (j0 + r) * D;
    __m512 acc[GT];
    for (int g = 0; g < GT; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(row + 32 * c);
      for (int g = 0; g < GT; ++g)
        acc[g] = _mm512_dpbf16_ps(
            acc[g], (__m512bh)_mm512_loadu_si512(q + (g0 + g) * (D / 2) + 16 * c), kv);
    }
    for (int g = 0; g < GT; ++g) t[g][r] = acc[g];
  }
  for (int g = 0; g < GT; ++g) _mm512_storeu_ps(s + (g0 + g) * np + j0, SumEach(t[g]));
}

// o_g[16 c0 .. 16 (c0 + CC)) = o_g * corr_g + sum over pairs of keys of p pairs x value pairs,
// for GT heads from g0. p: [G][np] bf16, vp: [pairs][D].
template <int GT, int CC>
NEEDLE_BF16_TARGET void ValueTile(const uint16_t* p, const uint32_t* vp, int64_t pairs, int64_t g0,
                                  int64_t c0, int64_t D, int64_t np, PartialAttention* part,
                                  const float* corr) {
  __m512 acc[GT][CC];
  for (int g = 0; g < GT; ++g)
    for (int c = 0; c < CC; ++c)
      acc[g][c] = _mm512_mul_ps(_mm512_loadu_ps(part[g0 + g].out + 16 * (c0 + c)),
                                _mm512_set1_ps(corr[g0 + g]));
  for (int64_t jp = 0; jp < pairs; ++jp) {
    __m512bh v[CC];
    for (int c = 0; c < CC; ++c) v[c] = (__m512bh)_mm512_loadu_si512(vp + jp * D + 16 * (c0 + c));
    for (int g = 0; g < GT; ++g) {
      int32_t pair;
      std::memcpy(&pair, p + (g0 + g) * np + 2 * jp, 4);
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < CC; ++c) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], v[c], pb);
    }
  }
  for (int g = 0; g < GT; ++g)
    for (int c = 0; c < CC; ++c) _mm512_storeu_ps(part[g0 + g].out + 16 * (c0 + c), acc[g][c]);
}

}  // namespace

bool UseBlocks(int64_t G, int64_t D) {
  return G >= 1 && D % 32 == 0 && D >= 32 && D <= 256 && Use(D);
}

BlockFolder& ThreadBlockFolder() {
  thread_local BlockFolder f;
  return f;
}

void PrepareQuery(const float* q, int64_t G, int64_t D, float scale, Query* out) {
  NEEDLE_CHECK(D % 2 == 0);
  out->G = G, out->D = D;
  out->pairs.resize(static_cast<size_t>(G * D / 2));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D / 2; ++i)
      out->pairs[g * (D / 2) + i] =
          BF16Pair(q[g * D + 2 * i] * scale, q[g * D + 2 * i + 1] * scale);
}

NEEDLE_BF16_TARGET void BlockFolder::Fold(const Query& q, const uint16_t* k, const uint16_t* v,
                                          int64_t n, PartialAttention* part, float* stats,
                                          const uint16_t* next_k, const uint16_t* next_v,
                                          int64_t next_bytes) {
  const int64_t G = q.G, D = q.D, np = (n + 31) / 32 * 32, pairs = (n + 1) / 2;
  NEEDLE_CHECK(n >= 1 && D % 32 == 0);
  s_.resize(static_cast<size_t>(G * np));
  p_.resize(static_cast<size_t>(G * np));
  vp_.resize(static_cast<size_t>(pairs * D));
  // Scores, 16 keys x up to kHeadTile heads at a time; meanwhile the next piece (and this
  // piece's values) come into the cache.
  const int64_t row_bytes = D * 2;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    for (int64_t r = j0; r < std::min(n, j0 + 16); ++r)
      for (int64_t o = 0; o < row_bytes; o += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(v) + r * row_bytes + o, _MM_HINT_T0);
        if (next_k != nullptr && r * row_bytes + o < next_bytes) {
          _mm_prefetch(reinterpret_cast<const char*>(next_k) + r * row_bytes + o, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(next_v) + r * row_bytes + o, _MM_HINT_T0);
        }
      }
    for (int64_t g = 0; g < G; g += kHeadTile)
      WithSize<kHeadTile>(G - g, [&](auto gt) NEEDLE_BF16_TARGET {
        ScoreKeys<decltype(gt)::value>(q.pairs.data(), g, k, j0, std::min<int64_t>(16, n - j0), D,
                                       np, s_.data());
      });
  }
  // Online softmax per head; the probabilities rounded to bf16 (pairs of keys for the values),
  // the sum l of the rounded ones; keys past n count as absent.
  float corr[64];
  NEEDLE_CHECK(G <= 64);
  for (int64_t g = 0; g < G; ++g) {
    const float* s = s_.data() + g * np;
    PartialAttention& P = part[g];
    const float mx = std::max(P.m, avx512::MaxOf(s, n));
    corr[g] = P.empty() ? 0.0f : std::exp(P.m - mx);
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    uint16_t* pg = p_.data() + g * np;
    for (int64_t j = 0; j < np; j += 16) {
      const __mmask16 live = avx512::Live(n - j);
      const __m512 e =
          _mm512_maskz_mov_ps(live, avx512::Exp(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmx)));
      const __m256i b = (__m256i)_mm512_cvtneps_pbh(e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pg + j), b);
      vsum =
          _mm512_add_ps(vsum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
    }
    const float sum = _mm512_reduce_add_ps(vsum);
    P.l = P.l * corr[g] + sum;
    P.m = mx;
    P.n += n;
    if (stats != nullptr) stats[2 * g] = mx, stats[2 * g + 1] = sum;
  }
  // Values: two rows at a time interleaved into pairs (the last alone with zeros), then
  // o = o * corr + P V, kValueHeads heads x kValueChunks vectors of channels in registers.
  for (int64_t jp = 0; jp < pairs; ++jp)
    avx512::InterleaveRows(v + 2 * jp * D, 2 * jp + 1 < n ? v + (2 * jp + 1) * D : nullptr, D,
                           vp_.data() + jp * D);
  const int64_t chunks = D / 16;
  for (int64_t g = 0; g < G; g += kValueHeads)
    for (int64_t c = 0; c < chunks; c += kValueChunks)
      WithSize<kValueHeads>(G - g, [&](auto gt) NEEDLE_BF16_TARGET {
        WithSize<kValueChunks>(chunks - c, [&](auto cc) NEEDLE_BF16_TARGET {
          ValueTile<decltype(gt)::value, decltype(cc)::value>(p_.data(), vp_.data(), pairs, g, c, D,
                                                              np, part, corr);
        });
      });
}

}  // namespace needle::bf16dot
