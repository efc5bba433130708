// End-to-end decode tokens/s with random weights (--dummy-weights) at the shapes of real models
// (configs in bench/configs/), after a prefill of 512 tokens. Reports tokens/s and the effective
// weight-read bandwidth (bytes of weights per token x tokens/s) against measured DRAM bandwidth:
// decode is bound by reading every weight once per token.
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "engine/model/model.h"

namespace needle::bench {
namespace {

void Decode(benchmark::State& state, const std::string& config) {
  ThreadingContext& tc = BenchContext();
  const double peak = MeasuredReadBandwidth();
  auto backend = MakeCpuBackend(tc, false);
  auto model =
      MakeDummyModel(std::string(NEEDLE_BENCH_CONFIGS) + "/" + config, DType::kBF16, *backend, tc);
  const int64_t prompt_len = 512;
  KVCache cache(model->CacheShape(prompt_len + 4096, DType::kBF16));
  std::vector<int32_t> prompt(prompt_len);
  for (int64_t i = 0; i < prompt_len; ++i) prompt[i] = static_cast<int32_t>((i * 7919) % 1000 + 10);
  std::vector<float> logits;
  model->Forward(prompt.data(), prompt_len, cache, false, &logits);
  int32_t tok = 11;
  for (auto _ : state) {
    if (cache.size() + 1 >= cache.shape().capacity) {
      state.PauseTiming();
      cache.SetSize(prompt_len);
      state.ResumeTiming();
    }
    model->Forward(&tok, 1, cache, false, &logits);
    tok = static_cast<int32_t>((tok * 31 + 7) % 1000 + 10);
  }
  // Bytes read per token: every matrix except the embedding table (only one row of it is read).
  const double bytes = static_cast<double>(
      model->weights().TotalBytes() - model->weights().embed.nbytes() +
      (model->config().tie_word_embeddings ? model->weights().embed.nbytes() : 0));
  state.counters["tok/s"] =
      benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["weight_GB/s"] =
      benchmark::Counter(bytes * state.iterations() / 1e9, benchmark::Counter::kIsRate);
  state.counters["of_peak"] =
      benchmark::Counter(bytes * state.iterations() / peak, benchmark::Counter::kIsRate);
  state.counters["threads"] = tc.threads();
}

BENCHMARK_CAPTURE(Decode, qwen2_5_0_5b, std::string("qwen2.5-0.5b.json"))
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(Decode, qwen2_5_7b, std::string("qwen2.5-7b.json"))
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(3.0);

}  // namespace
}  // namespace needle::bench

BENCHMARK_MAIN();
