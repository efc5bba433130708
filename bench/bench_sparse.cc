// One decode step of attention for one layer of a 7B-class model (32 query / 8 KV heads, and
// 28 / 4 like Qwen2.5-7B; head_dim 128) over a bf16 KV cache in DRAM of 32K to 1M tokens:
//   sparse  the whole SparseAttention step with the default budget (scoring every Context block
//           through Quest representatives, top-k per KV head, block attention over
//           Initial + 32 blocks + Local 4096)
//   scoring the scoring scan alone;  blocks  the block attention alone (the step's plan)
//   dense   dense CPU attention over the same cache
//   context_blocks[_idle|_woken|_team]  the hybrid engine's CPU side: topk random Context blocks
//           per KV head (fast::AttendBlocks), from DRAM; _idle: the threads asleep before each
//           call; _woken: asleep, then woken (ThreadingContext::Wake) 60 us before it, as in the
//           step; _team: woken without a sleep (Wake's team, its threads never idle);
//           NEEDLE_BENCH_HOT=1: the same blocks at every call (from the
//           caches: compute alone); NEEDLE_BENCH_TOPK=k: k blocks per KV head instead of the
//           default 32; counters: the fold's phases (fast::FoldTimes, us a call: setup_us,
//           start_us, last_us, run_us, busy_us) and items, chunks, threads a call
//   prefill_chunk_{dense,sparse}  one prompt chunk of 1024 queries at the end of the context:
//           dense (every earlier key) and --prefill sparse (Initial + the chunk's topk blocks +
//           Local + the chunk): the sparse one costs the same at every length; its flops
//           (q.k and p.v) against the f32 FMA peak measured in the same run (compute-bound: the
//           chunk's keys are read from the caches by many queries)
//   plan_shortlist  the planner's host work for one layer of the hybrid's decode step (host
//           placement): the selection from an executor's shortlist, retention, the plan's
//           bookkeeping (an executor that costs nothing stands in for the GPU and the CPU fold)
// For each: milliseconds, bytes touched (each byte the step must read once), achieved GB/s and
// the fraction of the DRAM read bandwidth measured in the same run. A summary table with the
// sparse-over-dense speedup closes the output.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "bench/bench_util.h"
#include "engine/cpu/ops.h"
#include "sparse_attn/scoring.h"
#include "sparse_attn/sparse_attention.h"

namespace needle::bench {
namespace {

struct Setup {
  int64_t ctx = 0, heads = 0, kv_heads = 0;
  ModelConfig cfg;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<KVCache> cache;
  std::unique_ptr<SparseAttention> sparse;
  std::vector<float> q, out;
  AttnArgs args;
};

std::unique_ptr<Setup> g_setup;

// The default budget; dense_layers = 0 because the benchmarked layer stands for a sparse one.
SparseConfig BenchSparseConfig() {
  SparseConfig c;
  c.dense_layers = 0;
  return c;
}

Setup& GetSetup(int64_t ctx, int64_t heads, int64_t kv_heads) {
  if (g_setup && g_setup->ctx == ctx && g_setup->heads == heads && g_setup->kv_heads == kv_heads)
    return *g_setup;
  g_setup.reset();  // free the previous cache first
  auto s = std::make_unique<Setup>();
  ThreadingContext& tc = BenchContext();
  const int64_t D = 128;
  s->ctx = ctx, s->heads = heads, s->kv_heads = kv_heads;
  s->cfg.num_layers = 1;
  s->cfg.num_heads = heads;
  s->cfg.num_kv_heads = kv_heads;
  s->cfg.head_dim = D;
  s->cfg.hidden_size = heads * D;
  s->cfg.sliding_window = {0};
  s->backend = MakeCpuBackend(tc, false);
  const SparseConfig sc = BenchSparseConfig();
  s->cache =
      std::make_unique<KVCache>(KVCacheShape{1, kv_heads, D, ctx + 1, sc.block_size, DType::kBF16});
  // Random keys/values, written in parallel chunks of whole blocks: their blocks assigned first,
  // one thread (assigning takes blocks from the pool: concurrent Writes that assign raced on it
  // and corrupted the heap on the 16-core host, 1 run in 3).
  s->cache->AssignBlocks(0, 0, ctx + 1);
  const int64_t chunk = 4096;
  tc.ParallelFor(static_cast<size_t>((ctx + 1 + chunk - 1) / chunk), 1, [&](size_t b, size_t e) {
    std::vector<float> k(chunk * kv_heads * D), v(chunk * kv_heads * D);
    for (size_t c = b; c < e; ++c) {
      const int64_t t0 = static_cast<int64_t>(c) * chunk, n = std::min(chunk, ctx + 1 - t0);
      uint64_t x = 0x9e3779b97f4a7c15ull * (c + 1);
      for (int64_t i = 0; i < n * kv_heads * D; ++i) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        k[i] = static_cast<float>(static_cast<int64_t>(x & 0xffff) - 32768) / 16384.0f;
        v[i] = static_cast<float>(static_cast<int64_t>((x >> 16) & 0xffff) - 32768) / 16384.0f;
      }
      s->cache->Write(0, t0, n, k.data(), v.data());
    }
  });
  s->cache->SetSize(ctx);
  s->sparse = std::make_unique<SparseAttention>(s->cfg, sc, *s->backend, tc, ctx + 1, DType::kBF16);
  s->sparse->IndexContext(0, *s->cache);
  s->cache->SetSize(ctx + 1);
  s->q.resize(heads * D);
  for (int64_t i = 0; i < heads * D; ++i) s->q[i] = std::sin(0.37f * static_cast<float>(i));
  s->out.resize(heads * D);
  s->args = AttnArgs{1, ctx, heads, kv_heads, D, 0, 1.0f / std::sqrt(static_cast<float>(D))};
  g_setup = std::move(s);
  return *g_setup;
}

struct Row {
  double sparse_ms = 0, dense_ms = 0, scoring_ms = 0, blocks_ms = 0;
  double sparse_bytes = 0, dense_bytes = 0, scoring_bytes = 0, blocks_bytes = 0;
  double ctx_ms = 0, ctx_idle_ms = 0, ctx_bytes = 0, ctx_idle_bytes = 0;  // ContextBlocks
  double ctx_woken_bytes = 0;
};
std::map<std::pair<int64_t, int64_t>, Row> g_rows;  // (ctx, heads)

void Report(benchmark::State& state, double bytes, double* ms_out, double* bytes_out) {
  const double peak = MeasuredReadBandwidth();
  state.counters["MB_touched"] = bytes / 1e6;
  state.counters["GB/s"] =
      benchmark::Counter(bytes * state.iterations() / 1e9, benchmark::Counter::kIsRate);
  state.counters["of_peak"] =
      benchmark::Counter(bytes * state.iterations() / peak, benchmark::Counter::kIsRate);
  *bytes_out = bytes;
  (void)ms_out;
}

int64_t ContextBlocks(const Setup& s) {
  const SparseConfig sc;
  return sc.LocalBegin(s.ctx) / sc.block_size - sc.init_end() / sc.block_size;
}

void BM_SparseStep(benchmark::State& state) {
  Setup& s = GetSetup(state.range(0), state.range(1), state.range(2));
  for (auto _ : state) {
    s.sparse->BeginStep(StepInfo{s.ctx, 1, 1, true});
    s.sparse->Attend(0, s.q.data(), s.args, *s.cache, s.out.data());
  }
  const LayerPlan& p = s.sparse->last_plan(0);
  double tokens = 0;
  for (int64_t h = 0; h < s.kv_heads; ++h) tokens += static_cast<double>(p.AttendedTokens(h));
  const double scoring =
      static_cast<double>(ContextBlocks(s) * s.kv_heads * 2 * 128 * 2);  // quest, bf16
  const double attn = tokens * 128 * 2 * 2;                              // K and V, bf16
  Row& r = g_rows[{s.ctx, s.heads}];
  Report(state, scoring + attn, nullptr, &r.sparse_bytes);
}

void BM_ScoringScan(benchmark::State& state) {
  Setup& s = GetSetup(state.range(0), state.range(1), state.range(2));
  const SparseConfig sc;
  std::vector<int32_t> ids;
  for (int64_t b = sc.init_end() / sc.block_size; b < sc.LocalBegin(s.ctx) / sc.block_size; ++b)
    ids.push_back(static_cast<int32_t>(b));
  std::vector<float> scores(s.kv_heads * ids.size());
  for (auto _ : state)
    fast::ScoreBlocks(s.sparse->representatives(), 0,
                      ScoreArgs{s.q.data(), 1, s.heads, s.kv_heads, 128, ids.data(),
                                static_cast<int64_t>(ids.size())},
                      scores.data(), BenchContext());
  Report(state, static_cast<double>(ids.size() * s.kv_heads * 2 * 128 * 2), nullptr,
         &g_rows[{s.ctx, s.heads}].scoring_bytes);
}

void BM_BlockAttention(benchmark::State& state) {
  Setup& s = GetSetup(state.range(0), state.range(1), state.range(2));
  s.sparse->BeginStep(StepInfo{s.ctx, 1, 1, true});
  s.sparse->Attend(0, s.q.data(), s.args, *s.cache, s.out.data());
  const LayerPlan plan = s.sparse->last_plan(0);
  AttnSpans spans;
  plan.ToSpans(s.kv_heads, &spans);
  for (auto _ : state)
    s.backend->Attention(s.q.data(), s.cache->Layer(0), s.args, &spans, s.out.data(), nullptr);
  double tokens = 0;
  for (int64_t h = 0; h < s.kv_heads; ++h) tokens += static_cast<double>(plan.AttendedTokens(h));
  Report(state, tokens * 128 * 2 * 2, nullptr, &g_rows[{s.ctx, s.heads}].blocks_bytes);
}

// The hybrid engine's CPU side (fast::AttendBlocks): topk Context blocks per KV head and nothing
// else, a different random set at each call (64 sets, cycled, so the selected blocks come from
// DRAM and not from the last call's cache lines). idle_us > 0: the threads sleep that long before
// each call (untimed), as they do while the GPU computes a layer; the time then includes waking
// them.
// woken: as the hybrid's decode step does it, the threads asleep idle_us, then woken
// (ThreadingContext::Wake) and the caller spinning kWokenWaitUs (the GPU's work between the wake
// and the plan) before the call; neither counted.
constexpr int kWokenWaitUs = 60;

void ContextBlocks(benchmark::State& state, int idle_us, bool woken = false) {
  Setup& s = GetSetup(state.range(0), state.range(1), state.range(2));
  SparseConfig sc;
  if (const char* e = std::getenv("NEEDLE_BENCH_TOPK")) sc.topk = std::max(1, std::atoi(e));
  const int64_t first = sc.init_end() / sc.block_size, nb = ContextBlocks(s);
  std::vector<std::vector<std::vector<int32_t>>> sets(std::getenv("NEEDLE_BENCH_HOT") ? 1 : 64);
  uint64_t x = 0x2545f4914f6cdd1dull;
  for (auto& set : sets) {
    set.assign(static_cast<size_t>(s.kv_heads), {});
    for (auto& hb : set) {
      while (static_cast<int64_t>(hb.size()) < std::min(sc.topk, nb)) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        const auto b = static_cast<int32_t>(first + static_cast<int64_t>(x % nb));
        if (std::find(hb.begin(), hb.end(), b) == hb.end()) hb.push_back(b);
      }
      std::sort(hb.begin(), hb.end());
    }
  }
  std::vector<float> lse(s.heads), stats;
  size_t i = 0;
  fast::FoldTimes ft;
  for (auto _ : state) {
    if (idle_us > 0) {
      state.PauseTiming();
      std::this_thread::sleep_for(std::chrono::microseconds(idle_us));
      if (woken) {
        BenchContext().Wake(400);
        const auto until =
            std::chrono::steady_clock::now() + std::chrono::microseconds(kWokenWaitUs);
        while (std::chrono::steady_clock::now() < until) {
        }
      }
      state.ResumeTiming();
    } else if (woken) {
      BenchContext().Wake(400);  // (_team: the spinners of the last call, not asleep)
    }
    fast::AttendBlocks(s.q.data(), s.cache->Layer(0), s.args, sets[i++ % sets.size()], s.out.data(),
                       lse.data(), &stats, BenchContext(), &ft);
    if (woken) BenchContext().Rest();  // (as the hybrid's worker: Wake's team back to sleep)
  }
  // The fold's phases, us a call (fast::FoldTimes): setup, the threads' start, until the last
  // item ended, the whole ParallelFor; the items' own times added over the threads; counts.
  if (ft.calls > 0) {
    const auto us = [&](double x) { return x / ft.calls * 1e6; };
    state.counters["setup_us"] = us(ft.setup);
    state.counters["start_us"] = us(ft.start);
    state.counters["last_us"] = us(ft.last);
    state.counters["run_us"] = us(ft.fold);
    state.counters["busy_us"] = us(ft.busy);
    state.counters["items"] = ft.items / ft.calls;
    state.counters["chunks"] = ft.chunks / ft.calls;
    state.counters["threads"] = ft.threads / ft.calls;
  }
  Row& r = g_rows[{s.ctx, s.heads}];
  Report(state,
         static_cast<double>(std::min(sc.topk, nb) * sc.block_size * s.kv_heads) * 128 * 2 * 2,
         nullptr,
         woken         ? &r.ctx_woken_bytes
         : idle_us > 0 ? &r.ctx_idle_bytes
                       : &r.ctx_bytes);
}
void BM_ContextBlocks(benchmark::State& state) { ContextBlocks(state, 0); }
void BM_ContextBlocksIdle(benchmark::State& state) { ContextBlocks(state, 300); }
void BM_ContextBlocksWoken(benchmark::State& state) { ContextBlocks(state, 300, true); }
void BM_ContextBlocksTeam(benchmark::State& state) { ContextBlocks(state, 0, true); }

// One chunk of a prompt (the last 1024 positions of the context), dense or sparse prefill.
void PrefillChunk(benchmark::State& state, bool sparse) {
  Setup& s = GetSetup(state.range(0), state.range(1), state.range(2));
  const int64_t chunk = 1024, D = 128;
  SparseConfig c = BenchSparseConfig();
  c.sparse_prefill = sparse;
  c.prefill_chunk = chunk;
  ThreadingContext& tc = BenchContext();
  // A planner of its own (the chunk's settings), indexed like the shared one.
  SparseAttention sp(s.cfg, c, *s.backend, tc, s.ctx + 1, DType::kBF16);
  s.cache->SetSize(s.ctx - chunk);
  sp.IndexContext(0, *s.cache);
  s.cache->SetSize(s.ctx);
  std::vector<float> q(static_cast<size_t>(chunk * s.heads * D)), out(q.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.37f * static_cast<float>(i % 4099));
  AttnArgs a = s.args;
  a.T = chunk;
  a.pos0 = s.ctx - chunk;
  for (auto _ : state) {
    sp.BeginStep(StepInfo{a.pos0, chunk, 2 * chunk, false, a.pos0 - chunk});
    sp.Attend(0, q.data(), a, *s.cache, out.data());
  }
  s.cache->SetSize(s.ctx + 1);
  // Keys per query on average (the chunk's own keys are causal: (chunk + 1) / 2 of them), and
  // the products' flops: 2 D for q.k and 2 D for p.v per query head and key.
  const double keys =
      (sparse ? static_cast<double>(c.init_end() + c.topk * c.block_size + c.local_window)
              : static_cast<double>(s.ctx - chunk)) +
      (chunk + 1) / 2.0;
  const double flops = 4.0 * D * static_cast<double>(s.heads) * chunk * keys;
  state.counters["keys_per_query"] = keys;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * state.iterations() / 1e9, benchmark::Counter::kIsRate);
  state.counters["of_fma_peak"] = benchmark::Counter(flops * state.iterations() / MeasuredFmaPeak(),
                                                     benchmark::Counter::kIsRate);
}
void BM_PrefillChunkDense(benchmark::State& state) { PrefillChunk(state, false); }
void BM_PrefillChunkSparse(benchmark::State& state) { PrefillChunk(state, true); }

void BM_DenseStep(benchmark::State& state) {
  Setup& s = GetSetup(state.range(0), state.range(1), state.range(2));
  for (auto _ : state)
    s.backend->Attention(s.q.data(), s.cache->Layer(0), s.args, nullptr, s.out.data(), nullptr);
  Report(state, static_cast<double>((s.ctx + 1) * s.kv_heads * 128 * 2 * 2), nullptr,
         &g_rows[{s.ctx, s.heads}].dense_bytes);
}

// An executor that ranks the candidates and attends elsewhere, at no cost to the host: each
// call of ScoreTop hands back the next of 64 shortlists made in advance (random distinct blocks,
// random scores), and Planned fills retention's masses with constants. What remains in a
// decode step's Attend is the planner's own host work for a layer of the hybrid's host
// placement: the selection from the shortlist, retention, the plan's bookkeeping.
class ShortlistExecutor final : public PlanExecutor {
 public:
  ShortlistExecutor(int64_t first, int64_t n, int64_t rows, int64_t want) {
    uint64_t x = 0x2545f4914f6cdd1dull;
    auto next = [&] { return x ^= x << 13, x ^= x >> 7, x ^= x << 17; };
    lists_.resize(64);
    for (auto& l : lists_) {
      l.resize(static_cast<size_t>(rows));
      for (auto& row : l) {
        std::vector<int32_t> picked;
        while (static_cast<int64_t>(picked.size()) < std::min(want, n)) {
          const auto b = static_cast<int32_t>(first + static_cast<int64_t>(next() % n));
          if (std::find(picked.begin(), picked.end(), b) != picked.end()) continue;
          picked.push_back(b);
          row.push_back({static_cast<float>(next() % 1000) / 100.f, b});
        }
      }
    }
  }
  void Dense(int64_t, const float*, const AttnArgs&, const KVLayerView&, float*, float*) override {}
  bool Planned(int64_t, const float*, const AttnArgs& a, const KVLayerView&, const LayerPlan& plan,
               float*, float* lse, std::vector<std::vector<float>>* mass) override {
    std::fill(lse, lse + a.heads, 1.f);
    if (mass == nullptr) return false;
    mass->resize(plan.blocks.size());
    for (size_t h = 0; h < plan.blocks.size(); ++h) {
      (*mass)[h].resize(plan.blocks[h].size());
      for (size_t i = 0; i < plan.blocks[h].size(); ++i)
        (*mass)[h][i] = 1.f / static_cast<float>(1 + (i * 7 + h) % 13);
    }
    return true;
  }
  bool ScoreTop(int64_t, const RepresentativeStore&, const ScoreArgs&, bool, int64_t,
                std::vector<std::vector<Scored>>* top) override {
    *top = lists_[at_++ % lists_.size()];
    return true;
  }

 private:
  std::vector<std::vector<std::vector<Scored>>> lists_;
  size_t at_ = 0;
};

// The planner's host work per layer of a hybrid decode step (ShortlistExecutor): the default
// settings (topk 32 + 8 retained, a shortlist of 40 per KV head).
void BM_PlanShortlist(benchmark::State& state) {
  Setup& s = GetSetup(state.range(0), state.range(1), state.range(2));
  const SparseConfig sc = BenchSparseConfig();
  const int64_t first = sc.init_end() / sc.block_size;
  ShortlistExecutor exec(first, ContextBlocks(s), sc.select == SelectMode::kLayer ? 1 : s.kv_heads,
                         sc.topk + sc.retained());
  s.sparse->set_executor(&exec);
  for (auto _ : state) {
    s.sparse->BeginStep(StepInfo{s.ctx, 1, 1, true});
    s.sparse->Attend(0, s.q.data(), s.args, *s.cache, s.out.data());
  }
  s.sparse->set_executor(nullptr);
  state.counters["us_per_layer"] =
      benchmark::Counter(1e-6 * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// Order matters: all four benchmarks of one (context, heads) run back to back on one cache.
void RegisterAll() {
  for (int64_t ctx : {32768, 131072, 524288, 1048576})
    for (auto [h, kvh] : {std::pair<int64_t, int64_t>{32, 8}, {28, 4}}) {
      for (auto [name, fn] :
           {std::pair<const char*, void (*)(benchmark::State&)>{"sparse_step", BM_SparseStep},
            {"scoring_scan", BM_ScoringScan},
            {"block_attention", BM_BlockAttention},
            {"context_blocks", BM_ContextBlocks},
            {"context_blocks_idle", BM_ContextBlocksIdle},
            {"context_blocks_woken", BM_ContextBlocksWoken},
            {"context_blocks_team", BM_ContextBlocksTeam},
            {"prefill_chunk_dense", BM_PrefillChunkDense},
            {"prefill_chunk_sparse", BM_PrefillChunkSparse},
            {"dense_step", BM_DenseStep},
            {"plan_shortlist", BM_PlanShortlist}})
        benchmark::RegisterBenchmark(name, fn)
            ->Args({ctx, h, kvh})
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
    }
}

// Collects times for the summary table.
class Collector : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      const std::string n = r.benchmark_name();
      int64_t ctx = 0, heads = 0;
      std::sscanf(n.substr(n.find('/') + 1).c_str(), "%ld/%ld", &ctx, &heads);
      Row& row = g_rows[{ctx, heads}];
      const double ms = r.GetAdjustedRealTime();
      if (n.rfind("sparse_step", 0) == 0) row.sparse_ms = ms;
      if (n.rfind("dense_step", 0) == 0) row.dense_ms = ms;
      if (n.rfind("scoring_scan", 0) == 0) row.scoring_ms = ms;
      if (n.rfind("block_attention", 0) == 0) row.blocks_ms = ms;
      if (n.rfind("context_blocks/", 0) == 0) row.ctx_ms = ms;
      if (n.rfind("context_blocks_idle/", 0) == 0) row.ctx_idle_ms = ms;
    }
  }
};

}  // namespace
}  // namespace needle::bench

int main(int argc, char** argv) {
  using namespace needle::bench;
  benchmark::Initialize(&argc, argv);
  RegisterAll();
  Collector rep;
  benchmark::RunSpecifiedBenchmarks(&rep);
  const double peak = MeasuredReadBandwidth();
  std::printf("\nsummary (threads %d, measured DRAM read %.1f GB/s)\n", BenchContext().threads(),
              peak / 1e9);
  std::printf("%8s %6s | %9s %7s | %9s %7s | %9s %7s | %9s %7s | %8s | %8s %6s %8s %6s\n",
              "context", "heads", "sparse ms", "GB/s", "score ms", "of_pk", "blocks ms", "of_pk",
              "dense ms", "of_pk", "speedup", "ctx ms", "of_pk", "idle ms", "of_pk");
  for (auto& [key, r] : g_rows) {
    if (r.sparse_ms == 0 || r.dense_ms == 0) continue;
    auto gbs = [](double bytes, double ms) { return bytes / (ms * 1e-3) / 1e9; };
    std::printf(
        "%8ld %3ld/%-2ld | %9.3f %7.1f | %9.3f %7.2f | %9.3f %7.2f | %9.2f %7.2f | %7.1fx | "
        "%8.3f %6.2f %8.3f %6.2f\n",
        key.first, key.second, key.second == 32 ? 8L : 4L, r.sparse_ms,
        gbs(r.sparse_bytes, r.sparse_ms), r.scoring_ms,
        gbs(r.scoring_bytes, r.scoring_ms) * 1e9 / peak, r.blocks_ms,
        gbs(r.blocks_bytes, r.blocks_ms) * 1e9 / peak, r.dense_ms,
        gbs(r.dense_bytes, r.dense_ms) * 1e9 / peak, r.dense_ms / r.sparse_ms, r.ctx_ms,
        gbs(r.ctx_bytes, r.ctx_ms) * 1e9 / peak, r.ctx_idle_ms,
        gbs(r.ctx_idle_bytes, r.ctx_idle_ms) * 1e9 / peak);
  }
  return 0;
}
