// Decode rows of several sequences in one step (Model::ForwardBatch, issue 19): batch size never
// changes an answer. Sequences of different lengths, in one shared BlockPool, joining and leaving
// the batch between steps, give the tokens (and, within float rounding of the batched products,
// the logits) each gives alone with its own cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/model/model.h"
#include "kvcache/block_pool.h"
#include "tests/fixture_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

std::vector<int32_t> Prompt(int64_t n, int64_t V, int seed) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<int32_t>((i * 31 + seed * 17 + 3) % V);
  return p;
}

class ModelBatch : public ::testing::TestWithParam<std::string> {};

TEST_P(ModelBatch, BatchedDecodeEqualsEachSequenceAlone) {
  ThreadingContext tc(2);
  auto cpu = MakeCpuBackend(tc, false);
  auto model = LoadModel(test::FixturesDir() + "/" + GetParam(), *cpu);
  const int64_t V = model->config().vocab_size, steps = 12, ctx = 80;
  // Four sequences: 0-2 from step 0, 1 leaves after step 4, 3 joins at step 6.
  const std::vector<int64_t> lens = {21, 40, 7, 13};
  const auto active = [](int64_t seq, int64_t step) {
    if (seq == 1) return step < 5;
    if (seq == 3) return step >= 6;
    return true;
  };
  // Alone: each sequence in a cache of its own, greedy, logits kept.
  std::vector<std::vector<int32_t>> want_tok(lens.size());
  std::vector<std::vector<float>> want_logits(lens.size());
  for (size_t s = 0; s < lens.size(); ++s) {
    KVCache cache(model->CacheShape(ctx, DType::kF32, 16));
    std::vector<float> l;
    const auto p = Prompt(lens[s], V, static_cast<int>(s));
    model->Forward(p.data(), static_cast<int64_t>(p.size()), cache, false, &l);
    int32_t tok = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
    for (int64_t t = 0; t < steps; ++t) {
      if (!active(static_cast<int64_t>(s), t)) continue;
      want_tok[s].push_back(tok);
      model->Forward(&tok, 1, cache, false, &l);
      want_logits[s].insert(want_logits[s].end(), l.begin(), l.end());
      tok = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
    }
    want_tok[s].push_back(tok);
  }
  // Batched: one pool for all, each sequence prefilled alone when it joins.
  BlockPool pool(model->CacheShape(3 * ctx, DType::kF32, 16));
  std::vector<std::unique_ptr<KVCache>> caches(lens.size());
  std::vector<int32_t> tok(lens.size());
  std::vector<std::vector<int32_t>> got_tok(lens.size());
  std::vector<std::vector<float>> got_logits(lens.size());
  for (int64_t t = 0; t < steps; ++t) {
    std::vector<KVCache*> batch;
    std::vector<int32_t> ids;
    std::vector<size_t> which;
    for (size_t s = 0; s < lens.size(); ++s) {
      if (!active(static_cast<int64_t>(s), t)) {
        if (caches[s] != nullptr && !active(static_cast<int64_t>(s), t + 1)) {
          got_tok[s].push_back(tok[s]);
          caches[s].reset();  // leaves: its blocks go back to the pool
        }
        continue;
      }
      if (caches[s] == nullptr) {  // joins
        caches[s] = std::make_unique<KVCache>(pool, ctx);
        std::vector<float> l;
        const auto p = Prompt(lens[s], V, static_cast<int>(s));
        model->Forward(p.data(), static_cast<int64_t>(p.size()), *caches[s], false, &l);
        tok[s] = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
      }
      got_tok[s].push_back(tok[s]);
      batch.push_back(caches[s].get()), ids.push_back(tok[s]), which.push_back(s);
    }
    std::vector<int32_t> next(batch.size());
    std::vector<float> logits;
    model->ForwardBatch(ids.data(), static_cast<int64_t>(batch.size()), batch.data(), next.data(),
                        &logits);
    for (size_t i = 0; i < which.size(); ++i) {
      tok[which[i]] = next[i];
      got_logits[which[i]].insert(got_logits[which[i]].end(), logits.begin() + i * V,
                                  logits.begin() + (i + 1) * V);
    }
  }
  for (size_t s = 0; s < lens.size(); ++s)
    if (caches[s] != nullptr) got_tok[s].push_back(tok[s]);
  for (size_t s = 0; s < lens.size(); ++s) {
    EXPECT_EQ(got_tok[s], want_tok[s]) << GetParam() << " sequence " << s;
    ASSERT_EQ(got_logits[s].size(), want_logits[s].size()) << s;
    double scale = 0;
    for (float x : want_logits[s]) scale = std::max(scale, std::fabs(static_cast<double>(x)));
    for (size_t i = 0; i < want_logits[s].size(); ++i)
      ASSERT_NEAR(got_logits[s][i], want_logits[s][i], 1e-4 * scale)
          << GetParam() << " sequence " << s << " at " << i;
  }
  caches.clear();
  EXPECT_EQ(pool.FreeSlots(0), pool.slots(0));  // every block back
}

TEST(ModelBatch, RefusesWhatItCannotRun) {
  ThreadingContext tc(1);
  auto cpu = MakeCpuBackend(tc, false);
  auto model = LoadModel(test::FixturesDir() + "/llama_gqa4_hd64_f32", *cpu);
  KVCache a(model->CacheShape(4, DType::kF32, 4));
  KVCache* both[2] = {&a, &a};
  int32_t ids[2] = {1, 2}, next[2];
  EXPECT_THROW(model->ForwardBatch(ids, 2, both, next), Error);  // one sequence twice
  ids[0] = static_cast<int32_t>(model->config().vocab_size);
  EXPECT_THROW(model->ForwardBatch(ids, 1, both, next), Error);  // outside the vocabulary
  ids[0] = 1;
  for (int i = 0; i < 4; ++i) model->ForwardBatch(ids, 1, both, next);
  EXPECT_THROW(model->ForwardBatch(ids, 1, both, next), Error);  // past its context
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelBatch,
                         ::testing::Values("llama_gqa4_hd64_f32", "qwen3_qknorm_gqa4_f32",
                                           "mistral_swa_f32", "llama_dynamic_f32",
                                           "qwen2_bias_gqa7_bf16"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace needle
