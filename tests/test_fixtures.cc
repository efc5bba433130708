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
#include "tests/test_util.h"

namespace needle {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::vector<std::string> FixtureNames() {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(NEEDLE_FIXTURES_DIR))
    if (e.is_directory() && fs::exists(e.path() / "reference.json"))
      names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

struct Reference {
  std::vector<int32_t> tokens;
  int64_t n_prefill = 0;
  std::vector<float> inv_freq;
  float attention_scaling = 1.0f;
  std::string dtype;
  std::vector<float> native, fp32;  // [T, vocab]
};

Reference LoadReference(const std::string& dir) {
  Reference r;
  json j = json::parse(ReadTextFile(dir + "/reference.json"));
  for (auto t : j["tokens"]) r.tokens.push_back(t.get<int32_t>());
  r.n_prefill = j["n_prefill"].get<int64_t>();
  for (auto f : j["inv_freq"]) r.inv_freq.push_back(f.get<float>());
  r.attention_scaling = j["attention_scaling"].get<float>();
  r.dtype = j["dtype"].get<std::string>();
  SafetensorsFile st(dir + "/reference.safetensors");
  for (auto [name, dst] :
       {std::pair{"logits_native", &r.native}, std::pair{"logits_fp32", &r.fp32}}) {
    const TensorInfo* t = st.Find(name);
    EXPECT_NE(t, nullptr) << name;
    if (t == nullptr) continue;
    const float* p = reinterpret_cast<const float*>(t->data);
    dst->assign(p, p + t->numel());
  }
  return r;
}

// Logits [T, vocab] of needle on the reference's tokens: prefill, then one token per step.
std::vector<float> RunNeedle(Model& model, const Reference& ref, DType kv_type) {
  KVCache cache(model.CacheShape(static_cast<int64_t>(ref.tokens.size()), kv_type));
  std::vector<float> all, step;
  model.Forward(ref.tokens.data(), ref.n_prefill, cache, true, &all);
  for (size_t i = static_cast<size_t>(ref.n_prefill); i < ref.tokens.size(); ++i) {
    model.Forward(&ref.tokens[i], 1, cache, false, &step);
    all.insert(all.end(), step.begin(), step.end());
  }
  return all;
}

struct Diff {
  double max_abs = 0, ref_max = 0;
  double rel() const { return max_abs / std::max(ref_max, 1e-30); }
};

Diff Compare(const std::vector<float>& got, const std::vector<float>& ref) {
  Diff d;
  EXPECT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < std::min(got.size(), ref.size()); ++i) {
    EXPECT_TRUE(std::isfinite(got[i])) << "index " << i;
    d.max_abs = std::max(d.max_abs, static_cast<double>(std::fabs(got[i] - ref[i])));
    d.ref_max = std::max(d.ref_max, static_cast<double>(std::fabs(ref[i])));
  }
  return d;
}

// Greedy tokens agree wherever the reference's top-2 margin exceeds what the tolerance allows
// to flip; returns how many positions were decisive.
int CheckGreedy(const std::vector<float>& got, const std::vector<float>& ref, int64_t V,
                double tol_abs) {
  int decisive = 0;
  for (size_t r = 0; r * V < ref.size(); ++r) {
    const float* g = got.data() + r * V;
    const float* f = ref.data() + r * V;
    std::vector<float> sorted(f, f + V);
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
    if (sorted[0] - sorted[1] <= 2 * tol_abs) continue;
    ++decisive;
    EXPECT_EQ(Argmax(g, V), Argmax(f, V)) << "greedy token differs at position " << r;
  }
  return decisive;
}

// needle's logits against a transformers reference (loaded by LoadReference) for the model in
// model_dir: f32 against the upcast weights (1e-4) and, for bf16/f16 weights, the KV cache and
// compute in that type against transformers computing natively (5e-2 / 1e-2).
void CheckAgainstReference(const std::string& model_dir, const Reference& ref,
                           const std::string& name) {
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  auto model = LoadModel(model_dir, *backend);
  const int64_t V = model->config().vocab_size;

  // RoPE frequencies, for every scaling type (dynamic: at the final sequence length).
  const RopeFreqs rf = ComputeRopeFreqs(model->config(), static_cast<int64_t>(ref.tokens.size()));
  ASSERT_EQ(rf.inv_freq.size(), ref.inv_freq.size());
  for (size_t i = 0; i < rf.inv_freq.size(); ++i)
    EXPECT_NEAR(rf.inv_freq[i], ref.inv_freq[i], 2e-7 * std::fabs(ref.inv_freq[i]) + 1e-12)
        << "inv_freq[" << i << "]";
  EXPECT_NEAR(rf.attention_scaling, ref.attention_scaling, 1e-6);

  // f32 compute with an f32 KV cache against transformers on the same weights upcast to f32.
  const std::vector<float> ours = RunNeedle(*model, ref, DType::kF32);
  const Diff d32 = Compare(ours, ref.fp32);
  EXPECT_LE(d32.rel(), 1e-4) << "vs fp32 reference: max abs " << d32.max_abs << " of "
                             << d32.ref_max;
  const int decisive = CheckGreedy(ours, ref.fp32, V, 1e-4 * d32.ref_max);
  EXPECT_GE(decisive, static_cast<int>(ref.tokens.size()) / 2);

  double native_rel = 0;
  if (ref.dtype != "float32") {
    // Against transformers computing natively in bf16/f16, with the KV cache in that type too.
    const DType kv = ref.dtype == "bfloat16" ? DType::kBF16 : DType::kF16;
    const double tol = ref.dtype == "bfloat16" ? 5e-2 : 1e-2;
    const std::vector<float> native = RunNeedle(*model, ref, kv);
    const Diff dn = Compare(native, ref.native);
    EXPECT_LE(dn.rel(), tol) << "vs native " << ref.dtype << " reference: max abs " << dn.max_abs;
    CheckGreedy(native, ref.native, V, tol * dn.ref_max);
    native_rel = dn.rel();
  }
  std::printf("[ fixture  ] %-30s vs f32 reference: rel err %.2e; vs native %s: %.2e\n",
              name.c_str(), d32.rel(), ref.dtype.c_str(), native_rel);
}

class FixtureTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureTest, MatchesTransformers) {
  const std::string dir = std::string(NEEDLE_FIXTURES_DIR) + "/" + GetParam();
  CheckAgainstReference(dir, LoadReference(dir), GetParam());
}

// The shipped model, models/needle-tiny, on a real passkey prompt tokenized by its own
// tokenizer (reference by tests/fixtures/make_needle_tiny_reference.py).
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
  CheckAgainstReference(NEEDLE_MODELS_DIR "/needle-tiny", ref, "needle-tiny");
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
