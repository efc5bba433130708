// Decode rows of several sequences in one step (Model::ForwardBatch, issue 19): batch size never
// changes an answer. Sequences of different lengths, in one shared BlockPool, joining and leaving
// the batch between steps, give the tokens (and, within float rounding of the batched products,
// the logits) each gives alone with its own cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/model/model.h"
#include "kvcache/block_pool.h"
#include "sparse_attn/sparse_attention.h"
#include "tests/fixture_util.h"
#include "tests/gpu_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

std::vector<int32_t> Prompt(int64_t n, int64_t V, int seed) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<int32_t>((i * 31 + seed * 17 + 3) % V);
  return p;
}

class ModelBatch : public ::testing::TestWithParam<std::string> {};

// Four sequences: 0-2 from step 0, 1 leaves after step 4, 3 joins at step 6. sc: each sequence
// with a SparseAttention of its own (its plans into plans[s]), else dense.
struct Runs {
  std::vector<std::vector<int32_t>> tok;
  std::vector<std::vector<float>> logits;
  std::vector<std::string> plans;
};
const std::vector<int64_t> kLens = {21, 40, 7, 13};
constexpr int64_t kSteps = 12, kCtx = 80;
bool Active(size_t seq, int64_t step) {
  if (seq == 1) return step < 5;
  if (seq == 3) return step >= 6;
  return true;
}

std::unique_ptr<SparseAttention> Policy(Model& m, const SparseConfig* sc, ThreadingContext& tc,
                                        std::ostringstream* plan) {
  if (sc == nullptr) return nullptr;
  auto p = std::make_unique<SparseAttention>(m.config(), *sc, m.backend(), tc, kCtx, DType::kF32);
  p->set_plan_sink(plan);
  return p;
}

int32_t Argmax(const std::vector<float>& l) {
  return static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
}

// Alone: each sequence in a cache of its own.
Runs Alone(Model& model, const SparseConfig* sc, ThreadingContext& tc) {
  const int64_t V = model.config().vocab_size;
  Runs r;
  r.tok.resize(kLens.size()), r.logits.resize(kLens.size()), r.plans.resize(kLens.size());
  for (size_t s = 0; s < kLens.size(); ++s) {
    KVCache cache(model.CacheShape(kCtx, DType::kF32, sc != nullptr ? sc->block_size : 16), 0,
                  model.backend().kv_memory());
    std::ostringstream plan;
    auto pol = Policy(model, sc, tc, &plan);
    model.set_attention(pol.get());
    std::vector<float> l;
    const auto p = Prompt(kLens[s], V, static_cast<int>(s));
    model.Forward(p.data(), static_cast<int64_t>(p.size()), cache, false, &l);
    int32_t tok = Argmax(l);
    for (int64_t t = 0; t < kSteps; ++t) {
      if (!Active(s, t)) continue;
      r.tok[s].push_back(tok);
      model.Forward(&tok, 1, cache, false, &l);
      r.logits[s].insert(r.logits[s].end(), l.begin(), l.end());
      tok = Argmax(l);
    }
    r.tok[s].push_back(tok);
    model.set_attention(nullptr);
    r.plans[s] = plan.str();
  }
  return r;
}

// Batched: one pool for all, each sequence prefilled alone when it joins.
Runs Batched(Model& model, const SparseConfig* sc, ThreadingContext& tc, BlockPool& pool) {
  const int64_t V = model.config().vocab_size;
  Runs r;
  r.tok.resize(kLens.size()), r.logits.resize(kLens.size()), r.plans.resize(kLens.size());
  std::vector<std::unique_ptr<KVCache>> caches(kLens.size());
  std::vector<std::unique_ptr<SparseAttention>> pols(kLens.size());
  std::vector<std::ostringstream> plans(kLens.size());
  std::vector<int32_t> tok(kLens.size());
  for (int64_t t = 0; t < kSteps; ++t) {
    std::vector<KVCache*> batch;
    std::vector<AttentionPolicy*> bp;
    std::vector<int32_t> ids;
    std::vector<size_t> which;
    for (size_t s = 0; s < kLens.size(); ++s) {
      if (!Active(s, t)) {
        if (caches[s] != nullptr && !Active(s, t + 1)) {
          r.tok[s].push_back(tok[s]);
          caches[s].reset();  // leaves: its blocks go back to the pool
        }
        continue;
      }
      if (caches[s] == nullptr) {  // joins
        caches[s] = std::make_unique<KVCache>(pool, kCtx);
        pols[s] = Policy(model, sc, tc, &plans[s]);
        model.set_attention(pols[s].get());
        std::vector<float> l;
        const auto p = Prompt(kLens[s], V, static_cast<int>(s));
        model.Forward(p.data(), static_cast<int64_t>(p.size()), *caches[s], false, &l);
        model.set_attention(nullptr);
        tok[s] = Argmax(l);
      }
      r.tok[s].push_back(tok[s]);
      batch.push_back(caches[s].get()), bp.push_back(pols[s].get());
      ids.push_back(tok[s]), which.push_back(s);
    }
    std::vector<int32_t> next(batch.size());
    std::vector<float> logits;
    model.ForwardBatch(ids.data(), static_cast<int64_t>(batch.size()), batch.data(), next.data(),
                       &logits, bp.data());
    for (size_t i = 0; i < which.size(); ++i) {
      tok[which[i]] = next[i];
      r.logits[which[i]].insert(r.logits[which[i]].end(), logits.begin() + i * V,
                                logits.begin() + (i + 1) * V);
    }
  }
  for (size_t s = 0; s < kLens.size(); ++s) {
    if (caches[s] != nullptr) r.tok[s].push_back(tok[s]);
    r.plans[s] = plans[s].str();
  }
  return r;
}

void ExpectSame(const Runs& got, const Runs& want, const std::string& what) {
  for (size_t s = 0; s < kLens.size(); ++s) {
    EXPECT_EQ(got.tok[s], want.tok[s]) << what << " sequence " << s;
    EXPECT_EQ(got.plans[s], want.plans[s]) << what << " sequence " << s;
    ASSERT_EQ(got.logits[s].size(), want.logits[s].size()) << s;
    double scale = 0;
    for (float x : want.logits[s]) scale = std::max(scale, std::fabs(static_cast<double>(x)));
    for (size_t i = 0; i < want.logits[s].size(); ++i)
      ASSERT_NEAR(got.logits[s][i], want.logits[s][i], 1e-4 * scale)
          << what << " sequence " << s << " at " << i;
  }
}

TEST_P(ModelBatch, BatchedDecodeEqualsEachSequenceAlone) {
  ThreadingContext tc(2);
  auto cpu = MakeCpuBackend(tc, false);
  auto model = LoadModel(test::FixturesDir() + "/" + GetParam(), *cpu);
  BlockPool pool(model->CacheShape(3 * kCtx, DType::kF32, 16));
  ExpectSame(Batched(*model, nullptr, tc, pool), Alone(*model, nullptr, tc), GetParam());
  EXPECT_EQ(pool.FreeSlots(0), pool.slots(0));  // every block back
  // Sparse attention, each sequence with its own planner state (per KV head with retention,
  // per layer): the same plans too.
  for (SelectMode sm : {SelectMode::kKVHead, SelectMode::kLayer}) {
    SparseConfig sc;
    sc.block_size = 4, sc.init_tokens = 4, sc.local_window = 8, sc.topk = 2, sc.dense_layers = 0;
    sc.retain_blocks = 1, sc.select = sm;
    BlockPool sp(model->CacheShape(3 * kCtx, DType::kF32, 4));
    const Runs want = Alone(*model, &sc, tc);
    if (GetParam() != "mistral_swa_f32") {  // (its sliding-window layers attend densely)
      EXPECT_NE(want.plans[1].find("\"dense\":false"), std::string::npos);
    }
    ExpectSame(Batched(*model, &sc, tc, sp), want, GetParam() + " sparse");
  }
}

// A prompt that begins as another sequence's takes that sequence's whole blocks of the common
// prefix (KVCache::SharePrefix) and prefills only the rest: its logits and greedy tokens are those
// of the whole prompt prefilled alone (within the 1e-4 of scale of the batched products), also
// after the sequence it shares with has ended and given its own blocks back. (Not with dynamic
// NTK rope, whose frequencies follow the prompt's length: needle eval --batch does not share
// there; that fixture checks that the sharing is visible at all, the logits moving.)
TEST_P(ModelBatch, SharedPrefixEqualsWholePrefill) {
  ThreadingContext tc(2);
  auto cpu = MakeCpuBackend(tc, false);
  auto model = LoadModel(test::FixturesDir() + "/" + GetParam(), *cpu);
  const int64_t V = model->config().vocab_size, B = 16, steps = 6;
  BlockPool pool(model->CacheShape(3 * kCtx, DType::kF32, B));
  const std::vector<int32_t> a = Prompt(40, V, 1);
  std::vector<int32_t> b(a.begin(), a.begin() + 35);  // 2 whole blocks shared, 3 tokens not
  for (int32_t t : Prompt(12, V, 2)) b.push_back(t);
  const auto run = [&](KVCache& cache, const std::vector<int32_t>& ids, int64_t from) {
    Runs r;
    r.tok.resize(1), r.logits.resize(1), r.plans.resize(1);
    std::vector<float> l;
    model->Forward(ids.data() + from, static_cast<int64_t>(ids.size()) - from, cache, false, &l);
    for (int64_t s = 0; s < steps; ++s) {
      r.logits[0].insert(r.logits[0].end(), l.begin(), l.end());
      const int32_t t = Argmax(l);
      r.tok[0].push_back(t);
      model->Forward(&t, 1, cache, false, &l);
    }
    return r;
  };
  KVCache alone(model->CacheShape(kCtx, DType::kF32, B));
  Runs want = run(alone, b, 0);
  want.tok.resize(kLens.size()), want.logits.resize(kLens.size()), want.plans.resize(kLens.size());
  auto donor = std::make_unique<KVCache>(pool, kCtx);
  model->Forward(a.data(), static_cast<int64_t>(a.size()), *donor, false, nullptr);
  const int64_t used = pool.slots(0) - pool.FreeSlots(0);
  KVCache shared(pool, kCtx);
  shared.SharePrefix(*donor, 32);
  EXPECT_EQ(shared.size(), 32);
  EXPECT_EQ(pool.slots(0) - pool.FreeSlots(0), used);  // no block taken for the prefix
  donor.reset();                                       // its own blocks back, the shared ones kept
  Runs got = run(shared, b, 32);
  got.tok.resize(kLens.size()), got.logits.resize(kLens.size()), got.plans.resize(kLens.size());
  if (GetParam() == "llama_dynamic_f32") {
    // The prefix was rotated with a 40-token prompt's frequencies: it must show.
    EXPECT_NE(got.logits[0], want.logits[0]);
    return;
  }
  ExpectSame(got, want, GetParam() + " shared prefix");
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

// On the GPU (16-bit weights: the decode GEMV serves a batch's rows, each with the bits it gets
// alone, tests/test_cuda_decode.cc): the same tokens and the same logits, bit for bit, dense.
TEST(ModelBatch, GpuBatchedDecodeEqualsEachSequenceAlone) {
  NEEDLE_REQUIRE_GPU(gpu);
#ifdef NEEDLE_HAVE_CUDA
  ThreadingContext tc(2);
  for (bool batch_kernels : {false, true})  // (Backend::PreferBatchKernels: what the Engine runs)
    for (const std::string& dir : {test::FixturesDir() + "/qwen2_bias_gqa7_bf16",
                                   test::FixturesDir() + "/../../../models/needle-tiny"}) {
      gpu->PreferBatchKernels(batch_kernels);
      auto model = LoadModel(dir, *gpu);
      BlockPool pool(model->CacheShape(3 * kCtx, DType::kF32, 16), 0, gpu->kv_memory());
      const Runs got = Batched(*model, nullptr, tc, pool), want = Alone(*model, nullptr, tc);
      for (size_t s = 0; s < kLens.size(); ++s) {
        EXPECT_EQ(got.tok[s], want.tok[s]) << dir << " sequence " << s;
        EXPECT_EQ(got.logits[s], want.logits[s]) << dir << " sequence " << s;
      }
    }
#endif
}

// On the GPU, the rows of a step together (Backend::DecodeRows: one rotary/cache-write launch and
// one attention launch for up to 48 rows, the TMA decode kernel with a grid row per sequence,
// each row's keys cut by its own length) give the logits of each row as a batch of one, bit for
// bit: 53 sequences (two launches) of 5 to 1,201 tokens (one to three splits), 16-bit caches, GQA 7
// and 4, head_dim 128 and 64. (With NEEDLE_CUDA_DECODE_ROWS=0 the rows go one by one through
// Attention, whose cut differs: the same tokens there, not the same bits.)
TEST(ModelBatch, GpuRowsTogetherEqualRowsOneByOne) {
  NEEDLE_REQUIRE_GPU(gpu);
#ifdef NEEDLE_HAVE_CUDA
  gpu->PreferBatchKernels(true);
  const int64_t n = 53, ctx = 1280, B = 64;
  for (const std::string& dir : {test::FixturesDir() + "/qwen2_bias_gqa7_bf16",
                                 test::FixturesDir() + "/llama_gqa4_hd64_bf16",
                                 test::FixturesDir() + "/../../../models/needle-tiny"}) {
    auto model = LoadModel(dir, *gpu);
    const int64_t V = model->config().vocab_size;
    std::vector<std::vector<float>> got(2);
    std::vector<std::vector<int32_t>> toks(2);
    for (int rows : {1, 0}) {  // (0: each sequence a batch of its own)
      BlockPool pool(model->CacheShape(n * ctx, DType::kBF16, B), 0, gpu->kv_memory());
      std::vector<std::unique_ptr<KVCache>> caches;
      std::vector<KVCache*> batch;
      std::vector<int32_t> ids;
      for (int64_t i = 0; i < n; ++i) {
        caches.push_back(std::make_unique<KVCache>(pool, ctx));
        const auto p = Prompt(5 + 23 * i, V, static_cast<int>(i));
        ids.push_back(model->ForwardGreedy(p.data(), static_cast<int64_t>(p.size()), *caches[i]));
        batch.push_back(caches[i].get());
      }
      for (int step = 0; step < 3; ++step) {
        std::vector<int32_t> next(static_cast<size_t>(n));
        std::vector<float> logits;
        if (rows == 1) {
          model->ForwardBatch(ids.data(), n, batch.data(), next.data(), &logits);
        } else {
          for (int64_t i = 0; i < n; ++i) {
            std::vector<float> one;
            model->ForwardBatch(&ids[i], 1, &batch[i], &next[i], &one);
            logits.insert(logits.end(), one.begin(), one.end());
          }
        }
        got[rows].insert(got[rows].end(), logits.begin(), logits.end());
        toks[rows].insert(toks[rows].end(), next.begin(), next.end());
        ids = next;
      }
    }
    EXPECT_EQ(toks[1], toks[0]) << dir;
    ASSERT_EQ(got[1].size(), got[0].size());
    size_t differ = 0;
    for (size_t i = 0; i < got[0].size(); ++i) differ += got[1][i] != got[0][i];
    EXPECT_EQ(differ, 0u) << dir << ": logits that differ, of " << got[0].size();
  }
#endif
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelBatch,
                         ::testing::Values("llama_gqa4_hd64_f32", "qwen3_qknorm_gqa4_f32",
                                           "mistral_swa_f32", "llama_dynamic_f32",
                                           "qwen2_bias_gqa7_bf16"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace needle
