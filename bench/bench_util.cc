#include "bench/bench_util.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "bench/bench_util.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace needle::bench {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
// Sums n floats with the widest vectors of this CPU and 4 independent accumulators, so the
// loop is limited by memory, not by the core.
float SumFloats(const float* p, size_t n) {
  const hn::ScalableTag<float> d;
  const size_t L = hn::Lanes(d);
  auto a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
  size_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    a0 = hn::Add(a0, hn::LoadU(d, p + i));
    a1 = hn::Add(a1, hn::LoadU(d, p + i + L));
    a2 = hn::Add(a2, hn::LoadU(d, p + i + 2 * L));
    a3 = hn::Add(a3, hn::LoadU(d, p + i + 3 * L));
  }
  return hn::GetLane(hn::SumOfLanes(d, hn::Add(hn::Add(a0, a1), hn::Add(a2, a3))));
}
// n rounds of 12 independent multiply-add chains (enough to cover the latency of two pipes);
// returns a lane of their sum (so that the work is kept) and the lanes per vector in *lanes.
float FmaChains(int64_t n, size_t* lanes) {
  const hn::ScalableTag<float> d;
  *lanes = hn::Lanes(d);
  hn::Vec<decltype(d)> a[12];
  for (int i = 0; i < 12; ++i) a[i] = hn::Set(d, 1.0f + 1e-7f * static_cast<float>(i));
  const auto b = hn::Set(d, 0.9999999f), c = hn::Set(d, 1e-7f);
  for (int64_t r = 0; r < n; ++r)
    for (int i = 0; i < 12; ++i) a[i] = hn::MulAdd(a[i], b, c);
  for (int i = 1; i < 12; ++i) a[0] = hn::Add(a[0], a[i]);
  return hn::GetLane(a[0]);
}
}  // namespace HWY_NAMESPACE
}  // namespace needle::bench
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace needle::bench {
HWY_EXPORT(SumFloats);
HWY_EXPORT(FmaChains);

namespace {
// The best of `passes` rates work / (seconds of one run()).
template <class F>
double BestRate(int passes, double work, const F& run) {
  double best = 0;
  for (int pass = 0; pass < passes; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, work / dt);
  }
  return best;
}
}  // namespace

int BenchThreads() {
  const char* e = std::getenv("NEEDLE_BENCH_THREADS");
  return e != nullptr ? std::max(1, std::atoi(e)) : 0;
}

ThreadingContext& BenchContext() {
  static ThreadingContext tc(BenchThreads());
  return tc;
}

double MeasuredReadBandwidth() {
  static double cached = 0;
  if (cached > 0) return cached;
  ThreadingContext& tc = BenchContext();
  const size_t n = (size_t{1} << 30) / sizeof(float);  // 1 GiB
  std::vector<float> buf(n);
  tc.ParallelFor(n, 1 << 16, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) buf[i] = static_cast<float>(i & 1023);
  });
  const size_t parts = static_cast<size_t>(tc.threads()) * 8;
  std::vector<float> sink(parts);
  const double best = BestRate(8, static_cast<double>(n * sizeof(float)), [&] {
    tc.ParallelFor(parts, 1, [&](size_t b, size_t e) {
      for (size_t p = b; p < e; ++p)
        sink[p] = HWY_DYNAMIC_DISPATCH(SumFloats)(buf.data() + p * (n / parts), n / parts);
    });
  });
  float total = 0;
  for (auto s : sink) total += s;
  std::fprintf(stderr, "measured DRAM read bandwidth: %.1f GB/s with %d threads (checksum %g)\n",
               best / 1e9, tc.threads(), static_cast<double>(total));
  cached = best;
  return cached;
}

double MeasuredFmaPeak() {
  static double cached = 0;
  if (cached > 0) return cached;
  ThreadingContext& tc = BenchContext();
  const int64_t rounds = 20000000;
  const size_t parts = static_cast<size_t>(tc.threads());
  std::vector<float> sink(parts);
  size_t lanes = 1;
  HWY_DYNAMIC_DISPATCH(FmaChains)(1, &lanes);
  const double best = BestRate(3, static_cast<double>(parts * rounds * 12 * lanes * 2), [&] {
    tc.ParallelFor(parts, 1, [&](size_t b, size_t e) {
      size_t l;
      for (size_t p = b; p < e; ++p) sink[p] = HWY_DYNAMIC_DISPATCH(FmaChains)(rounds, &l);
    });
  });
  float total = 0;
  for (auto s : sink) total += s;
  std::fprintf(stderr, "measured f32 FMA peak: %.1f GFLOP/s with %d threads (checksum %g)\n",
               best / 1e9, tc.threads(), static_cast<double>(total));
  cached = best;
  return cached;
}

}  // namespace needle::bench
#endif  // HWY_ONCE
