// A sequence that goes on from an earlier point of itself (AttentionPolicy::Rewind; `needle ask`
// answers every question from the end of the document this way on the hybrid engine, and the
// Engine's slots serve sequences with caches of their own so): the tokens of each prompt equal
// those it gives alone, whichever longer or shorter sequence ran in the same caches before it.
// Dense and sparse attention on the CPU (CI); the hybrid engine, host and device placement, on a
// GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/model/model.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/sequence_attention.h"
#include "sparse_attn/sparse_attention.h"
#include "tests/fixture_util.h"
#include "tests/gpu_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

constexpr int64_t kCtx = 160, kMaxNew = 40, kCommon = 80;

// Three prompts of one 80-token document: 100, 100 and 100 tokens (its next 20, 20 others, its
// next 8 and 12 others).
std::vector<std::vector<int32_t>> Prompts(int64_t V) {
  std::vector<std::vector<int32_t>> p(3);
  for (int64_t i = 0; i < 100; ++i) p[0].push_back(static_cast<int32_t>((i * 37 + 7) % V));
  p[1].assign(p[0].begin(), p[0].begin() + kCommon);
  for (int64_t i = 0; i < 20; ++i) p[1].push_back(static_cast<int32_t>((i * 11 + 2) % V));
  p[2].assign(p[0].begin(), p[0].begin() + 88);
  for (int64_t i = 0; i < 12; ++i) p[2].push_back(static_cast<int32_t>((i * 5 + 9) % V));
  return p;
}

// Greedy tokens of `prompt` (40: blocks its answer fills become Context blocks) with the policy
// over `cache`, whose first `from` tokens are the prompt's already (the cache holds at least that
// many; it is rewound there).
std::vector<int32_t> GoOn(Model& m, AttentionPolicy& policy, KVCache& cache,
                          const std::vector<int32_t>& prompt, int64_t from) {
  policy.Rewind(cache, from);
  EXPECT_EQ(cache.size(), from);
  m.set_attention(&policy);
  std::vector<int32_t> toks = {
      m.ForwardGreedy(prompt.data() + from, static_cast<int64_t>(prompt.size()) - from, cache)};
  while (static_cast<int64_t>(toks.size()) < kMaxNew)
    toks.push_back(m.ForwardGreedy(&toks.back(), 1, cache));
  m.set_attention(nullptr);
  return toks;
}

// The representatives a planner holds after a prompt and its answer: those of the planner that
// ran them alone, block for block (the same function of the same keys; a block left from a
// longer sequence before the rewind would differ or be ready where it is not). tol 0: byte for
// byte (the CPU: a key's bits do not depend on the micro-batch it was computed in); else (f32
// representatives on the GPU, whose products may sum in another order for another number of
// rows) within tol x (1 + |value|): another token's keys differ by far more.
void ExpectSameRepresentatives(const SparseAttention& got, const SparseAttention& want,
                               const std::string& what, float tol = 0) {
  const RepresentativeStore &g = got.representatives(), &w = want.representatives();
  ASSERT_TRUE(tol == 0 || w.storage() == DType::kF32) << what;
  const size_t n = w.BlockBytes() / sizeof(float);
  for (int64_t l = 0; l < w.layers(); ++l)
    for (int64_t b = 0; b < w.max_blocks(); ++b) {
      const std::string at = what + ", layer " + std::to_string(l) + ", block " + std::to_string(b);
      ASSERT_EQ(g.ready(l, b), w.ready(l, b)) << at;
      if (!w.ready(l, b)) continue;
      if (tol == 0) {
        ASSERT_EQ(std::memcmp(g.Block(l, b), w.Block(l, b), w.BlockBytes()), 0) << at;
        continue;
      }
      const float* gf = static_cast<const float*>(g.Block(l, b));
      const float* wf = static_cast<const float*>(w.Block(l, b));
      for (size_t i = 0; i < n; ++i) ASSERT_NEAR(gf[i], wf[i], tol * (1 + std::fabs(wf[i]))) << at;
    }
}

struct Case {
  std::string what;
  SparseConfig cfg;
  bool sparse;
};

std::vector<Case> Cases() {
  SparseConfig c;
  c.block_size = 8, c.init_tokens = 8, c.local_window = 16, c.topk = 2, c.dense_layers = 0;
  c.retain_blocks = 1;
  std::vector<Case> cases = {{"dense", c, false}, {"sparse, dense prefill", c, true}};
  SparseConfig s = c;
  s.sparse_prefill = true, s.prefill_chunk = 16;
  cases.push_back({"sparse prefill", s, true});
  s = c;
  s.preselect_blocks = 4, s.obs_window = 16, s.repr = ReprType::kMax;
  cases.push_back({"preselection", s, true});
  s = c;
  s.repr = ReprType::kDynamic, s.obs_window = 16;
  cases.push_back({"dynamic", s, true});
  return cases;
}

// Where each prompt goes on from: as much of the document (its 80 tokens prefilled as one prompt)
// as leaves it attending as alone.
std::vector<int64_t> From(const Case& k, const std::vector<std::vector<int32_t>>& p, int64_t ub) {
  std::vector<int64_t> from;
  for (const auto& prompt : p)
    from.push_back(
        k.sparse ? k.cfg.ShareablePrefix(kCommon, static_cast<int64_t>(prompt.size()), kCommon, ub)
                 : kCommon);
  return from;
}

// (The order revisits shorter prompts after longer ones: stale blocks past the rewind point
// would show.)
const std::vector<size_t> kOrder = {0, 1, 2, 1, 0, 2};

// The CPU's fixture model, prompts in micro-batches of 32, and a case's policy for it.
struct CpuFixture {
  ThreadingContext tc{2};
  std::unique_ptr<Backend> cpu = MakeCpuBackend(tc, false);
  std::unique_ptr<Model> model = LoadModel(test::FixturesDir() + "/llama_gqa4_hd64_f32", *cpu);
  CpuFixture() { model->set_ubatch(32); }
  std::unique_ptr<AttentionPolicy> Policy(const Case& k) {
    if (!k.sparse) return std::make_unique<DenseAttention>(model->backend());
    return std::make_unique<SparseAttention>(model->config(), k.cfg, model->backend(), tc, kCtx,
                                             DType::kF32);
  }
};

TEST(Rewind, SequencesGoOnFromTheDocumentAsAlone) {
  CpuFixture f;
  Model& m = *f.model;
  const auto p = Prompts(m.config().vocab_size);
  for (const Case& k : Cases()) {
    const auto policy = [&] { return f.Policy(k); };
    const KVCacheShape shape = m.CacheShape(kCtx, DType::kF32, k.cfg.block_size);
    std::vector<std::vector<int32_t>> alone;
    std::vector<std::unique_ptr<AttentionPolicy>> alone_policy;
    for (const auto& prompt : p) {
      alone_policy.push_back(policy());
      KVCache cache(shape);
      alone.push_back(GoOn(m, *alone_policy.back(), cache, prompt, 0));
    }
    const std::vector<int64_t> from = From(k, p, m.ubatch());
    auto pol = policy();
    KVCache cache(shape);
    EXPECT_GE(*std::min_element(from.begin(), from.end()), 64) << k.what;
    m.set_attention(pol.get());
    m.Forward(p[0].data(), kCommon, cache, false, nullptr);
    m.set_attention(nullptr);
    for (size_t i : kOrder) {
      EXPECT_EQ(GoOn(m, *pol, cache, p[i], from[i]), alone[i]) << k.what << ", prompt " << i;
      if (k.sparse)
        ExpectSameRepresentatives(dynamic_cast<SparseAttention&>(*pol),
                                  dynamic_cast<SparseAttention&>(*alone_policy[i]),
                                  k.what + ", prompt " + std::to_string(i));
    }
  }
}

// The Engine's slots (EngineOptions::own_caches): the prompts of kOrder submitted together, run
// `batch` at a time in slots of their own, each rewound to the prefix it shares with the slot's
// last prompt. Returns each sequence's tokens; *reused: the prompt tokens taken from the slots.
std::vector<std::vector<int32_t>> RunInSlots(Model& m, ThreadingContext& tc, const Case& k,
                                             int64_t batch, KVPlacement placement,
                                             int64_t* reused) {
  EngineOptions o;
  o.max_batch = batch, o.max_context = kCtx, o.block_size = k.cfg.block_size;
  o.kv_type = DType::kF32;
  o.own_caches = [&](int64_t ctx, size_t) {
    SequenceOptions so;
    so.ctx = ctx, so.kv_type = DType::kF32, so.ubatch = m.ubatch(), so.placement = placement;
    return MakeSequenceAttention(m, k.sparse ? &k.cfg : nullptr, tc, so);
  };
  Engine e(m, o);
  const auto p = Prompts(m.config().vocab_size);
  for (size_t i : kOrder) {
    SequenceRequest r;
    r.prompt = p[i], r.max_new = kMaxNew, r.ignore_eos = true;
    e.Submit(std::move(r));
  }
  std::vector<std::vector<int32_t>> got(kOrder.size());
  while (!e.Idle()) {
    for (const TokenEvent& ev : e.Step()) got[static_cast<size_t>(ev.seq)].push_back(ev.token);
    EXPECT_LE(e.Running(), batch);
  }
  EXPECT_EQ(e.own_slots(), batch) << k.what;
  EXPECT_EQ(e.free_blocks(), 0);  // (no pool)
  *reused = e.reused_tokens();
  return got;
}

// Sequences in slots of their own give the tokens they give alone, one slot or two, taking the
// document's part their prompts share with the slot's last one (one slot: every prompt after the
// first; kOrder's neighbours share at least 64 tokens under every case's ShareablePrefix).
TEST(Rewind, EngineSlotsServeSequencesAsAlone) {
  CpuFixture f;
  Model& m = *f.model;
  const auto p = Prompts(m.config().vocab_size);
  for (const Case& k : Cases()) {
    std::vector<std::vector<int32_t>> want;
    for (size_t i : kOrder) {
      const std::unique_ptr<AttentionPolicy> pol = f.Policy(k);
      KVCache cache(m.CacheShape(kCtx, DType::kF32, k.cfg.block_size));
      want.push_back(GoOn(m, *pol, cache, p[i], 0));
    }
    for (int64_t batch : {1, 2}) {
      int64_t reused = 0;
      EXPECT_EQ(RunInSlots(m, f.tc, k, batch, KVPlacement::kAuto, &reused), want)
          << k.what << ", batch " << batch;
      if (batch == 1) {
        EXPECT_GE(reused, 64 * static_cast<int64_t>(kOrder.size() - 1)) << k.what;
      }
      EXPECT_GT(reused, 0) << k.what << ", batch " << batch;
    }
  }
}

#ifdef NEEDLE_HAVE_CUDA
// The hybrid engine's caches (the host's, the GPU's dense layers and rings) and planner rewound:
// each prompt's tokens equal its own alone, in host and device placement, the GPU attending half
// of the Context blocks (which stay in its memory from step to step) or none.
TEST(Rewind, HybridSequencesGoOnFromTheDocumentAsAlone) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(0);
  for (const char* name : {"llama_gqa4_hd64_f32", "qwen2_bias_gqa7_f32"}) {
    auto model = LoadModel(test::FixturesDir() + "/" + name, *gpu);
    Model& m = *model;
    m.set_ubatch(32);
    const auto p = Prompts(m.config().vocab_size);
    for (const KVPlacement placement : {KVPlacement::kHost, KVPlacement::kDevice})
      for (int share : {50, 0})
        for (Case k : Cases()) {
          if (!k.sparse) continue;
          k.cfg.gpu_share = share;
          const std::string what = std::string(name) + ", " + k.what + ", " +
                                   KVPlacementName(placement) + ", gpu_share " +
                                   std::to_string(share);
          SequenceOptions so;
          so.placement = placement;
          so.ctx = kCtx;
          so.kv_type = DType::kF32;
          so.ubatch = 32;
          std::vector<std::vector<int32_t>> alone;
          std::vector<SequenceAttention> alone_seq;
          for (const auto& prompt : p) {
            alone_seq.push_back(MakeSequenceAttention(m, &k.cfg, tc, so));
            SequenceAttention& seq = alone_seq.back();
            ASSERT_TRUE(seq.hybrid) << what;
            alone.push_back(GoOn(m, *seq.policy, *seq.cache, prompt, 0));
          }
          const std::vector<int64_t> from = From(k, p, m.ubatch());
          SequenceAttention seq = MakeSequenceAttention(m, &k.cfg, tc, so);
          m.set_attention(seq.policy.get());
          m.Forward(p[0].data(), kCommon, *seq.cache, false, nullptr);
          m.set_attention(nullptr);
          for (size_t i : kOrder) {
            EXPECT_EQ(GoOn(m, *seq.policy, *seq.cache, p[i], from[i]), alone[i])
                << what << ", prompt " << i;
            ExpectSameRepresentatives(*seq.planner, *alone_seq[i].planner,
                                      what + ", prompt " + std::to_string(i), 1e-4f);
          }
          // The Engine's slots of hybrid sequences (needle serve's on a GPU).
          if (share != 50) continue;
          std::vector<std::vector<int32_t>> want;
          for (size_t i : kOrder) want.push_back(alone[i]);
          for (int64_t batch : {1, 2}) {
            int64_t reused = 0;
            EXPECT_EQ(RunInSlots(m, tc, k, batch, placement, &reused), want)
                << what << ", engine batch " << batch;
            EXPECT_GT(reused, 0) << what << ", engine batch " << batch;
          }
        }
  }
}

// Slots under one --gpu-memory: each slot's caches are checked against what the slots made
// before it left of the budget, not against the whole budget again; refused naming the numbers.
TEST(Rewind, HybridSlotsShareOneGpuBudget) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(0);
  auto model = LoadModel(test::FixturesDir() + "/llama_gqa4_hd64_f32", *gpu);
  Model& m = *model;
  m.set_ubatch(32);
  const Case k = Cases()[1];  // (sparse)
  ASSERT_TRUE(k.sparse);
  SequenceOptions so;
  so.ctx = kCtx, so.kv_type = DType::kF32, so.ubatch = 32, so.placement = KVPlacement::kHost;
  so.gpu_memory = size_t{64} << 30;
  const size_t one = MakeSequenceAttention(m, &k.cfg, tc, so).gpu_bytes;
  ASSERT_GT(one, 0u);
  const size_t weights = m.weights().TotalBytes();
  const auto engine = [&](size_t budget) {
    EngineOptions o;
    o.max_batch = 2, o.max_context = kCtx, o.block_size = k.cfg.block_size;
    o.kv_type = DType::kF32;
    o.own_caches = [&](int64_t ctx, size_t taken) {
      SequenceOptions s = so;
      s.ctx = ctx, s.gpu_memory = budget, s.gpu_taken = taken;
      return MakeSequenceAttention(m, &k.cfg, tc, s);
    };
    return std::make_unique<Engine>(m, o);
  };
  EXPECT_EQ(engine(weights + 2 * one)->own_slots(), 2);
  test::ExpectErrorContaining([&] { engine(weights + one + one / 2); }, {"--gpu-memory less the"});
}
#endif

}  // namespace
}  // namespace needle
