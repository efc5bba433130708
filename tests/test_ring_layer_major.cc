// What the hybrid engine (engine/cuda/hybrid.h) stands on, beside it: the ring layers of KVCache
// (and their extra slots, --gpu-share), and the layer-major prompt order of Model (the order the
// hybrid runs prompts in) against the micro-batch order, on the CPU and (with a GPU) with the
// residual stream through host memory.
#include <gtest/gtest.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/runtime/sequence_attention.h"
#include "tests/fixture_util.h"
#include "tests/gpu_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

// Layer 0 whole, layer 1 a ring of 2 pinned + 3 cycling blocks: 16 blocks of 4 tokens.
KVCacheShape SmallRing() {
  KVCacheShape s(2, 1, 4, 64, 4, DType::kF32);
  s.ring_layer = {0, 1};
  s.pinned_blocks = 2, s.ring_blocks = 3;
  return s;
}

// Ring layers keep their pinned blocks, cycle the rest through ring_blocks slots, and forget
// (table entry -1) the block whose slot was taken; other layers are untouched.
TEST(KVCacheRing, PinnedBlocksStayOthersCycle) {
  const KVCacheShape s = SmallRing();
  KVCache c(s);
  EXPECT_EQ(s.LayerSlots(0), 16);
  EXPECT_EQ(s.LayerSlots(1), 5);
  EXPECT_EQ(s.TotalBytes(), s.SlotBytes() * 21);
  std::vector<float> k(4, 1.f), v(4, 2.f);
  for (int64_t p = 0; p < 40; ++p) {
    for (int64_t l = 0; l < 2; ++l) c.Write(l, p, 1, k.data(), v.data());
    const int64_t blk = p / 4;
    EXPECT_EQ(c.SlotOf(0, blk), blk);
    EXPECT_EQ(c.SlotOf(1, blk), blk < 2 ? blk : 2 + (blk - 2) % 3) << "block " << blk;
    for (int64_t b = 0; b < blk; ++b) {
      const bool kept = b < 2 || b > blk - 3;
      EXPECT_EQ(c.SlotOf(1, b) >= 0, kept) << "block " << b << " at position " << p;
    }
  }
  // Writing more blocks at once than the ring holds is refused.
  KVCache d(s);
  test::ExpectErrorContaining([&] { d.AssignBlocks(1, 8, 16); }, {"overflows the ring", "layer 1"});
}

// A ring layer's extra slots follow its ring; no logical block is ever given one.
TEST(KVCacheRing, ExtraSlotsFollowTheRing) {
  KVCacheShape s = SmallRing();
  s.extra_blocks = 2;
  EXPECT_EQ(s.LayerSlots(0), 16);
  EXPECT_EQ(s.LayerSlots(1), 7);
  EXPECT_EQ(s.ExtraSlot(1, 0), 5);
  EXPECT_EQ(s.ExtraSlot(1, 1), 6);
  KVCache c(s);
  std::vector<float> k(4, 1.f), v(4, 2.f);
  for (int64_t p = 0; p < 64; ++p) {
    c.Write(1, p, 1, k.data(), v.data());
    for (int64_t b = 0; b <= p / 4; ++b) EXPECT_LT(c.SlotOf(1, b), 5) << b;
  }
  // The hybrid's shape: ceil(gpu_share% of topk) extra slots, or gpu_cache_blocks if more.
  SparseConfig sc;
  sc.topk = 5, sc.gpu_share = 50;
  EXPECT_EQ(sc.GpuContextSlots(), 3);
  sc.gpu_cache_blocks = 2;
  EXPECT_EQ(sc.GpuContextSlots(), 3);
  sc.gpu_cache_blocks = 16;
  EXPECT_EQ(sc.GpuContextSlots(), 16);
  sc.gpu_cache_blocks = 0;
  sc.gpu_share = 0;
  EXPECT_EQ(sc.GpuContextSlots(), 0);
  sc.gpu_share = 101;
  test::ExpectErrorContaining([&] { sc.Validate(); }, {"gpu_share", "101"});
  sc.gpu_share = 50, sc.gpu_cache_blocks = -1;
  test::ExpectErrorContaining([&] { sc.Validate(); }, {"gpu_cache_blocks", "-1"});
}

// A policy that runs prompts layer by layer around another one: the arithmetic of every
// micro-batch and layer is the same, so the logits and the sparse plans must be equal to the
// bit.
class LayerMajor final : public AttentionPolicy {
 public:
  LayerMajor(AttentionPolicy& inner, bool resident) : inner_(inner), resident_(resident) {}
  void BeginStep(const StepInfo& s) override { inner_.BeginStep(s); }
  void Attend(int64_t layer, const float* q, const AttnArgs& a, KVCache& cache,
              float* out) override {
    inner_.Attend(layer, q, a, cache, out);
  }
  Prefill PrefillOrder(int64_t) const override { return {true, resident_}; }

 private:
  AttentionPolicy& inner_;
  bool resident_;
};

TEST(LayerMajorPrompt, EqualsMicroBatchOrder) {
  ThreadingContext tc(2);
  auto cpu = MakeCpuBackend(tc, false);
  for (const char* name : {"llama_gqa4_hd64_f32", "qwen3_qknorm_gqa4_f32", "mistral_swa_f32"}) {
    auto model = LoadModel(test::FixturesDir() + "/" + name, *cpu);
    model->set_ubatch(48);
    std::vector<int32_t> prompt(300);
    for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>((i * 29 + 7) % 250);
    SparseConfig sc;
    sc.block_size = 16, sc.init_tokens = 16, sc.local_window = 64, sc.topk = 3, sc.dense_layers = 0,
    sc.retain_blocks = 1;
    std::vector<std::vector<float>> logits;
    std::vector<std::string> plans;
    for (int mode = 0; mode < 3; ++mode) {  // micro-batches; layer-major resident; via the host
      SequenceOptions so;
      so.ctx = 400;
      so.kv_type = DType::kF32;
      SequenceAttention seq = MakeSequenceAttention(*model, &sc, tc, so);
      std::ostringstream plan;
      seq.planner->set_plan_sink(&plan);
      LayerMajor lm(*seq.policy, mode == 1);
      model->set_attention(mode == 0 ? seq.policy.get() : &lm);
      std::vector<float> all, l;
      model->Forward(prompt.data(), static_cast<int64_t>(prompt.size()), *seq.cache, true, &l);
      all = l;
      for (int32_t t = 0; t < 20; ++t) {
        const int32_t tok = (t * 13 + 5) % 250;
        model->Forward(&tok, 1, *seq.cache, false, &l);
        all.insert(all.end(), l.begin(), l.end());
      }
      model->set_attention(nullptr);
      logits.push_back(all);
      plans.push_back(plan.str());
    }
    for (int mode = 1; mode < 3; ++mode) {
      EXPECT_EQ(plans[mode], plans[0]) << name << " mode " << mode;
      ASSERT_EQ(logits[mode].size(), logits[0].size());
      for (size_t i = 0; i < logits[0].size(); ++i)
        ASSERT_EQ(logits[mode][i], logits[0][i]) << name << " mode " << mode << " at " << i;
    }
    // (Mistral's fixture slides a window in every layer: all of them attend densely.)
    if (std::string(name) != "mistral_swa_f32") {
      EXPECT_NE(plans[0].find("\"blocks\""), std::string::npos) << name;
    }
  }
}

// On the GPU, a layer-major prompt whose residual stream goes through host memory (the copy
// streams, each next micro-batch loaded beside the current one's work) gives the logits of the
// resident stream to the bit: every row of the prompt's logits (all_logits) and of the steps after.
#ifdef NEEDLE_HAVE_CUDA
TEST(LayerMajorPrompt, ThroughHostEqualsResidentOnTheGpu) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(0);
  auto model = LoadModel(test::FixturesDir() + "/qwen2_bias_gqa7_f32", *gpu);
  model->set_ubatch(48);  // 7 micro-batches, the last one short
  std::vector<int32_t> prompt(300);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>((i * 29 + 7) % 250);
  std::vector<float> logits[2];
  for (int mode = 0; mode < 2; ++mode) {  // resident; via the host
    SequenceOptions so;
    so.ctx = 400;
    so.kv_type = DType::kF32;
    SequenceAttention seq = MakeSequenceAttention(*model, nullptr, tc, so);  // (no policy)
    DenseAttention dense(*gpu);
    LayerMajor lm(dense, mode == 0);
    model->set_attention(&lm);
    std::vector<float> l;
    model->Forward(prompt.data(), static_cast<int64_t>(prompt.size()), *seq.cache, true, &l);
    logits[mode] = l;
    for (int32_t t = 0; t < 5; ++t) {
      const int32_t tok = (t * 13 + 5) % 250;
      model->Forward(&tok, 1, *seq.cache, false, &l);
      logits[mode].insert(logits[mode].end(), l.begin(), l.end());
    }
    model->set_attention(nullptr);
  }
  ASSERT_EQ(logits[1].size(), logits[0].size());
  for (size_t i = 0; i < logits[0].size(); ++i) ASSERT_EQ(logits[1][i], logits[0][i]) << i;
}
#endif

}  // namespace
}  // namespace needle
