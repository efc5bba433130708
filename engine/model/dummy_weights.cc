// Random weights at real model sizes, for benchmarks without the files (vLLM's "dummy" format).
#include <cmath>
#include <cstring>

#include "engine/base/error.h"
#include "engine/base/threading.h"
#include "engine/model/weights.h"

namespace needle {

namespace {
inline uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace

ModelWeights MakeDummyWeights(const ModelConfig& cfg, DType dtype, uint64_t seed,
                              ThreadingContext& threads,
                              const std::function<void(size_t, size_t)>& progress) {
  if (!IsFloatWeightType(dtype)) Fail("--dummy-weights: weight type must be f32, f16 or bf16");
  ModelWeights mw;
  mw.dtype = dtype;
  mw.layers.resize(static_cast<size_t>(cfg.num_layers));
  const std::vector<WeightSpec> specs = ExpectedWeights(cfg);
  const size_t esize = DTypeSize(dtype);
  std::vector<size_t> offsets;
  size_t total = 0;
  for (const auto& s : specs) {
    offsets.push_back(total);
    if (s.required) total += (static_cast<size_t>(s.rows * s.cols) * esize + 63) & ~size_t{63};
  }
  mw.arena.resize(total);
  size_t k = 0;
  ForEachWeight(mw, [&](Weight& w) {
    const WeightSpec& s = specs[k];
    const size_t off = offsets[k++];
    w.name = s.name;
    if (!s.required) return;
    w.dtype = dtype;
    w.rows = s.rows;
    w.cols = s.cols;
    w.data = mw.arena.data() + off;
  });
  if (!mw.lm_head.present()) mw.lm_head = mw.embed;

  // Fill: norms with 1, matrices and biases uniform in +-sqrt(3)*0.02 (std 0.02, the usual
  // initializer_range), in 1 MiB chunks in parallel; chunk i uses stream seed ^ i.
  k = 0;
  size_t filled = 0;
  ForEachWeight(mw, [&](Weight& w) {
    const WeightSpec& s = specs[k++];
    if (!w.present() || (w.data == mw.embed.data && &w == &mw.lm_head)) return;
    filled += w.nbytes();
    const bool is_norm = s.is_vector && s.name.find("norm") != std::string::npos;
    const size_t n = static_cast<size_t>(w.rows * w.cols);
    void* dst = const_cast<void*>(w.data);
    const uint64_t wseed = SplitMix(seed ^ SplitMix(k));
    constexpr size_t kChunk = 1 << 18;
    threads.ParallelFor((n + kChunk - 1) / kChunk, 1, [&](size_t b, size_t e) {
      for (size_t c = b; c < e; ++c) {
        uint64_t state = SplitMix(wseed + c);
        for (size_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
          float v = 1.0f;
          if (!is_norm) {
            state = SplitMix(state);
            const float u = static_cast<float>(state >> 40) * (1.0f / 16777216.0f);  // [0,1)
            v = (2.0f * u - 1.0f) * 0.0346f;
          }
          StoreFromF32(dtype, dst, i, v);
        }
      }
    });
    if (progress) progress(filled, total);
  });
  if (progress && filled != total) progress(total, total);  // alignment padding
  return mw;
}

}  // namespace needle
