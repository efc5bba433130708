// needle against transformers: every fixture under tests/fixtures/models (written by
// tests/fixtures/make_fixtures.py with transformers 5.17 on the GPU machine) is loaded, run on
// the same tokens (a prefill, then single-token decode steps through the KV cache), and its
// logits are compared with the ones transformers computed.
//
// Tolerances (on max |needle - reference| over all logits, relative to max |reference|):
//  * f32 weights vs transformers in f32, and any weights vs transformers on the same weights
//    upcast to f32 ("logits_fp32"): both sides compute in f32 with different summation orders
//    and SIMD widths. Each dot product of length K carries ~sqrt(K) * 2^-24 relative rounding;
//    through 2 layers and the softmax that stays far below 1e-5 of the logit scale. We allow
//    1e-4 relative (the bar); we measure 5e-7 to 1.3e-6.
//  * bf16/f16 weights vs transformers computing natively in bf16/f16 ("logits_native"):
//    transformers rounds every activation to bf16 (8 bits of mantissa, relative 2^-9 = 2e-3 per
//    rounding) while needle keeps f32 activations; over ~20 roundings in the graph the expected
//    difference is ~1e-2 of the logit scale (the fixture script measured 0.7-1.1% relative L2
//    between the two transformers runs). We allow 5e-2 relative max error for bf16 and 1e-2 for
//    f16 (10 bits of mantissa, 4x finer than bf16).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "datasets/infinitebench.h"
#include "engine/backend/backend.h"
#include "engine/base/mapped_file.h"
#include "engine/model/generate.h"
#include "engine/model/model.h"
#include "engine/model/rope.h"
#include "engine/tokenizer/tokenizer.h"
#include "tests/fixture_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

namespace fs = std::filesystem;
using test::FixtureNames;
using test::LoadReference;
using test::Reference;
using test::RunNeedle;

// The CPU backend against a reference.
void CheckCpu(const std::string& model_dir, const Reference& ref, const std::string& name) {
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  test::CheckAgainstReference(*backend, model_dir, ref, name);
}

class FixtureTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureTest, MatchesTransformers) {
  const std::string dir = std::string(NEEDLE_FIXTURES_DIR) + "/" + GetParam();
  CheckCpu(dir, LoadReference(dir), GetParam());
}

// The shipped needle-tiny (models/needle-tiny, stage 3) on a real passkey prompt tokenized by its
// own tokenizer (reference by tests/fixtures/make_needle_tiny_reference.py on the GPU machine).
TEST(NeedleTiny, MatchesTransformers) {
  // needle's tokenizer gives the reference's ids (made by HF tokenizers) for the same prompt.
  const Reference ref = LoadReference(NEEDLE_FIXTURES_DIR "/../needle_tiny");
  const std::string noise2 = std::string(datasets::kNoiseLine) + datasets::kNoiseLine;
  const std::string ctx = noise2 + datasets::InfiniteBenchNeedle("passkey", "80516") + noise2;
  const std::string prompt =
      datasets::InfiniteBenchPrompt("passkey", ctx, datasets::InfiniteBenchQuestion("passkey"));
  auto tok = Tokenizer::Load(NEEDLE_MODELS_DIR "/needle-tiny/tokenizer.json");
  std::vector<int32_t> ids = tok->Encode(prompt);
  const std::vector<int32_t> answer = tok->Encode(" 80516.");
  ids.insert(ids.end(), answer.begin(), answer.end());
  EXPECT_EQ(ids, ref.tokens);
  CheckCpu(NEEDLE_MODELS_DIR "/needle-tiny", ref, "needle-tiny");
}

// The same fixture with config.json in the pre-transformers-5 spelling (top-level rope_theta,
// rope_scaling with "type"/"rope_type") parses to the same model and the same logits.
TEST_P(FixtureTest, LegacyConfigSpellingGivesSameLogits) {
  const std::string dir = std::string(NEEDLE_FIXTURES_DIR) + "/" + GetParam();
  if (!fs::exists(dir + "/config.legacy.json")) GTEST_SKIP() << "no legacy config";
  test::TempDir tmp;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name == "config.json" || name == "config.legacy.json") continue;
    fs::create_symlink(e.path(), tmp.File(name));
  }
  fs::copy_file(dir + "/config.legacy.json", tmp.File("config.json"));
  const Reference ref = LoadReference(dir);
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  auto a = LoadModel(dir, *backend);
  auto b = LoadModel(tmp.path(), *backend);
  EXPECT_EQ(a->config().rope.type, b->config().rope.type);
  EXPECT_EQ(a->config().rope.theta, b->config().rope.theta);
  EXPECT_EQ(a->config().rope.factor, b->config().rope.factor);
  EXPECT_EQ(RunNeedle(*a, ref, DType::kF32), RunNeedle(*b, ref, DType::kF32));
}

INSTANTIATE_TEST_SUITE_P(All, FixtureTest, ::testing::ValuesIn(FixtureNames()),
                         [](const auto& info) { return info.param; });

// ForwardGreedy (the backend picks the token) equals Argmax of Forward's logits, step by step.
TEST(Fixtures, ForwardGreedyIsArgmaxOfForward) {
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  auto model = LoadModel(std::string(NEEDLE_FIXTURES_DIR) + "/llama_gqa4_hd64_f32", *backend);
  KVCache a(model->CacheShape(64, DType::kF32)), b(model->CacheShape(64, DType::kF32));
  std::vector<int32_t> ids = {1, 17, 42, 99, 3};
  std::vector<float> logits;
  model->Forward(ids.data(), 5, a, false, &logits);
  int32_t want = Argmax(logits.data(), model->config().vocab_size);
  int32_t got = model->ForwardGreedy(ids.data(), 5, b);
  for (int i = 0; i < 20; ++i) {
    ASSERT_EQ(got, want) << "step " << i;
    model->Forward(&want, 1, a, false, &logits);
    got = model->ForwardGreedy(&got, 1, b);
    want = Argmax(logits.data(), model->config().vocab_size);
  }
}

TEST(Fixtures, AllVariantsPresent) {
  // Guards against a fixture folder silently going missing (the parameterised tests would just
  // run fewer cases): every architecture, rope type, dtype and the sharded layout.
  const auto names = FixtureNames();
  for (const char* want :
       {"llama_gqa4_hd64_f32", "llama_gqa4_hd64_bf16", "llama_gqa4_hd64_f16",
        "llama_gqa4_hd64_bf16_sharded", "llama_llama3_hd128_f32", "llama_linear_gqa7_f32",
        "llama_dynamic_f32", "llama_yarn_hd128_f32", "mistral_swa_f32", "qwen2_bias_gqa7_f32",
        "qwen3_qknorm_gqa4_f32", "qwen3_qknorm_gqa4_bf16"})
    EXPECT_NE(std::find(names.begin(), names.end(), want), names.end()) << want;
}

}  // namespace
}  // namespace needle
