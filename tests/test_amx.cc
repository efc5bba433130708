// The AMX block fold (engine/cpu/amx.h) through fast::AttendBlocks, against attention computed in
// double from the same bf16 keys and values, within amx.h's derived bound: with
// eps = 2^-9 * scale * max_j sum_d |q_d k_jd| over the attended keys (the queries' bf16 rounding),
//   |out - exact| <= max_j |v_j| * (exp(2 eps + 2^-8) - 1)   (+ 1e-5 of f32 accumulation)
//   |lse - exact| <= eps + 2^-9                               (+ 1e-5)
// The block masses (AttendBlocks' per-block sums) are probabilities, off by at most the same
// relative amount. A fold that skipped, repeated or misplaced a key or a channel would be off by
// a sizeable fraction of |v|; the bound for these inputs is 1-4% of it. Skipped where the CPU
// has no AMX (the Highway fold then runs, tested in test_hybrid.cc).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "engine/base/dtype.h"
#include "engine/cpu/amx.h"
#include "engine/cpu/ops.h"
#include "sparse_attn/block_mass.h"
#include "tests/test_util.h"

namespace needle {
namespace {

float RoundBf16(float x) { return BF16ToF32(F32ToBF16(x)); }

// A one-layer bf16 cache of n_tok tokens of Hk KV heads, filled with random keys (magnitude 2)
// and values rounded to bf16 first, so that *k and *v ([token][kv head][D]) are what it holds.
std::unique_ptr<KVCache> RandomBf16Cache(int64_t Hk, int64_t D, int64_t n_tok, int64_t B,
                                         uint64_t seed, std::vector<float>* k,
                                         std::vector<float>* v) {
  auto cache = std::make_unique<KVCache>(KVCacheShape(1, Hk, D, n_tok, B, DType::kBF16));
  *k = test::RandomVector(n_tok * Hk * D, seed, 2.f);
  *v = test::RandomVector(n_tok * Hk * D, seed + 1);
  for (float& x : *k) x = RoundBf16(x);
  for (float& x : *v) x = RoundBf16(x);
  cache->Write(0, 0, n_tok, k->data(), v->data());
  cache->SetSize(n_tok);
  return cache;
}

TEST(Amx, AttendBlocksWithinTheDerivedBound) {
  if (!amx::Supported()) GTEST_SKIP() << "this CPU (or kernel) has no AMX-BF16 tiles";
  amx::SetMode(amx::Mode::kOn);  // every group size, not only kAuto's
  ThreadingContext tc(2);
  struct Shape {
    int64_t G, D, B, n_tok;
  };
  // Head dims 32-128, groups 1-16, blocks shorter than a tile pair, with a tail, and whole.
  const Shape shapes[] = {{7, 128, 128, 1000}, {4, 64, 16, 300},  {1, 32, 48, 200},
                          {16, 96, 128, 700},  {8, 128, 32, 170}, {5, 64, 80, 333}};
  for (const Shape& sh : shapes) {
    const int64_t Hk = 2, G = sh.G, D = sh.D, B = sh.B, n_tok = sh.n_tok;
    std::vector<float> k, v;
    const auto cache = RandomBf16Cache(Hk, D, n_tok, B, 11, &k, &v);
    AttnArgs a;
    a.T = 1, a.pos0 = n_tok - 1, a.heads = Hk * G, a.kv_heads = Hk, a.head_dim = D;
    a.scale = 1.0f / std::sqrt(static_cast<float>(D));
    const std::vector<float> q = test::RandomVector(a.heads * D, 13, 2.f);
    const int64_t nb = (n_tok + B - 1) / B;
    std::vector<std::vector<int32_t>> blocks(2);
    for (int32_t b = 0; b < nb; b += 2) blocks[0].push_back(b);  // every other, the last maybe
    for (int32_t b = 0; b < nb; ++b) blocks[1].push_back(b);     // all, the partial last one
    std::vector<float> out(static_cast<size_t>(a.heads * D)), lse(static_cast<size_t>(a.heads)),
        stats;
    fast::AttendBlocks(q.data(), cache->Layer(0), a, blocks, out.data(), lse.data(), &stats, tc);
    std::vector<std::vector<float>> mass;
    fast::BlockMassFromStats(stats, lse.data(), G, blocks, &mass);
    // Keys are written as [token][kv head][D] in k and v.
    auto K = [&](int64_t t, int64_t h) { return &k[static_cast<size_t>((t * Hk + h) * D)]; };
    auto V = [&](int64_t t, int64_t h) { return &v[static_cast<size_t>((t * Hk + h) * D)]; };
    for (int64_t h = 0; h < Hk; ++h) {
      std::vector<int64_t> keys;
      for (int32_t b : blocks[h])
        for (int64_t t = int64_t{b} * B; t < std::min<int64_t>((b + 1) * B, n_tok); ++t)
          keys.push_back(t);
      for (int64_t g = 0; g < G; ++g) {
        const float* qh = &q[static_cast<size_t>((h * G + g) * D)];
        std::vector<double> s(keys.size());
        double mx = -INFINITY, eps = 0, vmax = 0;
        for (size_t j = 0; j < keys.size(); ++j) {
          double dot = 0, mag = 0;
          for (int64_t d = 0; d < D; ++d) {
            dot += double{qh[d]} * K(keys[j], h)[d];
            mag += std::fabs(double{qh[d]} * K(keys[j], h)[d]);
          }
          s[j] = a.scale * dot, mx = std::max(mx, s[j]);
          eps = std::max(eps, std::ldexp(a.scale * mag, -9));
          for (int64_t d = 0; d < D; ++d)
            vmax = std::max(vmax, std::fabs(double{V(keys[j], h)[d]}));
        }
        double l = 0;
        for (double x : s) l += std::exp(x - mx);
        const double want_lse = mx + std::log(l);
        const double rel = std::exp(2 * eps + std::ldexp(1.0, -8)) - 1;
        const int64_t head = h * G + g;
        ASSERT_NEAR(lse[head], want_lse, eps + std::ldexp(1.0, -9) + 1e-5)
            << "G " << G << " D " << D << " B " << B << " head " << head;
        for (int64_t d = 0; d < D; ++d) {
          double want = 0;
          for (size_t j = 0; j < keys.size(); ++j)
            want += std::exp(s[j] - want_lse) * V(keys[j], h)[d];
          ASSERT_NEAR(out[head * D + d], want, vmax * rel + 1e-5)
              << "G " << G << " D " << D << " B " << B << " head " << head << " d " << d;
        }
      }
      // Each block's mass, summed over the group: within the same relative error of the exact.
      for (size_t i = 0; i < blocks[h].size(); ++i) {
        const int64_t t0 = int64_t{blocks[h][i]} * B;
        double want = 0, eps = 0;
        for (int64_t g = 0; g < G; ++g) {
          const float* qh = &q[static_cast<size_t>((h * G + g) * D)];
          std::vector<double> s;
          double mx = -INFINITY;
          for (const int32_t b : blocks[h])
            for (int64_t t = int64_t{b} * B; t < std::min<int64_t>((b + 1) * B, n_tok); ++t) {
              double dot = 0, mag = 0;
              for (int64_t d = 0; d < D; ++d) {
                dot += double{qh[d]} * K(t, h)[d];
                mag += std::fabs(double{qh[d]} * K(t, h)[d]);
              }
              s.push_back(a.scale * dot), mx = std::max(mx, s.back());
              eps = std::max(eps, std::ldexp(a.scale * mag, -9));
            }
          double l = 0;
          for (double x : s) l += std::exp(x - mx);
          for (int64_t t = t0; t < std::min<int64_t>(t0 + B, n_tok); ++t) {
            double dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += double{qh[d]} * K(t, h)[d];
            want += std::exp(a.scale * dot - mx) / l;
          }
        }
        const double rel = std::exp(2 * eps + std::ldexp(1.0, -8)) - 1;
        ASSERT_NEAR(mass[h][i], want, want * 2 * rel + 1e-5)
            << "G " << G << " D " << D << " B " << B << " block " << blocks[h][i];
      }
    }
  }
  amx::SetMode(amx::Mode::kFromEnv);
}

// Prompts (fast::Attention, T > 1): causal dense and sparse spans with position remapping's
// rotations, the tile fold against the Highway fold (f32, within 1e-5 of exact), within the same
// bound; |q_d| is bounded by its rotate-half pair's magnitude, sqrt(q_d^2 + q_(d+-D/2)^2), which
// any rotation keeps, and the bound takes the largest over all keys of the head.
TEST(Amx, PromptWithinTheDerivedBound) {
  if (!amx::Supported()) GTEST_SKIP() << "this CPU (or kernel) has no AMX-BF16 tiles";
  ThreadingContext tc(2);
  struct Shape {
    int64_t G, D, B, T, pos0;
  };
  const Shape shapes[] = {{4, 64, 128, 300, 500}, {7, 128, 32, 90, 700}, {1, 32, 48, 70, 100}};
  for (const Shape& sh : shapes)
    for (bool sparse : {false, true}) {
      const int64_t Hk = 2, G = sh.G, D = sh.D, n_tok = sh.pos0 + sh.T;
      std::vector<float> k, v;
      const auto cache = RandomBf16Cache(Hk, D, n_tok, sh.B, 21, &k, &v);
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
      amx::SetMode(amx::Mode::kOff);
      fast::Attention(q.data(), cache->Layer(0), a, sp, want.data(), want_lse.data(), tc);
      amx::SetMode(amx::Mode::kOn);
      fast::Attention(q.data(), cache->Layer(0), a, sp, out.data(), lse.data(), tc);
      amx::SetMode(amx::Mode::kFromEnv);
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

// The modes: off never, on wherever the shape fits (and the CPU has the tiles), auto for groups
// of kAutoMinGroup heads and more.
TEST(Amx, ModeSelectsTheFold) {
  amx::SetMode(amx::Mode::kOff);
  EXPECT_FALSE(amx::Use(7, 128));
  amx::SetMode(amx::Mode::kOn);
  EXPECT_EQ(amx::Use(4, 128), amx::Supported());
  EXPECT_FALSE(amx::Use(4, 256));
  amx::SetMode(amx::Mode::kAuto);
  EXPECT_EQ(amx::Use(amx::kAutoMinGroup, 128), amx::Supported());
  EXPECT_FALSE(amx::Use(amx::kAutoMinGroup - 1, 128));
  EXPECT_TRUE(amx::Fits(7, 128));
  EXPECT_TRUE(amx::Fits(16, 32));
  EXPECT_FALSE(amx::Fits(17, 128));
  EXPECT_FALSE(amx::Fits(4, 256));
  EXPECT_FALSE(amx::Fits(4, 80));
  amx::SetMode(amx::Mode::kFromEnv);
}

}  // namespace
}  // namespace needle
