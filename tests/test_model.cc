// Model-level behaviour on the committed fixtures: chunked prefill, backend agreement, EOS,
// dummy weights, context limits.
#include <gtest/gtest.h>

#include <cmath>

#include "engine/backend/backend.h"
#include "engine/model/generate.h"
#include "engine/model/model.h"
#include "tests/test_util.h"

namespace needle {
namespace {

const std::string kFixture = std::string(NEEDLE_FIXTURES_DIR) + "/qwen2_bias_gqa7_f32";

std::vector<float> Logits(Model& m, const std::vector<int32_t>& ids, int64_t ubatch) {
  m.set_ubatch(ubatch);
  KVCache cache(m.CacheShape(static_cast<int64_t>(ids.size()), DType::kF32));
  std::vector<float> out;
  m.Forward(ids.data(), static_cast<int64_t>(ids.size()), cache, true, &out);
  return out;
}

TEST(Model, ChunkedPrefillEqualsOneShot) {
  ThreadingContext tc(2);
  auto b = MakeCpuBackend(tc, false);
  auto m = LoadModel(kFixture, *b);
  std::vector<int32_t> ids;
  for (int i = 0; i < 23; ++i) ids.push_back((i * 37 + 5) % 256);
  const auto one = Logits(*m, ids, 512);
  const auto chunked = Logits(*m, ids, 4);
  ASSERT_EQ(one.size(), chunked.size());
  for (size_t i = 0; i < one.size(); ++i) ASSERT_NEAR(one[i], chunked[i], 1e-5) << i;
}

TEST(Model, FastBackendMatchesReferenceBackend) {
  ThreadingContext tc(2);
  for (const char* name :
       {"/llama_yarn_hd128_bf16", "/mistral_swa_f32", "/qwen3_qknorm_gqa4_bf16"}) {
    auto fb = MakeCpuBackend(tc, false);
    auto rb = MakeCpuBackend(tc, true);
    auto fm = LoadModel(std::string(NEEDLE_FIXTURES_DIR) + name, *fb);
    auto rm = LoadModel(std::string(NEEDLE_FIXTURES_DIR) + name, *rb);
    std::vector<int32_t> ids = {3, 17, 99, 250, 4, 8, 15, 16, 23, 42, 7};
    const auto f = Logits(*fm, ids, 512), r = Logits(*rm, ids, 512);
    double mx = 0, err = 0;
    for (size_t i = 0; i < f.size(); ++i) {
      mx = std::max(mx, static_cast<double>(std::fabs(r[i])));
      err = std::max(err, static_cast<double>(std::fabs(f[i] - r[i])));
    }
    EXPECT_LE(err, 1e-5 * mx) << name;
  }
}

TEST(Model, GreedyStopsAtEos) {
  ThreadingContext tc(2);
  auto b = MakeCpuBackend(tc, false);
  ModelConfig cfg = LoadModelConfig(kFixture + "/config.json");
  auto m0 = std::make_unique<Model>(cfg, LoadWeights(kFixture, cfg), *b);
  const std::vector<int32_t> prompt = {10, 20, 30};
  KVCache c0(m0->CacheShape(16, DType::kF32));
  const auto free_run = GenerateGreedy(*m0, c0, prompt, 6, nullptr, nullptr);
  ASSERT_EQ(free_run.size(), 6u);
  // Make the third generated token an EOS id: generation must stop right after it.
  cfg.eos_token_ids = {free_run[2]};
  auto m1 = std::make_unique<Model>(cfg, LoadWeights(kFixture, cfg), *b);
  KVCache c1(m1->CacheShape(16, DType::kF32));
  GenerateStats st;
  const auto stopped = GenerateGreedy(*m1, c1, prompt, 6, nullptr, &st);
  EXPECT_TRUE(st.stopped_at_eos);
  const size_t first_eos =
      std::find(free_run.begin(), free_run.end(), free_run[2]) - free_run.begin();
  EXPECT_EQ(stopped, std::vector<int32_t>(free_run.begin(), free_run.begin() + first_eos + 1));
}

TEST(Model, DummyWeightsAreDeterministicAndFinite) {
  ThreadingContext tc(2);
  auto b = MakeCpuBackend(tc, false);
  auto m1 = MakeDummyModel(kFixture + "/config.json", DType::kBF16, *b, tc);
  auto m2 = MakeDummyModel(kFixture + "/config.json", DType::kBF16, *b, tc);
  EXPECT_EQ(m1->weights().arena, m2->weights().arena);
  const auto l = Logits(*m1, {1, 2, 3, 4}, 512);
  for (float x : l) ASSERT_TRUE(std::isfinite(x));
  EXPECT_TRUE(m1->weights().layers[0].bq.present());  // Qwen2 biases are built too
}

TEST(Model, ContextOverflowIsAnError) {
  ThreadingContext tc(1);
  auto b = MakeCpuBackend(tc, false);
  auto m = LoadModel(kFixture, *b);
  KVCache cache(m->CacheShape(4, DType::kF32));
  std::vector<int32_t> ids = {1, 2, 3, 4, 5};
  std::vector<float> out;
  test::ExpectErrorContaining([&] { m->Forward(ids.data(), 5, cache, false, &out); },
                              {"context overflow", "4 tokens"});
  test::ExpectErrorContaining(
      [&] {
        int32_t bad = 256;
        m->Forward(&bad, 1, cache, false, &out);
      },
      {"token id 256", "vocabulary"});
}

TEST(Model, KVCacheLargerThanMemoryIsRefused) {
  test::ExpectErrorContaining(
      [] {
        KVCache c(KVCacheShape{32, 8, 128, int64_t{1} << 30, 128, DType::kBF16});
      },
      {"KV cache", "GiB", "available"});
  // Contexts whose byte counts would wrap in 64 bits (-c INT64_MAX once did): refused first.
  test::ExpectErrorContaining(
      [] {
        KVCache c(KVCacheShape{32, 8, 128, INT64_MAX, 128, DType::kBF16});
      },
      {"KV cache", "9223372036854775807 tokens", "2^31 - 1 positions"});
  test::ExpectErrorContaining(
      [] {
        KVCache c(KVCacheShape{4096, 4096, 4096, (int64_t{1} << 31) - 1, 128, DType::kF32});
      },
      {"KV cache", "more than 2^62 bytes"});
}

}  // namespace
}  // namespace needle
