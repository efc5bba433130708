// Shared by the fixture tests (test_fixtures.cc, CPU; test_cuda.cc, GPU): the transformers
// references written by tests/fixtures/make_fixtures.py and how needle's logits are compared
// with them.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/model/generate.h"  // Argmax
#include "engine/model/model.h"
#include "engine/model/rope.h"
#include "engine/model/safetensors.h"
#include "tests/test_util.h"

namespace needle::test {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The fixture folder: $NEEDLE_FIXTURES_DIR when set (a test binary carried to another machine),
// else the source tree's, compiled in.
inline std::string FixturesDir() {
  const char* env = std::getenv("NEEDLE_FIXTURES_DIR");
  return env != nullptr && *env != 0 ? env : NEEDLE_FIXTURES_DIR;
}

inline std::vector<std::string> FixtureNames() {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(FixturesDir()))
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

inline Reference LoadReference(const std::string& dir) {
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
inline std::vector<float> RunNeedle(Model& model, const Reference& ref, DType kv_type) {
  KVCache cache(model.CacheShape(static_cast<int64_t>(ref.tokens.size()), kv_type), 0,
                model.backend().kv_memory());
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

inline Diff Compare(const std::vector<float>& got, const std::vector<float>& ref) {
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
inline int CheckGreedy(const std::vector<float>& got, const std::vector<float>& ref, int64_t V,
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

// needle's logits against a transformers reference (LoadReference) for
// the model in model_dir: f32 against the upcast weights (1e-4) and, for bf16/f16 weights, the KV
// cache and compute in that type against transformers computing natively (5e-2 / 1e-2).
// rounds_activations: the backend feeds the matmuls activations rounded to the weights' type
// (the CUDA backend, like transformers' native bf16/f16 path), so even with an f32 KV cache its
// logits for bf16/f16 weights are held to the native tolerance, not to 1e-4.
inline void CheckAgainstReference(Backend& backend, const std::string& model_dir,
                                  const Reference& ref, const std::string& name,
                                  bool rounds_activations = false) {
  auto model = LoadModel(model_dir, backend);
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
  const double tol32 = !rounds_activations || ref.dtype == "float32" ? 1e-4
                       : ref.dtype == "bfloat16"                     ? 5e-2
                                                                     : 1e-2;
  EXPECT_LE(d32.rel(), tol32) << "vs fp32 reference: max abs " << d32.max_abs << " of "
                              << d32.ref_max;
  const int decisive = CheckGreedy(ours, ref.fp32, V, tol32 * d32.ref_max);
  if (tol32 == 1e-4) {
    EXPECT_GE(decisive, static_cast<int>(ref.tokens.size()) / 2);
  }

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

}  // namespace needle::test
