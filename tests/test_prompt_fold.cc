// A prompt's attention by groups of tokens (engine/cpu/prompt_groups.h) on each of its folders:
// the Highway row tile (every cache type), the AMX tiles and the AVX512-BF16 dot products (bf16
// caches, where the CPU has them; skipped elsewhere).
//  * Each token's result is the same, bit for bit, whatever call it comes in: a prompt attended
//    in one call equals the same prompt cut into calls of two tokens or more at odd token
//    boundaries (as a batch or a chunked prefill cuts it), and any thread count. The groups
//    change, each row's pieces of keys do not. Dense causal spans and sparse-prefill-like spans
//    (shared Initial, a remapped block, Local, the causal chunk).
//  * The bf16 folds (queries and probabilities rounded to bf16) within the bound derived in
//    amx.h and bf16dot.h, against the Highway row tile (f32, within 1e-5 of exact;
//    test_kernels.cc's AttentionTest checks it against the reference).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "engine/cpu/amx.h"
#include "engine/cpu/avx512.h"
#include "engine/cpu/bf16dot.h"
#include "engine/cpu/ops.h"
#include "kvcache/kv_cache.h"
#include "tests/bf16_cache_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

enum class Fold { kRowTile, kTiles, kBf16Dot };

const char* Name(Fold f) {
  return f == Fold::kRowTile ? "row tile" : f == Fold::kTiles ? "AMX tiles" : "AVX512-BF16";
}

// Whether this CPU has the fold (the row tile: everywhere).
bool Available(Fold f) {
  return f == Fold::kRowTile || (f == Fold::kTiles ? amx::Supported() : avx512::HasBf16());
}

// Selects fold f for bf16 prompts until destroyed.
struct UseFold {
  explicit UseFold(Fold f) {
    amx::SetMode(f == Fold::kTiles ? amx::Mode::kOn : amx::Mode::kOff);
    bf16dot::SetMode(f == Fold::kBf16Dot ? bf16dot::Mode::kOn : bf16dot::Mode::kOff);
  }
  ~UseFold() {
    amx::SetMode(amx::Mode::kFromEnv);
    bf16dot::SetMode(bf16dot::Mode::kFromEnv);
  }
};

// Spans of tokens [t0, t1) of a prompt at pos0 (over Hk KV heads), like a sparse prefill's
// chunk starting at `chunk`: [0, 40), the block [128, 256) rotated by rot_table row 0, Local
// [chunk - 100, chunk) and the chunk's causal part [chunk, p + 1).
AttnSpans SparseSpans(int64_t pos0, int64_t t0, int64_t t1, int64_t Hk, int64_t chunk, int64_t D) {
  AttnSpans s;
  s.offsets = {0};
  std::vector<float> inv_freq(static_cast<size_t>(D / 2));
  for (int64_t i = 0; i < D / 2; ++i) inv_freq[i] = std::pow(10000.f, -2.f * i / D);
  s.rot_table.resize(static_cast<size_t>(D));
  RotationRow(-300, inv_freq.data(), D, s.rot_table.data());
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t h = 0; h < Hk; ++h) {
      s.spans.push_back({0, 40});
      s.spans.push_back({128, 256});
      s.spans.push_back({chunk - 100, chunk});
      s.spans.push_back({chunk, pos0 + t + 1});
      s.rot.insert(s.rot.end(), {-1, 0, -1, -1});
      s.offsets.push_back(static_cast<int64_t>(s.spans.size()));
    }
  return s;
}

void ExpectCallsAttendAlike(DType type, bool sparse) {
  const int64_t Hk = 2, G = 4, D = 64, B = 32, T = 300, pos0 = 700, chunk = 690;
  const int64_t n_tok = pos0 + T;
  KVCache cache(KVCacheShape{1, Hk, D, n_tok, B, type});
  const auto k = test::RandomVector(n_tok * Hk * D, 41);
  const auto v = test::RandomVector(n_tok * Hk * D, 42);
  cache.Write(0, 0, n_tok, k.data(), v.data());
  cache.SetSize(n_tok);
  const auto q = test::RandomVector(T * Hk * G * D, 43, 2.f);
  AttnArgs a{T, pos0, Hk * G, Hk, D, 0, 1.0f / std::sqrt(static_cast<float>(D))};
  // Tokens [t0, t1) in one call: out [t1 - t0, heads, D], lse [t1 - t0, heads].
  auto run = [&](int64_t t0, int64_t t1, int threads, float* out, float* lse) {
    AttnArgs c = a;
    c.T = t1 - t0, c.pos0 = pos0 + t0;
    const AttnSpans sp = SparseSpans(pos0, t0, t1, Hk, chunk, D);
    ThreadingContext tc(threads);
    fast::Attention(q.data() + t0 * a.heads * D, cache.Layer(0), c, sparse ? &sp : nullptr, out,
                    lse, tc);
  };
  const size_t n_out = static_cast<size_t>(T * a.heads * D),
               n_lse = static_cast<size_t>(T * a.heads);
  std::vector<float> whole(n_out), whole_lse(n_lse);
  run(0, T, 1, whole.data(), whole_lse.data());
  std::vector<float> cut(n_out), cut_lse(n_lse);
  const int64_t bounds[] = {0, 2, 7, 23, 150, 152, T};  // (one token: the decode fold)
  for (size_t i = 0; i + 1 < std::size(bounds); ++i)
    run(bounds[i], bounds[i + 1], 1, cut.data() + bounds[i] * a.heads * D,
        cut_lse.data() + bounds[i] * a.heads);
  std::vector<float> threaded(n_out), threaded_lse(n_lse);
  run(0, T, 3, threaded.data(), threaded_lse.data());
  for (int64_t t = 0; t < T; ++t) {
    const size_t o = static_cast<size_t>(t * a.heads * D), l = static_cast<size_t>(t * a.heads);
    ASSERT_EQ(std::memcmp(cut.data() + o, whole.data() + o, a.heads * D * sizeof(float)), 0)
        << "token " << t;
    ASSERT_EQ(std::memcmp(cut_lse.data() + l, whole_lse.data() + l, a.heads * sizeof(float)), 0)
        << "token " << t;
    ASSERT_EQ(std::memcmp(threaded.data() + o, whole.data() + o, a.heads * D * sizeof(float)), 0)
        << "token " << t;
  }
}

TEST(PromptFold, TokensAttendAlikeInAnyCall) {
  for (Fold f : {Fold::kRowTile, Fold::kTiles, Fold::kBf16Dot}) {
    if (!Available(f)) continue;
    UseFold use(f);
    for (DType type : {DType::kF32, DType::kBF16, DType::kI8}) {
      if (f != Fold::kRowTile && type != DType::kBF16) continue;
      for (bool sparse : {false, true}) {
        SCOPED_TRACE(std::string(Name(f)) + " " + DTypeName(type) +
                     (sparse ? " sparse" : " dense"));
        ExpectCallsAttendAlike(type, sparse);
      }
    }
  }
}

// Causal dense and sparse spans with position remapping's rotations, a bf16 fold against the
// row tile, within the bound of amx.h / bf16dot.h; |q_d| is bounded by its rotate-half
// pair's magnitude, sqrt(q_d^2 + q_(d+-D/2)^2), which any rotation keeps, and the bound takes the
// largest over all keys of the head.
void ExpectWithinTheBf16Bound(Fold fold) {
  ThreadingContext tc(2);
  struct Shape {
    int64_t G, D, B, T, pos0;
  };
  const Shape shapes[] = {
      {4, 64, 128, 300, 500}, {7, 128, 32, 90, 700}, {1, 32, 48, 70, 100}, {6, 72, 50, 40, 130}};
  for (const Shape& sh : shapes) {
    if (fold == Fold::kTiles && !amx::Fits(sh.G, sh.D)) continue;
    for (bool sparse : {false, true}) {
      const int64_t Hk = 2, G = sh.G, D = sh.D, n_tok = sh.pos0 + sh.T;
      std::vector<float> k, v;
      const auto cache = test::RandomBf16Cache(Hk, D, n_tok, sh.B, 21, &k, &v);
      AttnArgs a;
      a.T = sh.T, a.pos0 = sh.pos0, a.heads = Hk * G, a.kv_heads = Hk, a.head_dim = D;
      a.scale = 1.0f / std::sqrt(static_cast<float>(D));
      const std::vector<float> q = test::RandomVector(a.T * a.heads * D, 23, 2.f);
      // Sparse: every item attends [0, 40), a run from 45 rotated by row 0, and its last 50 keys
      // rotated by row 1 (or as they are).
      AttnSpans spans;
      spans.offsets = {0};
      std::vector<float> inv_freq(static_cast<size_t>(D / 2));
      for (int64_t i = 0; i < D / 2; ++i) inv_freq[i] = std::pow(10000.f, -2.f * i / D);
      spans.rot_table.resize(static_cast<size_t>(2 * D));
      RotationRow(37, inv_freq.data(), D, spans.rot_table.data());
      RotationRow(-5, inv_freq.data(), D, spans.rot_table.data() + D);
      for (int64_t t = 0; t < a.T; ++t)
        for (int64_t h = 0; h < Hk; ++h) {
          const int64_t p = a.pos0 + t;
          spans.spans.push_back({0, 40});
          spans.spans.push_back({45, 45 + std::max<int64_t>(1, (p - 100) / 2)});
          spans.spans.push_back({p - 49, p + 1});
          spans.rot.insert(spans.rot.end(), {-1, 0, t % 2 == 0 ? 1 : -1});
          spans.offsets.push_back(static_cast<int64_t>(spans.spans.size()));
        }
      const AttnSpans* sp = sparse ? &spans : nullptr;
      const size_t n_out = static_cast<size_t>(a.T * a.heads * D), n_lse = a.T * a.heads;
      std::vector<float> out(n_out), lse(n_lse), want(n_out), want_lse(n_lse);
      {
        UseFold use(Fold::kRowTile);
        fast::Attention(q.data(), cache->Layer(0), a, sp, want.data(), want_lse.data(), tc);
      }
      {
        UseFold use(fold);
        fast::Attention(q.data(), cache->Layer(0), a, sp, out.data(), lse.data(), tc);
      }
      for (int64_t t = 0; t < a.T; ++t)
        for (int64_t head = 0; head < a.heads; ++head) {
          const int64_t h = head / G;
          const float* qh = &q[static_cast<size_t>((t * a.heads + head) * D)];
          double eps = 0, vmax = 0;
          for (int64_t j = 0; j < n_tok; ++j) {
            double mag = 0;
            for (int64_t d = 0; d < D; ++d) {
              const float other = qh[(d + D / 2) % D];
              mag += std::sqrt(double{qh[d]} * qh[d] + double{other} * other) *
                     std::fabs(k[static_cast<size_t>((j * Hk + h) * D + d)]);
              vmax =
                  std::max(vmax, std::fabs(double{v[static_cast<size_t>((j * Hk + h) * D + d)]}));
            }
            eps = std::max(eps, std::ldexp(a.scale * mag, -9));
          }
          const double rel = std::exp(2 * eps + std::ldexp(1.0, -8)) - 1;
          const size_t i = static_cast<size_t>(t * a.heads + head);
          ASSERT_NEAR(lse[i], want_lse[i], eps + std::ldexp(1.0, -9) + 2e-5)
              << "G " << G << " D " << D << " sparse " << sparse << " t " << t << " head " << head;
          for (int64_t d = 0; d < D; ++d)
            ASSERT_NEAR(out[i * D + d], want[i * D + d], vmax * rel + 2e-5)
                << "G " << G << " D " << D << " sparse " << sparse << " t " << t << " head " << head
                << " d " << d;
        }
    }
  }
}

TEST(PromptFold, TilesWithinTheDerivedBound) {
  if (!amx::Supported()) GTEST_SKIP() << "this CPU (or kernel) has no AMX-BF16 tiles";
  ExpectWithinTheBf16Bound(Fold::kTiles);
}

TEST(PromptFold, Bf16DotsWithinTheDerivedBound) {
  if (!avx512::HasBf16()) GTEST_SKIP() << "this CPU (or OS) has no AVX512-BF16";
  ExpectWithinTheBf16Bound(Fold::kBf16Dot);
}

// NEEDLE_CPU_BF16DOT's modes: off never; on where the CPU can, for even head dims (decode:
// multiples of 32 up to 256); auto as on, but only on CPUs without AMX.
TEST(PromptFold, Bf16DotModeSelectsTheFold) {
  bf16dot::SetMode(bf16dot::Mode::kOff);
  EXPECT_FALSE(bf16dot::Use(128));
  EXPECT_FALSE(bf16dot::UseBlocks(4, 128));
  bf16dot::SetMode(bf16dot::Mode::kOn);
  EXPECT_EQ(bf16dot::Use(128), avx512::HasBf16());
  EXPECT_EQ(bf16dot::Use(72), avx512::HasBf16());
  EXPECT_FALSE(bf16dot::Use(7));
  EXPECT_EQ(bf16dot::UseBlocks(7, 128), avx512::HasBf16());
  EXPECT_FALSE(bf16dot::UseBlocks(4, 72));
  EXPECT_FALSE(bf16dot::UseBlocks(4, 512));
  bf16dot::SetMode(bf16dot::Mode::kAuto);
  EXPECT_EQ(bf16dot::Use(128), avx512::HasBf16() && !amx::Supported());
  EXPECT_EQ(bf16dot::UseBlocks(4, 128), avx512::HasBf16() && !amx::Supported());
  bf16dot::SetMode(bf16dot::Mode::kFromEnv);
}

}  // namespace
}  // namespace needle
