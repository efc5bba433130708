// The hybrid engine (engine/cuda/hybrid.h) and what it stands on.
//
// On CI (no GPU): the CPU's block fold (AttendBlocks) and the GPU memory accounting and its
// refusal (the ring layers and the layer-major prompt order: test_ring_layer_major.cc). On a GPU:
// the log-sum-exp merge kernel, the hybrid against the CPU's sparse attention (the same plan, step
// by step) and, with topk covering every block, against dense attention on the GPU.
//
// Tolerance of the hybrid against the CPU (f32 weights and f32 KV cache): both compute the same
// f32 expressions; only the order of sums differs (cuBLAS and the GPU attention against the CPU's
// kernels): K * 2^-24 relative per product, about 1e-5 of a logit's magnitude after the two
// layers of a fixture. The logits are compared within 1e-3 of the largest one: a key attended
// or left out by mistake, or a wrong position, moves them by far more (a tenth or more). The plan
// (the blocks each KV head attends) must be identical: it is computed by the same planner from
// keys that differ by rounding only.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "engine/attention/partial.h"
#include "engine/backend/backend.h"
#include "engine/cpu/amx.h"
#include "engine/cpu/bf16dot.h"
#include "engine/runtime/sequence_attention.h"
#include "sparse_attn/block_mass.h"
#include "sparse_attn/observation.h"
#include "sparse_attn/scoring.h"
#include "tests/fixture_util.h"
#include "tests/gpu_test_util.h"
#include "tests/test_util.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/hybrid.h"
#include "engine/cuda/kernels.h"
#endif

namespace needle {
namespace {

// The hybrid's CPU side: AttendBlocks equals the span kernel over the same blocks, and its
// per-block sums give block_mass.h's masses. Same f32 arithmetic in another grouping: outputs
// within 1e-5 relative, masses within 1e-5 of G (their range).
TEST(AttendBlocks, EqualsSpanAttentionAndBlockMass) {
  // The Highway fold (the bf16 rounding of the tiles and of AVX512-BF16: test_amx.cc).
  amx::SetMode(amx::Mode::kOff);
  bf16dot::SetMode(bf16dot::Mode::kOff);
  ThreadingContext tc(3);
  for (DType kvt : {DType::kF32, DType::kBF16}) {
    for (int64_t G : {1, 4, 7}) {
      const int64_t Hk = 2, D = 64, B = 16, n_tok = 300;
      KVCache cache(KVCacheShape(1, Hk, D, n_tok, B, kvt));
      const std::vector<float> k = test::RandomVector(n_tok * Hk * D, 5, 2.f),
                               v = test::RandomVector(n_tok * Hk * D, 6);
      cache.Write(0, 0, n_tok, k.data(), v.data());
      cache.SetSize(n_tok);
      const KVLayerView kv = cache.Layer(0);
      AttnArgs a;
      a.T = 1, a.pos0 = n_tok - 1, a.heads = Hk * G, a.kv_heads = Hk, a.head_dim = D;
      a.scale = 0.125f;
      const std::vector<float> q = test::RandomVector(a.heads * D, 7, 2.f);
      // Head 0: scattered blocks, the partial last one included; head 1: none or a run; then
      // head 0 with none and head 1 with the run (a head without blocks before one with).
      for (int variant = 0; variant < 3; ++variant) {
        std::vector<std::vector<int32_t>> blocks = {{1, 2, 5, 9, 18}, {}};
        if (variant >= 1) blocks[1] = {3, 4, 5, 6, 7, 8, 10};
        if (variant == 2) blocks[0].clear();
        std::vector<float> out(static_cast<size_t>(a.heads * D)), lse(static_cast<size_t>(a.heads)),
            stats;
        fast::AttendBlocks(q.data(), kv, a, blocks, out.data(), lse.data(), &stats, tc);
        // The same bits on every call: each head's partials merge in block order, whichever
        // thread folded them.
        // (Timed or not: FoldTimes' phases are each within the call.)
        for (int again = 0; again < 4; ++again) {
          std::vector<float> out2(out.size()), lse2(lse.size()), stats2;
          fast::FoldTimes ft;
          const auto t0 = std::chrono::steady_clock::now();
          fast::AttendBlocks(q.data(), kv, a, blocks, out2.data(), lse2.data(), &stats2, tc,
                             again % 2 == 0 ? &ft : nullptr);
          const double call =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          ASSERT_EQ(0, std::memcmp(out2.data(), out.data(), out.size() * 4));
          ASSERT_EQ(0, std::memcmp(lse2.data(), lse.data(), lse.size() * 4));
          if (again % 2 != 0) continue;
          EXPECT_GT(ft.fold, 0.0);
          EXPECT_GE(ft.start, 0.0);
          EXPECT_LE(ft.start, ft.fold);
          EXPECT_LE(ft.setup + ft.fold + ft.merge, call);
          // The fold's inside: its items (runs of `per` blocks of a head, about four a thread),
          // each timed once, by the chunks' threads, within the span from the first item's start
          // to the last one's end.
          int64_t total = 0, items = 0;
          for (const auto& hb : blocks) total += static_cast<int64_t>(hb.size());
          const int64_t per =
              std::max<int64_t>(1, (total + 4 * tc.threads() - 1) / (4 * tc.threads()));
          for (const auto& hb : blocks) items += (static_cast<int64_t>(hb.size()) + per - 1) / per;
          EXPECT_EQ(ft.calls, 1.0);
          EXPECT_EQ(ft.items, static_cast<double>(items));
          EXPECT_GE(ft.chunks, 1.0);
          EXPECT_LE(ft.chunks, ft.items);
          EXPECT_GE(ft.threads, 1.0);
          EXPECT_LE(ft.threads, std::min<double>(ft.chunks, tc.threads()));
          EXPECT_LE(ft.start, ft.last);
          EXPECT_LE(ft.last, ft.fold);
          EXPECT_GT(ft.busy, 0.0);
          EXPECT_LE(ft.busy, ft.threads * (ft.last - ft.start) + 1e-9);
        }
        AttnSpans spans;
        spans.offsets = {0};
        for (const auto& hb : blocks) {
          for (int32_t b : hb)
            spans.spans.push_back({b * B, std::min<int64_t>((b + 1) * B, n_tok)});
          spans.offsets.push_back(static_cast<int64_t>(spans.spans.size()));
        }
        std::vector<float> want(out.size()), want_lse(lse.size());
        fast::Attention(q.data(), kv, a, &spans, want.data(), want_lse.data(), tc);
        for (size_t i = 0; i < out.size(); ++i)
          ASSERT_NEAR(out[i], want[i], 1e-5 * (1 + std::fabs(want[i]))) << i;
        for (size_t i = 0; i < lse.size(); ++i) {
          if (want_lse[i] == -INFINITY) {
            EXPECT_EQ(lse[i], -INFINITY);
            continue;
          }
          ASSERT_NEAR(lse[i], want_lse[i], 1e-5 * (1 + std::fabs(want_lse[i]))) << i;
        }
        // Masses against the whole step's lse (here: these blocks' own, plus a made-up rest).
        std::vector<float> step_lse = lse;
        for (float& x : step_lse) x = x == -INFINITY ? 0.5f : x + 0.25f;
        std::vector<std::vector<float>> got_mass, want_mass;
        fast::BlockMassFromStats(stats, step_lse.data(), G, blocks, &got_mass);
        fast::BlockMass(kv,
                        BlockMassArgs{q.data(), step_lse.data(), a.heads, Hk, D, a.scale, &blocks},
                        &want_mass, tc);
        ASSERT_EQ(got_mass.size(), want_mass.size());
        for (size_t h = 0; h < got_mass.size(); ++h) {
          ASSERT_EQ(got_mass[h].size(), want_mass[h].size());
          for (size_t i = 0; i < got_mass[h].size(); ++i)
            ASSERT_NEAR(got_mass[h][i], want_mass[h][i], 1e-5 * G) << h << " " << i;
        }
      }
    }
  }
  amx::SetMode(amx::Mode::kFromEnv);
  bf16dot::SetMode(bf16dot::Mode::kFromEnv);
}

#ifdef NEEDLE_HAVE_CUDA
TEST(HybridMemory, BreakdownAndRefusalNameTheNumbers) {
  ModelConfig m;
  m.num_layers = 28, m.num_heads = 28, m.num_kv_heads = 4, m.head_dim = 128;
  m.hidden_size = 3584, m.intermediate_size = 18944, m.vocab_size = 152064;
  m.sliding_window.assign(28, 0);
  SparseConfig c;    // dense_layers 2, local 4096, init 128, block 128
  c.gpu_share = 50;  // (one share: 16 of topk 32)
  const int64_t ctx = int64_t{1} << 20;
  const size_t weights = size_t{15} << 30;
  const HybridGpuMemory g = HybridGpuNeeds(m, c, ctx, DType::kBF16, weights, 512, false);
  // Qwen2.5-7B shapes: 2 KB of K+V per token and layer in bf16.
  const size_t per_layer_token = 2 * 4 * 128 * 2;
  EXPECT_EQ(g.dense_kv, 2 * per_layer_token * static_cast<size_t>(ctx));
  EXPECT_EQ(g.staging_kv, per_layer_token * static_cast<size_t>(ctx));
  // Per sparse layer: 1 Initial block, 33 for Local, 16 for the GPU's 50% of topk 32.
  EXPECT_EQ(g.window_kv, 26 * per_layer_token * 128 * (1 + 33 + 16));
  EXPECT_LT(g.total(), size_t{24} << 30);  // 1M tokens of a 7B model within 24 GB
  const HybridGpuMemory r = HybridGpuNeeds(m, c, ctx, DType::kBF16, weights, 512, true);
  // (The whole residual stream, against the two micro-batch slots it moves through from host
  // memory.)
  EXPECT_EQ(r.activations - g.activations, static_cast<size_t>((ctx - 2 * 512) * 3584 * 4));
  CheckHybridBudget(g, size_t{24} << 30, "--gpu-memory");
  // --kv-placement device: every block of the 26 sparse layers on the GPU (the ring of the whole
  // context, Initial included), and extra slots for all 32 selected blocks; 1M does not fit 24 GB.
  const HybridGpuMemory d = HybridGpuNeeds(m, c, ctx, DType::kBF16, weights, 512, false, true);
  EXPECT_EQ(d.dense_kv, g.dense_kv);
  EXPECT_EQ(d.window_kv, 26 * per_layer_token * 128 * (ctx / 128 + 32));
  EXPECT_NE(d.Describe().find("sparse-layer KV (every block)"), std::string::npos);
  test::ExpectErrorContaining([&] { CheckHybridBudget(d, size_t{24} << 30, "--gpu-memory"); },
                              {"needs", "--gpu-memory is 24.00 GiB"});
  EXPECT_EQ(ParseKVPlacement("device", "--kv-placement"), KVPlacement::kDevice);
  EXPECT_EQ(ParseKVPlacement("host", "--kv-placement"), KVPlacement::kHost);
  test::ExpectErrorContaining([] { ParseKVPlacement("gpu", "--kv-placement"); },
                              {"--kv-placement", "'gpu'", "auto, host or device"});
  test::ExpectErrorContaining(
      [&] { CheckHybridBudget(g, size_t{16} << 30, "--gpu-memory"); },
      {"needs", "weights 15.00 GiB", "dense-layer KV 4.00 GiB", "--gpu-memory is 16.00 GiB"});
  // The GPU block cache (gpu_cache_blocks 0): 4 shares of 16 slots where the budget has room,
  // as many as fit where it has less, one share where it has none; a set value as it is.
  const size_t slot = 26 * per_layer_token * 128;  // one extra slot of every sparse layer
  EXPECT_EQ(HybridAutoCacheBlocks(m, c, ctx, DType::kBF16, weights, 512, false, size_t{80} << 30),
            64);
  EXPECT_EQ(HybridAutoCacheBlocks(m, c, ctx, DType::kBF16, weights, 512, false,
                                  g.total() + 10 * slot + slot / 2),
            26);
  EXPECT_EQ(HybridAutoCacheBlocks(m, c, ctx, DType::kBF16, weights, 512, false, g.total()), 16);
  EXPECT_EQ(HybridAutoCacheBlocks(m, c, ctx, DType::kBF16, weights, 512, false, g.total() - 1), 16);
  SparseConfig set = c;
  set.gpu_cache_blocks = 20;
  EXPECT_EQ(HybridAutoCacheBlocks(m, set, ctx, DType::kBF16, weights, 512, false, g.total()), 20);
  set.gpu_cache_blocks = 0, set.gpu_share = 0;
  EXPECT_EQ(HybridAutoCacheBlocks(m, set, ctx, DType::kBF16, weights, 512, false, size_t{80} << 30),
            0);
  // Where the GPU plans the steps (bf16 or f16 caches, unless NEEDLE_HYBRID_DEVICE_PLAN=0): 8.
  setenv("NEEDLE_HYBRID_DEVICE_PLAN", "0", 1);
  EXPECT_EQ(HybridAutoCacheShares(DType::kBF16), 4);
  unsetenv("NEEDLE_HYBRID_DEVICE_PLAN");
  EXPECT_EQ(HybridAutoCacheBlocks(m, c, ctx, DType::kBF16, weights, 512, false, size_t{80} << 30,
                                  HybridAutoCacheShares(DType::kBF16)),
            128);
  EXPECT_EQ(HybridAutoCacheBlocks(m, c, ctx, DType::kBF16, weights, 512, false,
                                  g.total() + 10 * slot + slot / 2, 8),
            26);
  EXPECT_EQ(HybridAutoCacheShares(DType::kF16), 8);
  EXPECT_EQ(HybridAutoCacheShares(DType::kF32), 4);
}

TEST(HybridMerge, KernelEqualsPartialMerge) {
  NEEDLE_REQUIRE_GPU(gpu);
  const int64_t rows = 7, D = 96;
  std::vector<float> oa = test::RandomVector(rows * D, 1), ob = test::RandomVector(rows * D, 2);
  std::vector<float> la = {0.5f, -3.f, 10.f, -INFINITY, 2.f, -INFINITY, 40.f};
  std::vector<float> lb = {0.7f, 4.f, -10.f, 1.f, -INFINITY, -INFINITY, 40.5f};
  const size_t n = static_cast<size_t>(rows * D);
  float* d = gpu->Alloc(3 * n + 3 * static_cast<size_t>(rows));
  gpu->FromHost(oa.data(), n, d);
  gpu->FromHost(ob.data(), n, d + n);
  gpu->FromHost(la.data(), rows, d + 3 * n);
  gpu->FromHost(lb.data(), rows, d + 3 * n + rows);
  cuda::MergeAttention(d, d + 3 * n, d + n, d + 3 * n + rows, rows, D, d + 2 * n,
                       d + 3 * n + 2 * rows, CudaBackendStream(*gpu));
  std::vector<float> out(n), lse(static_cast<size_t>(rows));
  gpu->ToHost(d + 2 * n, n, out.data());
  gpu->ToHost(d + 3 * n + 2 * rows, rows, lse.data());
  gpu->Free(d);
  for (int64_t r = 0; r < rows; ++r) {
    // The same merge through PartialAttention: a normalised output with lse is the partial
    // (out * l, m = lse, l = 1).
    std::vector<float> a(oa.begin() + r * D, oa.begin() + (r + 1) * D),
        b(ob.begin() + r * D, ob.begin() + (r + 1) * D), want(static_cast<size_t>(D));
    PartialAttention pa(a.data(), D), pb(b.data(), D);
    for (int64_t i = 0; i < D; ++i) a[i] = oa[r * D + i], b[i] = ob[r * D + i];
    if (la[r] != -INFINITY) pa.m = la[r], pa.l = 1, pa.n = 1;
    if (lb[r] != -INFINITY) pb.m = lb[r], pb.l = 1, pb.n = 1;
    pa.Merge(pb);
    pa.Finalize(want.data());
    for (int64_t i = 0; i < D; ++i)
      ASSERT_NEAR(out[r * D + i], want[i], 1e-5 * (1 + std::fabs(want[i]))) << r << " " << i;
    if (pa.empty())
      EXPECT_EQ(lse[r], -INFINITY);
    else
      EXPECT_NEAR(lse[r], pa.m + std::log(pa.l), 1e-5 * (1 + std::fabs(pa.m))) << r;
  }
}

struct SeqRun {
  std::vector<float> logits;  // the prompt's last row, then one row per decode step
  std::string plan;
  HybridStats stats;  // the hybrid's, at the end (HybridAttention::SyncStats)
};
SeqRun RunSequence(Model& model, const SparseConfig* sc, ThreadingContext& tc,
                   const std::vector<int32_t>& prompt, int64_t steps,
                   KVPlacement placement = KVPlacement::kHost, bool sink = true,
                   DType kv = DType::kF32) {
  SequenceOptions so;
  so.placement = placement;
  so.ctx = static_cast<int64_t>(prompt.size()) + steps + 1;
  so.kv_type = kv;
  so.ubatch = 64;
  SequenceAttention seq = MakeSequenceAttention(model, sc, tc, so);
  std::ostringstream plan;
  if (seq.planner != nullptr && sink) seq.planner->set_plan_sink(&plan);
  model.set_attention(seq.policy.get());
  SeqRun r;
  std::vector<float> l;
  model.Forward(prompt.data(), static_cast<int64_t>(prompt.size()), *seq.cache, false, &l);
  r.logits = l;
  const int64_t V = model.config().vocab_size;
  for (int64_t t = 0; t < steps; ++t) {
    const int32_t tok = static_cast<int32_t>((t * 13 + 5) % V);  // the same input every run
    model.Forward(&tok, 1, *seq.cache, false, &l);
    r.logits.insert(r.logits.end(), l.begin(), l.end());
  }
  model.set_attention(nullptr);
  r.plan = plan.str();
  if (auto* h = dynamic_cast<HybridAttention*>(seq.policy.get())) {
    h->SyncStats();
    r.stats = h->stats();
  }
  return r;
}

// A fixture loaded on the CPU and on the GPU, both stepping 64 tokens a micro-batch.
struct TwinModels {
  TwinModels(const std::string& fixture, Backend& gpu, ThreadingContext& tc)
      : cpu(MakeCpuBackend(tc, false)) {
    const std::string dir = test::FixturesDir() + "/" + fixture;
    on_cpu = LoadModel(dir, *cpu);
    on_gpu = LoadModel(dir, gpu);
    on_cpu->set_ubatch(64);
    on_gpu->set_ubatch(64);
  }
  std::unique_ptr<Backend> cpu;
  std::unique_ptr<Model> on_cpu, on_gpu;
};

// The plans (--dump-plan lines) equal, or a failure naming the first step that differs.
void ExpectSamePlans(const SeqRun& got, const SeqRun& want, const std::string& what) {
  if (got.plan == want.plan) return;
  std::istringstream g(got.plan), w(want.plan);
  std::string gl, wl;
  while (std::getline(g, gl) && std::getline(w, wl) && gl == wl) {
  }
  ADD_FAILURE() << what << ": plans differ\n  hybrid " << gl << "\n  cpu    " << wl;
}

void ExpectLogitsClose(const SeqRun& got, const SeqRun& want, const std::string& what) {
  double scale = 0;
  for (float x : want.logits) scale = std::max(scale, std::fabs(static_cast<double>(x)));
  ASSERT_EQ(got.logits.size(), want.logits.size()) << what;
  for (size_t i = 0; i < want.logits.size(); ++i)
    ASSERT_NEAR(got.logits[i], want.logits[i], 1e-3 * scale) << what << " at " << i;
}

std::vector<int32_t> Prompt(int64_t n, int64_t V) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<int32_t>((i * 29 + 7) % V);
  return p;
}

class HybridFixture : public ::testing::TestWithParam<std::string> {};

// The same plan as the CPU's sparse attention, and logits within the tolerance above, for
// per-KV-head and per-layer selection, with retention and with preselection (observation window),
// with the GPU attending half of its Context blocks (the default; those it holds from earlier
// steps stay in its memory), a quarter, none, or all; with sparse prefill and position remapping;
// with the retention masses read late and every block taken where few are missing.
TEST_P(HybridFixture, SamePlanAsCpuSparse) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(0);
  TwinModels tw(GetParam(), *gpu, tc);
  Model *on_cpu = tw.on_cpu.get(), *on_gpu = tw.on_gpu.get();
  const std::vector<int32_t> prompt = Prompt(333, on_cpu->config().vocab_size);
  std::vector<int32_t> aperiodic(prompt.size());
  uint64_t x = 88172645463325252ull;
  for (auto& t : aperiodic) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    t = static_cast<int32_t>(x % static_cast<uint64_t>(on_cpu->config().vocab_size));
  }
  for (int variant = 0; variant < 16; ++variant) {
    SparseConfig sc;
    sc.block_size = 16, sc.init_tokens = 16, sc.local_window = 48, sc.topk = 4, sc.dense_layers = 0,
    sc.retain_blocks = 2;
    if (variant == 1) sc.select = SelectMode::kLayer, sc.retain_blocks = 0;
    if (variant == 2) sc.preselect_blocks = 8, sc.obs_window = 32, sc.repr = ReprType::kMax;
    if (variant == 3) sc.gpu_share = 0;
    if (variant == 0) sc.gpu_share = 25, sc.gpu_cache_blocks = 3;  // (blocks kept 3 steps)
    if (variant == 4) sc.gpu_share = 100, sc.select = SelectMode::kLayer;
    // Sparse prefill (chunks across micro-batches), with and without position remapping, and
    // with a dense layer (dense within the trained length: a plan of every Context block).
    if (variant >= 5 && variant <= 8) sc.sparse_prefill = true, sc.prefill_chunk = 40;
    if (variant == 6) sc.pos_remap = true;
    if (variant == 7) sc.pos_remap = true, sc.dense_layers = 1, sc.select = SelectMode::kLayer;
    if (variant == 8) sc.pos_remap = true;  // (dense prefill, remapped decode)
    // Every layer's KV on the GPU (--kv-placement device), which attends every selected block:
    // per KV head with retention, per layer with preselection, after a sparse prefill. Without
    // preselection the GPU plans the steps itself (PlanDecode; the plans come back for the sink):
    // per KV head and per layer, Quest, Mean and Max, with and without retention.
    const KVPlacement pl = variant >= 9 ? KVPlacement::kDevice : KVPlacement::kHost;
    if (variant == 10) sc.select = SelectMode::kLayer, sc.preselect_blocks = 8, sc.obs_window = 32;
    // (The prompt's last query re-ranks every block by its best key, scored by the planner.)
    if (variant == 11)
      sc.sparse_prefill = true, sc.prefill_chunk = 40, sc.dense_layers = 1, sc.rescore_last = 1000;
    if (variant == 12) sc.select = SelectMode::kLayer, sc.repr = ReprType::kMean;
    if (variant == 13) sc.repr = ReprType::kMax, sc.topk = 6, sc.retain_blocks = 3;
    // Re-ranking by the best key, in a remapped sparse prefill (the GPU's chunk shortlists and
    // query sums) and in decode (the GPU's shortlists).
    if (variant == 14)
      sc.sparse_prefill = true, sc.prefill_chunk = 40, sc.pos_remap = true, sc.rescore_blocks = 8;
    // (Remapped scoring reads block-relative representatives: in a prompt that repeats itself
    // every 16 blocks, layer 0's repeated blocks tie exactly on one side and not the other.)
    // Host placement's retention masses read at the next step (NEEDLE_HYBRID_LATE=1), and the
    // GPU taking every block where each head misses at most 2 (NEEDLE_HYBRID_TAKE_REST=2).
    const bool late = variant == 15;
    if (late) sc.gpu_share = 50, sc.gpu_cache_blocks = 8;
    const auto& pr = sc.pos_remap ? aperiodic : prompt;
    const SeqRun want = RunSequence(*on_cpu, &sc, tc, pr, 40);
    if (late) setenv("NEEDLE_HYBRID_LATE", "1", 1), setenv("NEEDLE_HYBRID_TAKE_REST", "2", 1);
    const SeqRun got = RunSequence(*on_gpu, &sc, tc, pr, 40, pl);
    if (late) unsetenv("NEEDLE_HYBRID_LATE"), unsetenv("NEEDLE_HYBRID_TAKE_REST");
    const std::string what = GetParam() + " variant " + std::to_string(variant);
    ExpectSamePlans(got, want, what);
    if (GetParam() != "mistral_swa_f32") {
      EXPECT_NE(want.plan.find("\"dense\":false"), std::string::npos) << what;
    }
    ExpectLogitsClose(got, want, what);
    if (variant == 9 || variant == 12) {  // no reader of the plans: nothing comes back
      const SeqRun quiet = RunSequence(*on_gpu, &sc, tc, pr, 40, pl, false);
      EXPECT_EQ(quiet.logits, got.logits) << what;
    }
  }
}

// Host placement planned on the GPU (the default, hybrid_host_plan.cc): the same plans as host
// placement planned by the host (NEEDLE_HYBRID_DEVICE_PLAN=0), and its logits, per KV head with
// retention and per layer, on a bf16 cache with 64-token blocks (the TMA decode kernel, which masks
// the blocks the GPU does not hold). The first steps' blocks are all the CPU's (the GPU holds none
// yet), later ones mostly the GPU's (the fills). Both runs are the GPU's, from the same prefill
// (bit for bit): a CPU run's bf16 prefill already differs from the GPU's by 2x the f32 tolerance
// (1e-3 of the logits' range; 8e-3 relative on mistral_swa_f32's prompt row, H100). The two
// differ only in which side attends a Context block: the CPU's fold or the TMA kernel, each
// within 2^-8 max|v| of the exact attention (bf16 queries and probabilities: bf16dot.h's bound,
// and the kernel's, tests/test_cuda.cc), so within 2^-7 of each other; the logits are held to
// twice that, 1/64 of their range, for its growth through the fixtures' layers and steps.
TEST_P(HybridFixture, HostPlanOnGpuSameAsHostPlans) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(0);
  const std::string dir = test::FixturesDir() + "/" + GetParam();
  std::unique_ptr<Model> model = LoadModel(dir, *gpu);
  model->set_ubatch(64);
  const int64_t D = model->config().head_dim,
                G = model->config().num_heads / model->config().num_kv_heads;
  if ((D != 64 && D != 128) || G > 8) GTEST_SKIP() << "not a case of the TMA decode kernel";
  const std::vector<int32_t> prompt = Prompt(700, model->config().vocab_size);
  for (int variant = 0; variant < 2; ++variant) {
    SparseConfig sc;
    sc.block_size = 64, sc.init_tokens = 64, sc.local_window = 128, sc.topk = 3;
    sc.dense_layers = 0, sc.retain_blocks = 1;
    if (variant == 1) sc.select = SelectMode::kLayer, sc.retain_blocks = 0;
    setenv("NEEDLE_HYBRID_DEVICE_PLAN", "0", 1);
    const SeqRun want =
        RunSequence(*model, &sc, tc, prompt, 40, KVPlacement::kHost, true, DType::kBF16);
    setenv("NEEDLE_HYBRID_DEVICE_PLAN", "1", 1);
    const SeqRun got =
        RunSequence(*model, &sc, tc, prompt, 40, KVPlacement::kHost, true, DType::kBF16);
    // Without a plan sink (with one, the model's thread waits for each layer's plan), with the
    // model's thread queueing each step ahead of the host worker or one layer ahead of its flags,
    // and with the selection copied to the host (not written by cuda::Post): the same work, the
    // same numbers.
    const SeqRun queued =
        RunSequence(*model, &sc, tc, prompt, 40, KVPlacement::kHost, false, DType::kBF16);
    setenv("NEEDLE_HYBRID_AHEAD", "1", 1);
    const SeqRun ahead =
        RunSequence(*model, &sc, tc, prompt, 40, KVPlacement::kHost, false, DType::kBF16);
    unsetenv("NEEDLE_HYBRID_AHEAD");
    setenv("NEEDLE_HYBRID_LAG", "1", 1);  // (a layer ahead of the worker's flags)
    const SeqRun lagged =
        RunSequence(*model, &sc, tc, prompt, 40, KVPlacement::kHost, false, DType::kBF16);
    unsetenv("NEEDLE_HYBRID_LAG");
    setenv("NEEDLE_HYBRID_POST", "0", 1);  // (the selection through copies and an event)
    const SeqRun copied =
        RunSequence(*model, &sc, tc, prompt, 40, KVPlacement::kHost, false, DType::kBF16);
    unsetenv("NEEDLE_HYBRID_POST");
    unsetenv("NEEDLE_HYBRID_DEVICE_PLAN");
    const std::string what =
        GetParam() + " host plan on the GPU, variant " + std::to_string(variant);
    ExpectSamePlans(got, want, what);
    ASSERT_EQ(queued.logits, got.logits) << what << ", no plan sink";
    ASSERT_EQ(ahead.logits, got.logits) << what << ", queued ahead";
    ASSERT_EQ(lagged.logits, got.logits) << what << ", a layer ahead";
    ASSERT_EQ(copied.logits, got.logits) << what << ", the selection copied";
    // The handshake's timing (JoinHost's sums): with cuda::Post, at most one a sparse layer and
    // step, each crossing's mean no less than its least, the fastest round not negative (the
    // clocks' offset cancels; less 2 us for the GPU timer's updates, as coarse as 1 us on some
    // GPUs), the worker's part inside the span; without Post, none timed. (A fixture whose
    // layers the worker never attends, mistral_swa's windows, has no handshake to time.)
    const HybridStats& hs = got.stats;
    if (hs.cpu_blocks + hs.gpu_blocks > 0) {
      EXPECT_GT(hs.handshakes, 0) << what;
    }
    EXPECT_LE(hs.handshakes, 40 * model->config().num_layers) << what;
    if (hs.handshakes > 0) {
      EXPECT_GE(hs.to_host / hs.handshakes, hs.to_host_least) << what;
      EXPECT_GE(hs.to_gpu / hs.handshakes, hs.to_gpu_least) << what;
      EXPECT_GE(hs.to_host_least + hs.to_gpu_least, -2e-6) << what;
    }
    EXPECT_GE(hs.join_span, hs.join_host) << what;
    EXPECT_NEAR(hs.join_span - hs.join_host, hs.handshake, 1e-6) << what;
    EXPECT_GE(hs.join_idle, 0.0) << what;
    EXPECT_EQ(copied.stats.handshakes, 0) << what;
    ASSERT_EQ(got.logits.size(), want.logits.size()) << what;
    const size_t V = static_cast<size_t>(model->config().vocab_size);
    double scale = 0;
    for (float x : want.logits) scale = std::max(scale, std::fabs(static_cast<double>(x)));
    for (size_t i = 0; i < want.logits.size(); ++i) {
      if (i < V) {  // (the prompt's row: the same prefill)
        ASSERT_EQ(got.logits[i], want.logits[i]) << what << " at " << i;
        continue;
      }
      ASSERT_NEAR(got.logits[i], want.logits[i], scale / 64) << what << " at " << i;
    }
  }
}

TEST_P(HybridFixture, CoveringTopkEqualsGpuDense) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(0);
  const std::string dir = test::FixturesDir() + "/" + GetParam();
  auto model = LoadModel(dir, *gpu);
  model->set_ubatch(64);
  const std::vector<int32_t> prompt = Prompt(300, model->config().vocab_size);
  SparseConfig sc;
  sc.block_size = 16, sc.init_tokens = 16, sc.local_window = 32, sc.topk = 64, sc.dense_layers = 0,
  sc.retain_blocks = 0;
  const SeqRun dense = RunSequence(*model, nullptr, tc, prompt, 30);
  const SeqRun hybrid = RunSequence(*model, &sc, tc, prompt, 30);
  ExpectLogitsClose(hybrid, dense, GetParam());
  const SeqRun device = RunSequence(*model, &sc, tc, prompt, 30, KVPlacement::kDevice);
  ExpectLogitsClose(device, dense, GetParam() + " device");
}

INSTANTIATE_TEST_SUITE_P(All, HybridFixture,
                         ::testing::Values("llama_gqa4_hd64_f32", "qwen2_bias_gqa7_f32",
                                           "qwen3_qknorm_gqa4_f32", "mistral_swa_f32",
                                           "llama_llama3_hd128_f32"),
                         [](const auto& info) { return info.param; });
#endif

}  // namespace
}  // namespace needle
