// The fast CPU kernels (Highway + oneTBB) against the scalar reference on random inputs of many
// shapes, odd sizes included. Tolerances are derived, not guessed:
//  * a dot product of length K in f32 has |error| <= K * u * sum_k |x_k w_k| (u = 2^-24) for any
//    summation order; two orders differ by at most twice that. Weights in bf16/f16 are read
//    exactly by both sides, so the same bound holds for every weight type.
//  * attention: each score carries the dot bound above (times the scale); the softmax-weighted
//    sum of n values of magnitude <= max|v| adds n * u * max|v| per side.
//  * element-wise ops: a few ulps (Highway's Exp is accurate to ~2 ulp; RMSNorm's mean of
//    squares is accumulated in a different order: D * u relative).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>
#include <tuple>

#include "engine/attention/partial.h"
#include "engine/cpu/amx.h"
#include "engine/cpu/bf16dot.h"
#include "engine/cpu/ops.h"
#include "tests/test_util.h"

namespace needle {
namespace {

constexpr double kU = 1.0 / (1 << 24);

struct OwnedWeight {
  std::vector<uint8_t> bytes;
  Weight w;
};

OwnedWeight MakeWeight(DType t, int64_t rows, int64_t cols, uint64_t seed, float scale = 1.0f) {
  OwnedWeight o;
  const std::vector<float> v = test::RandomVector(static_cast<size_t>(rows * cols), seed, scale);
  o.bytes.resize(v.size() * DTypeSize(t) + 1);
  for (size_t i = 0; i < v.size(); ++i) StoreFromF32(t, o.bytes.data(), i, v[i]);
  o.w = Weight{"w", t, rows, cols, o.bytes.data()};
  return o;
}

class MatMulTest
    : public ::testing::TestWithParam<std::tuple<DType, int64_t, int64_t, int64_t, bool>> {};

TEST_P(MatMulTest, FastMatchesReference) {
  const auto [t, T, N, K, with_bias] = GetParam();
  ThreadingContext tc(2);
  const OwnedWeight w = MakeWeight(t, N, K, 11 + N * 7 + K);
  const OwnedWeight b = MakeWeight(t, 1, N, 5);
  const std::vector<float> x = test::RandomVector(static_cast<size_t>(T * K), 3 + T);
  std::vector<float> ref(T * N, NAN), fast(T * N, NAN);
  const Weight* bias = with_bias ? &b.w : nullptr;
  ref::MatMul(x.data(), T, w.w, bias, ref.data(), tc);
  fast::MatMul(x.data(), T, w.w, bias, fast.data(), tc);
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      double mag = 0;
      for (int64_t k = 0; k < K; ++k)
        mag += std::fabs(x[i * K + k] * LoadAsF32(t, w.w.data, static_cast<size_t>(n * K + k)));
      const double tol = 2.0 * (K + 1) * kU * (mag + 1.0);
      ASSERT_NEAR(fast[i * N + n], ref[i * N + n], tol) << "t=" << i << " n=" << n;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, MatMulTest,
                         ::testing::Combine(::testing::Values(DType::kF32, DType::kBF16,
                                                              DType::kF16),
                                            ::testing::Values(1, 2, 3, 7, 50),   // tokens
                                            ::testing::Values(1, 5, 64, 131),    // N
                                            ::testing::Values(1, 13, 128, 257),  // K
                                            ::testing::Bool()));

TEST(Kernels, RmsNorm) {
  ThreadingContext tc(2);
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (auto [rows, D] :
         {std::pair<int64_t, int64_t>{1, 1}, {3, 7}, {5, 64}, {2, 130}, {4, 4096}}) {
      const OwnedWeight w = MakeWeight(t, 1, D, 9);
      const auto x = test::RandomVector(rows * D, 17, 3.0f);
      std::vector<float> r(rows * D), f(rows * D);
      ref::RmsNorm(x.data(), rows, D, w.w, 1e-6f, r.data(), tc);
      fast::RmsNorm(x.data(), rows, D, w.w, 1e-6f, f.data(), tc);
      for (size_t i = 0; i < r.size(); ++i)
        ASSERT_NEAR(f[i], r[i], (D + 8) * kU * (std::fabs(r[i]) + 1e-3)) << i;
    }
  }
}

TEST(Kernels, Rope) {
  ThreadingContext tc(2);
  for (auto [T, heads, D] :
       {std::tuple<int64_t, int64_t, int64_t>{1, 1, 2}, {3, 7, 64}, {5, 4, 128}, {2, 3, 18}}) {
    std::vector<float> inv(D / 2);
    for (int64_t i = 0; i < D / 2; ++i) inv[i] = std::pow(10000.0f, -2.0f * i / D);
    auto r = test::RandomVector(T * heads * D, 21);
    auto f = r;
    ref::Rope(r.data(), T, heads, D, 1000, inv.data(), 1.1f, tc);
    fast::Rope(f.data(), T, heads, D, 1000, inv.data(), 1.1f, tc);
    for (size_t i = 0; i < r.size(); ++i)
      ASSERT_NEAR(f[i], r[i], 4 * kU * (std::fabs(r[i]) + 1.0)) << i;
  }
}

TEST(Kernels, SiluMulAndAdd) {
  ThreadingContext tc(2);
  for (int64_t n : {1, 7, 64, 1000, 70001}) {
    const auto g = test::RandomVector(n, 1, 4.0f), u = test::RandomVector(n, 2);
    std::vector<float> r(n), f(n);
    ref::SiluMul(g.data(), u.data(), n, r.data(), tc);
    fast::SiluMul(g.data(), u.data(), n, f.data(), tc);
    for (int64_t i = 0; i < n; ++i)
      ASSERT_NEAR(f[i], r[i], 16 * kU * (std::fabs(r[i]) + 1e-6)) << i;
    auto a = g, b = g;
    ref::Add(a.data(), u.data(), n, tc);
    fast::Add(b.data(), u.data(), n, tc);
    EXPECT_EQ(a, b);
  }
}

struct AttnCase {
  int64_t T, pos0, heads, kv_heads, D, window, block;
};

// Random spans for item (t, h): a few whole or partial ranges before the query, ascending.
AttnSpans RandomSpans(const AttnCase& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  AttnSpans s;
  s.offsets.push_back(0);
  for (int64_t t = 0; t < c.T; ++t) {
    for (int64_t h = 0; h < c.kv_heads; ++h) {
      const int64_t p = c.pos0 + t;
      int64_t at = 0;
      while (at <= p) {
        const int64_t len =
            1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(2 * c.block + 1));
        const int64_t end = std::min(p + 1, at + len);
        if (rng() % 3 != 0) s.spans.push_back({at, end});
        at = end + static_cast<int64_t>(rng() % static_cast<uint64_t>(c.block));
      }
      if (s.spans.size() == static_cast<size_t>(s.offsets.back())) s.spans.push_back({p, p + 1});
      s.offsets.push_back(static_cast<int64_t>(s.spans.size()));
    }
  }
  // Position remapping: half the spans score with one of three further rotations of the query.
  std::vector<float> inv_freq(static_cast<size_t>(c.D / 2));
  for (int64_t i = 0; i < c.D / 2; ++i)
    inv_freq[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / static_cast<double>(c.D)));
  s.rot_table.resize(static_cast<size_t>(3 * c.D));
  const int64_t deltas[3] = {-1000, -37, 5};
  for (int r = 0; r < 3; ++r) RotationRow(deltas[r], inv_freq.data(), c.D, &s.rot_table[r * c.D]);
  for (size_t i = 0; i < s.spans.size(); ++i)
    s.rot.push_back(rng() % 2 == 0 ? -1 : static_cast<int32_t>(rng() % 3));
  return s;
}

class AttentionTest : public ::testing::TestWithParam<std::tuple<AttnCase, DType, bool>> {};

TEST_P(AttentionTest, FastMatchesReference) {
  const auto [c, kv_type, sparse] = GetParam();
  // The Highway folds (the AMX and AVX512-BF16 ones round queries to bf16: test_amx.cc and
  // test_prompt_fold.cc, their own bound).
  amx::SetMode(amx::Mode::kOff);
  bf16dot::SetMode(bf16dot::Mode::kOff);
  struct Restore {
    ~Restore() {
      amx::SetMode(amx::Mode::kFromEnv);
      bf16dot::SetMode(bf16dot::Mode::kFromEnv);
    }
  } restore;
  const int64_t n_tok = c.pos0 + c.T;
  KVCache cache(KVCacheShape{1, c.kv_heads, c.D, n_tok + 3, c.block, kv_type});
  const auto k = test::RandomVector(n_tok * c.kv_heads * c.D, 31);
  const auto v = test::RandomVector(n_tok * c.kv_heads * c.D, 32);
  cache.Write(0, 0, n_tok, k.data(), v.data());
  cache.SetSize(n_tok);
  const auto q = test::RandomVector(c.T * c.heads * c.D, 33);
  AttnArgs a{
      c.T, c.pos0, c.heads, c.kv_heads, c.D, c.window, 1.0f / std::sqrt(static_cast<float>(c.D))};
  const AttnSpans spans = RandomSpans(c, 7);
  const AttnSpans* sp = sparse ? &spans : nullptr;
  float qmax = 0, kmax = 0, vmax = 0;
  for (float x : q) qmax = std::max(qmax, std::fabs(x));
  for (float x : k) kmax = std::max(kmax, std::fabs(x));
  for (float x : v) vmax = std::max(vmax, std::fabs(x));
  const double score_err = 2.0 * c.D * kU * c.D * qmax * kmax * a.scale;
  const double tol = vmax * (2.0 * (n_tok + 4) * kU + 2.0 * score_err);
  std::vector<float> r(c.T * c.heads * c.D, NAN), rl(c.T * c.heads, NAN);
  ThreadingContext tc1(1);
  ref::Attention(q.data(), cache.Layer(0), a, sp, r.data(), rl.data(), tc1);
  for (int threads : {1, 3}) {
    ThreadingContext tc(threads);
    std::vector<float> f(c.T * c.heads * c.D, NAN), fl(c.T * c.heads, NAN);
    fast::Attention(q.data(), cache.Layer(0), a, sp, f.data(), fl.data(), tc);
    for (size_t i = 0; i < r.size(); ++i)
      ASSERT_NEAR(f[i], r[i], tol) << "index " << i << " threads " << threads;
    for (size_t i = 0; i < rl.size(); ++i)
      ASSERT_NEAR(fl[i], rl[i], 1e-5 * (std::fabs(rl[i]) + 1) + score_err) << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionTest,
    ::testing::Combine(
        ::testing::Values(AttnCase{1, 0, 4, 4, 64, 0, 128},     // first token, GQA 1
                          AttnCase{1, 999, 8, 2, 128, 0, 128},  // decode, GQA 4, key splits
                          AttnCase{1, 2600, 7, 1, 64, 0, 64},   // decode, GQA 7, splits
                          AttnCase{37, 0, 8, 1, 128, 0, 16},    // prefill, GQA 8, small blocks
                          AttnCase{150, 40, 8, 2, 64, 0, 32},   // prefill, token groups
                          AttnCase{5, 300, 4, 1, 64, 64, 32},   // sliding window
                          AttnCase{9, 130, 6, 2, 72, 0, 50},    // head_dim 72, odd block
                          AttnCase{3, 5, 2, 2, 6, 0, 4},        // tiny head_dim
                          AttnCase{2, 400, 12, 1, 80, 0, 32}),  // GQA 12: two head tiles
        ::testing::Values(DType::kF32, DType::kBF16, DType::kF16, DType::kI8), ::testing::Bool()));

TEST(Kernels, Int8KVQuantisationError) {
  // Symmetric per-32-channel int8: |x - deq(x)| <= scale / 2 = max|group| / 254.
  KVCache cache(KVCacheShape{1, 2, 72, 5, 4, DType::kI8});
  const auto k = test::RandomVector(5 * 2 * 72, 1), v = test::RandomVector(5 * 2 * 72, 2);
  cache.Write(0, 0, 5, k.data(), v.data());
  const KVLayerView view = cache.Layer(0);
  for (int64_t t = 0; t < 5; ++t)
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t g = 0; g * 32 < 72; ++g) {
        float amax = 0;
        for (int64_t d = g * 32; d < std::min<int64_t>(72, g * 32 + 32); ++d)
          amax = std::max(amax, std::fabs(k[(t * 2 + h) * 72 + d]));
        for (int64_t d = g * 32; d < std::min<int64_t>(72, g * 32 + 32); ++d)
          ASSERT_NEAR(view.KAt(h, t, d), k[(t * 2 + h) * 72 + d], amax / 254 * 1.0001f);
      }
}

// Wake's spinners serve ParallelFor calls as a team (each index run once, call after call) and
// give the workers back at Rest, or at the deadline when none comes.
TEST(Threading, WakeServesParallelForUntilRestOrDeadline) {
  ThreadingContext tc(3);
  const auto until_idle = [&](double max_s) {
    const auto t0 = std::chrono::steady_clock::now();
    while (tc.spinners() > 0 &&
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < max_s)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return tc.spinners();
  };
  tc.Wake(30 * 1000 * 1000);  // 30 s
  EXPECT_GT(tc.spinners(), 0);
  for (int call = 0; call < 3; ++call) {
    std::vector<std::atomic<int>> hits(1000 + call);
    tc.ParallelFor(hits.size(), 1 + call, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) hits[i].fetch_add(1);
    });
    for (const auto& h : hits) ASSERT_EQ(h.load(), 1) << "call " << call;
  }
  // (Still there for the next call: the team, not oneTBB, ran them.)
  EXPECT_GT(tc.spinners(), 0);
  tc.Rest();
  EXPECT_EQ(until_idle(10.0), 0);  // released by Rest, not by the 30 s deadline
  tc.Wake(20 * 1000);              // 20 ms, and no ParallelFor
  EXPECT_EQ(until_idle(10.0), 0);
  ThreadingContext one(1);
  one.Wake(1000);
  EXPECT_EQ(one.spinners(), 0);
}

// A context destroyed right after a Wake: its spinners refer to it, and on a busy machine (more
// threads than cores, as here on 2 cores) some have not started when the destructor runs; it
// waits for every one to leave (without it, one that starts late reads and writes the freed
// context: ASan's heap-use-after-free on CI; on dev, 8 runs without the wait did not crash).
TEST(Threading, DestroyedRightAfterWakeWaitsForItsSpinners) {
  for (int i = 0; i < 50; ++i) {
    auto tc = std::make_unique<ThreadingContext>(8);
    tc->Wake(30 * 1000 * 1000);
    if (i % 2 == 0) {  // (and with a ParallelFor on the team before)
      std::vector<std::atomic<int>> hits(64);
      tc->ParallelFor(hits.size(), 1, [&](size_t b, size_t e) {
        for (size_t x = b; x < e; ++x) hits[x].fetch_add(1);
      });
      for (const auto& h : hits) ASSERT_EQ(h.load(), 1);
    }
    tc.reset();  // (returns once none is left: no 30 s deadline)
  }
}

// The team's harder cases: more than one thread takes its chunks (each sleeps, so that the
// caller alone takes a while); what a chunk throws comes out of the
// ParallelFor, and the team serves the next call; a ParallelFor inside a team's chunk (the team
// is taken: oneTBB runs it) and two callers at once (one on the team, one through oneTBB) run
// every index once.
TEST(Threading, TeamSpreadsRethrowsNestsAndSharesTheArena) {
  ThreadingContext tc(3);
  tc.Wake(30 * 1000 * 1000);
  std::mutex mu;
  std::set<std::thread::id> ran;
  // (About four chunks a thread: a spinner still on its way, a oneTBB worker moving over from
  // another arena on a loaded machine, may miss one call's few milliseconds; a team that never
  // spreads misses all 100.)
  for (int call = 0; call < 100 && ran.size() < 2; ++call)
    tc.ParallelFor(200, 1, [&](size_t, size_t) {
      std::this_thread::sleep_for(std::chrono::microseconds(500));
      std::lock_guard<std::mutex> lk(mu);
      ran.insert(std::this_thread::get_id());
    });
  EXPECT_GT(ran.size(), 1u);
  EXPECT_THROW(tc.ParallelFor(100, 1,
                              [&](size_t b, size_t e) {
                                if (b <= 37 && 37 < e) throw std::runtime_error("index 37");
                              }),
               std::runtime_error);
  std::vector<std::atomic<int>> hits(64 * 64);
  tc.ParallelFor(64, 1, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i)
      tc.ParallelFor(64, 4, [&](size_t b2, size_t e2) {
        for (size_t k = b2; k < e2; ++k) hits[i * 64 + k].fetch_add(1);
      });
  });
  for (const auto& h : hits) ASSERT_EQ(h.load(), 1);
  tc.Wake(30 * 1000 * 1000);  // (the nested calls' oneTBB runs released the spinners)
  std::vector<std::atomic<int>> a(5000), b(5000);
  std::thread other([&] {
    for (int r = 0; r < 20; ++r)
      tc.ParallelFor(250, 3, [&](size_t x, size_t y) {
        for (size_t i = x; i < y; ++i) b[r * 250 + i].fetch_add(1);
      });
  });
  for (int r = 0; r < 20; ++r)
    tc.ParallelFor(250, 3, [&](size_t x, size_t y) {
      for (size_t i = x; i < y; ++i) a[r * 250 + i].fetch_add(1);
    });
  other.join();
  for (size_t i = 0; i < a.size(); ++i) ASSERT_TRUE(a[i] == 1 && b[i] == 1) << i;
  tc.Rest();
}

// Start runs its function on the workers while the caller goes on (here: waits until the
// function has begun, which a Start that ran it inline would never let happen, so the test
// would time out); after Join its ParallelFor has run every index once, Wake's spinners (which
// would otherwise hold the workers) included; what it throws comes out of Join; with one thread
// it runs in Join.
TEST(Threading, StartRunsBesideTheCallerAndJoinWaits) {
  for (bool wake : {false, true}) {
    ThreadingContext tc(3);
    if (wake) tc.Wake(30 * 1000 * 1000);
    std::atomic<bool> begun{false};
    std::vector<std::atomic<int>> hits(1000);
    tc.Start([&] {
      begun = true;
      tc.ParallelFor(hits.size(), 1, [&](size_t b, size_t e) {
        for (size_t i = b; i < e; ++i) hits[i].fetch_add(1);
      });
    });
    const auto t0 = std::chrono::steady_clock::now();
    while (!begun && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20))
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    EXPECT_TRUE(begun.load()) << "wake " << wake;
    tc.Join();
    for (const auto& h : hits) ASSERT_EQ(h.load(), 1);
    tc.Start([] { throw std::runtime_error("from the started function"); });
    EXPECT_THROW(tc.Join(), std::runtime_error);
    tc.Join();  // (nothing started: returns)
  }
  ThreadingContext one(1);
  int runs = 0;
  one.Start([&] { ++runs; });
  EXPECT_EQ(runs, 0);
  EXPECT_THROW(one.Start([] {}), std::logic_error);
  one.Join();
  EXPECT_EQ(runs, 1);
}

TEST(Kernels, PartialAttentionMergeEqualsWhole) {
  // Splitting keys anywhere and merging the partials gives the softmax over all keys.
  const int64_t D = 5, n = 40;
  const auto s = test::RandomVector(n, 7, 5.0f);
  const auto v = test::RandomVector(n * D, 8);
  auto fold = [&](int64_t j0, int64_t j1, float* buf) {
    PartialAttention p(buf, D);
    for (int64_t j = j0; j < j1; ++j) p.m = std::max(p.m, s[j]);
    for (int64_t j = j0; j < j1; ++j) {
      const float e = std::exp(s[j] - p.m);
      p.l += e;
      for (int64_t d = 0; d < D; ++d) p.out[d] += e * v[j * D + d];
    }
    p.n = j1 - j0;
    return p;
  };
  std::vector<float> whole(D), a(D), b(D), c(D), ra(D), rw(D);
  PartialAttention pw = fold(0, n, whole.data());
  PartialAttention pa = fold(0, 13, a.data()), pb = fold(13, 13, b.data()),
                   pc = fold(13, n, c.data());
  EXPECT_TRUE(pb.empty());
  pa.Merge(pb);
  pa.Merge(pc);
  pa.Finalize(ra.data());
  pw.Finalize(rw.data());
  for (int64_t d = 0; d < D; ++d) EXPECT_NEAR(ra[d], rw[d], 1e-5);
  // Merging into an empty partial copies.
  std::vector<float> e(D);
  PartialAttention pe(e.data(), D);
  pe.Merge(pw);
  EXPECT_EQ(pe.n, n);
}

}  // namespace
}  // namespace needle
