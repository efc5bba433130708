// CPU matrix-vector (decode) and matrix-matrix (prefill) kernels at the shapes of 7B-class
// models (Qwen2.5-7B: hidden 3584, intermediate 18944; Llama-3.1-8B: 4096 / 14336), bf16 weights.
// Reports achieved GB/s (weight bytes read per second) next to the DRAM read bandwidth measured
// on this machine in the same run ("of_peak"), and GFLOP/s for prefill.
// Weights rotate among enough copies to exceed any cache, so decode numbers are DRAM numbers.
#include <benchmark/benchmark.h>

#include <vector>

#include "bench/bench_util.h"
#include "engine/cpu/ops.h"

namespace needle::bench {
namespace {

struct WeightSet {
  std::vector<std::vector<uint16_t>> copies;
  std::vector<Weight> w;
};

WeightSet MakeWeights(int64_t N, int64_t K) {
  WeightSet s;
  const size_t bytes = static_cast<size_t>(N * K) * 2;
  const size_t copies = std::max<size_t>(2, (size_t{768} << 20) / bytes + 1);
  for (size_t c = 0; c < copies; ++c) {
    s.copies.emplace_back(static_cast<size_t>(N * K));
    auto& v = s.copies.back();
    for (size_t i = 0; i < v.size(); ++i)
      v[i] = F32ToBF16(static_cast<float>((i * 2654435761u + c) % 1000) * 1e-4f - 0.05f);
    s.w.push_back(Weight{"w", DType::kBF16, N, K, v.data()});
  }
  return s;
}

void BM_MatVecBF16(benchmark::State& state) {
  const int64_t N = state.range(0), K = state.range(1);
  ThreadingContext& tc = BenchContext();
  const double peak = MeasuredReadBandwidth();
  WeightSet ws = MakeWeights(N, K);
  std::vector<float> x(K, 0.01f), y(N);
  size_t c = 0;
  for (auto _ : state) {
    fast::MatMul(x.data(), 1, ws.w[c], nullptr, y.data(), tc);
    benchmark::DoNotOptimize(y.data());
    c = (c + 1) % ws.w.size();
  }
  const double bytes = static_cast<double>(N * K) * 2 * state.iterations();
  state.counters["GB/s"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsRate);
  state.counters["of_peak"] = benchmark::Counter(bytes / peak, benchmark::Counter::kIsRate);
  state.counters["threads"] = tc.threads();
}

void BM_MatMulBF16(benchmark::State& state) {
  const int64_t T = state.range(0), N = state.range(1), K = state.range(2);
  ThreadingContext& tc = BenchContext();
  WeightSet ws = MakeWeights(N, K);
  std::vector<float> x(T * K, 0.01f), y(T * N);
  size_t c = 0;
  for (auto _ : state) {
    fast::MatMul(x.data(), T, ws.w[c], nullptr, y.data(), tc);
    benchmark::DoNotOptimize(y.data());
    c = (c + 1) % ws.w.size();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * T * N * K * state.iterations() / 1e9, benchmark::Counter::kIsRate);
  state.counters["threads"] = tc.threads();
}

// (N, K): q/o projections, MLP up/gate, MLP down of Qwen2.5-7B and Llama-3.1-8B.
BENCHMARK(BM_MatVecBF16)
    ->Args({3584, 3584})
    ->Args({18944, 3584})
    ->Args({3584, 18944})
    ->Args({4096, 4096})
    ->Args({14336, 4096})
    ->Args({4096, 14336})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_MatMulBF16)
    ->Args({128, 3584, 3584})
    ->Args({128, 18944, 3584})
    ->Args({128, 4096, 4096})
    ->Args({128, 14336, 4096})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace needle::bench

BENCHMARK_MAIN();
