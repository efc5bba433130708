// Random bf16 KV caches for the tests of the bf16 folds (test_amx.cc, test_prompt_fold.cc).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/base/dtype.h"
#include "kvcache/kv_cache.h"
#include "tests/test_util.h"

namespace needle::test {

inline float RoundBf16(float x) { return BF16ToF32(F32ToBF16(x)); }

// A one-layer bf16 cache of n_tok tokens of Hk KV heads, filled with random keys (magnitude 2)
// and values rounded to bf16 first, so that *k and *v ([token][kv head][D]) are what it holds.
inline std::unique_ptr<KVCache> RandomBf16Cache(int64_t Hk, int64_t D, int64_t n_tok, int64_t B,
                                                uint64_t seed, std::vector<float>* k,
                                                std::vector<float>* v) {
  auto cache = std::make_unique<KVCache>(KVCacheShape(1, Hk, D, n_tok, B, DType::kBF16));
  *k = RandomVector(n_tok * Hk * D, seed, 2.f);
  *v = RandomVector(n_tok * Hk * D, seed + 1);
  for (float& x : *k) x = RoundBf16(x);
  for (float& x : *v) x = RoundBf16(x);
  cache->Write(0, 0, n_tok, k->data(), v->data());
  cache->SetSize(n_tok);
  return cache;
}

}  // namespace needle::test
