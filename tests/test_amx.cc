// The AMX block fold (engine/cpu/amx.h) through fast::AttendBlocks, against attention computed in
// double from the same bf16 keys and values, within amx.h's derived bound: with
// eps = 2^-9 * scale * max_j sum_d |q_d k_jd| over the attended keys (the queries' bf16 rounding),
//   |out - exact| <= max_j |v_j| * (exp(2 eps + 2^-8) - 1)   (+ 1e-5 of f32 accumulation)
//   |lse - exact| <= eps + 2^-9                               (+ 1e-5)
// The block masses (AttendBlocks' per-block sums) are probabilities, off by at most the same
// relative amount. A fold that skipped, repeated or misplaced a key or a channel would be off by
// a sizeable fraction of |v|; the bound for these inputs is 1-4% of it. The AVX512-BF16 decode
// fold (engine/cpu/bf16dot.h) keeps the same bound and is checked the same way. Each is skipped
// where the CPU lacks it (the Highway fold then runs, tested in test_hybrid.cc). Prompts on the
// tiles: test_prompt_fold.cc.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "engine/base/dtype.h"
#include "engine/cpu/amx.h"
#include "engine/cpu/avx512.h"
#include "engine/cpu/bf16dot.h"
#include "engine/cpu/ops.h"
#include "sparse_attn/block_mass.h"
#include "tests/bf16_cache_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

// fast::AttendBlocks on the fold that tiles (true: AMX, false: AVX512-BF16) selects.
void ExpectBlocksWithinTheBound(bool tiles) {
  amx::SetMode(tiles ? amx::Mode::kOn : amx::Mode::kOff);  // every group size, not only kAuto's
  bf16dot::SetMode(tiles ? bf16dot::Mode::kOff : bf16dot::Mode::kOn);
  struct Restore {
    ~Restore() {
      amx::SetMode(amx::Mode::kFromEnv);
      bf16dot::SetMode(bf16dot::Mode::kFromEnv);
    }
  } restore;
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
    const auto cache = test::RandomBf16Cache(Hk, D, n_tok, B, 11, &k, &v);
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
    // Wake's team (the hybrid's worker folds on it) gives the same bits.
    tc.Wake(20 * 1000);
    {
      std::vector<float> out2(out.size()), lse2(lse.size()), stats2;
      fast::AttendBlocks(q.data(), cache->Layer(0), a, blocks, out2.data(), lse2.data(), &stats2,
                         tc);
      tc.Rest();
      ASSERT_EQ(0, std::memcmp(out2.data(), out.data(), out.size() * 4)) << "G " << G;
      ASSERT_EQ(0, std::memcmp(lse2.data(), lse.data(), lse.size() * 4)) << "G " << G;
    }
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
}

TEST(Amx, AttendBlocksWithinTheDerivedBound) {
  if (!amx::Supported()) GTEST_SKIP() << "this CPU (or kernel) has no AMX-BF16 tiles";
  ExpectBlocksWithinTheBound(true);
}

TEST(Bf16Dot, AttendBlocksWithinTheDerivedBound) {
  if (!avx512::HasBf16()) GTEST_SKIP() << "this CPU (or OS) has no AVX512-BF16";
  ExpectBlocksWithinTheBound(false);
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
