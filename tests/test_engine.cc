// The Engine (engine/runtime/engine.h): sequences submitted to one block pool and stepped
// together give each the greedy tokens it gives alone, whether the batch or the pool's blocks
// limit how many run at once, with prompt prefixes shared or not; cancelled sequences give their
// blocks back and stop; what cannot run is refused with the numbers.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/model/model.h"
#include "engine/runtime/engine.h"
#include "sparse_attn/sparse_attention.h"
#include "tests/fixture_util.h"
#include "tests/gpu_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

struct Fixture {
  ThreadingContext tc{2};
  std::unique_ptr<Backend> cpu = MakeCpuBackend(tc, false);
  std::unique_ptr<Model> model = LoadModel(test::FixturesDir() + "/llama_gqa4_hd64_f32", *cpu);
};

// Prompts: 0 and 1 share their first 37 tokens, 2 and 3 are their own; different answer lengths.
std::vector<std::vector<int32_t>> Prompts(int64_t V) {
  std::vector<std::vector<int32_t>> p(4);
  for (int64_t i = 0; i < 45; ++i) p[0].push_back(static_cast<int32_t>((i * 31 + 3) % V));
  p[1].assign(p[0].begin(), p[0].begin() + 37);
  for (int64_t i = 0; i < 9; ++i) p[1].push_back(static_cast<int32_t>((i * 7 + 11) % V));
  for (int64_t i = 0; i < 20; ++i) p[2].push_back(static_cast<int32_t>((i * 13 + 5) % V));
  for (int64_t i = 0; i < 3; ++i) p[3].push_back(static_cast<int32_t>((i * 17 + 1) % V));
  return p;
}
const std::vector<int64_t> kMaxNew = {6, 9, 4, 7};
constexpr int64_t kCtx = 64;

// Each prompt alone, greedy, stopping at the model's end-of-sequence tokens as the Engine does.
std::vector<std::vector<int32_t>> Alone(Model& model) {
  std::vector<std::vector<int32_t>> out;
  const auto& eos = model.config().eos_token_ids;
  const auto prompts = Prompts(model.config().vocab_size);
  for (size_t i = 0; i < prompts.size(); ++i) {
    KVCache cache(model.CacheShape(kCtx, DType::kF32, 16));
    std::vector<int32_t> toks;
    int32_t t =
        model.ForwardGreedy(prompts[i].data(), static_cast<int64_t>(prompts[i].size()), cache);
    for (;;) {
      toks.push_back(t);
      if (std::find(eos.begin(), eos.end(), t) != eos.end() ||
          static_cast<int64_t>(toks.size()) == kMaxNew[i])
        break;
      t = model.ForwardGreedy(&t, 1, cache);
    }
    out.push_back(toks);
  }
  return out;
}

struct Outcome {
  std::vector<std::vector<int32_t>> tokens;
  int64_t most_running = 0, reused = 0, preempted = 0;
  int64_t interleaved = 0;  // steps where a sequence decoded while another's prompt was not done
};

Outcome RunAll(Model& model, const EngineOptions& o, int64_t cancel_after = -1) {
  Engine e(model, o);
  const auto prompts = Prompts(model.config().vocab_size);
  Outcome r;
  r.tokens.resize(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    SequenceRequest q;
    q.prompt = prompts[i];
    q.max_new = kMaxNew[i];
    EXPECT_EQ(e.Submit(std::move(q)), static_cast<int64_t>(i));
  }
  std::map<int64_t, bool> finished;
  for (int step = 0; !e.Idle(); ++step) {
    if (step == cancel_after) e.Cancel(1);
    const std::vector<TokenEvent> events = e.Step();
    bool decoded = false;  // (a token of a sequence past its first)
    for (const TokenEvent& ev : events) decoded |= !r.tokens[ev.seq].empty();
    r.interleaved += decoded && e.Prefilling() > 0 ? 1 : 0;
    for (const TokenEvent& ev : events) {
      EXPECT_FALSE(finished[ev.seq]) << "a token after the last, sequence " << ev.seq;
      r.tokens[ev.seq].push_back(ev.token);
      finished[ev.seq] = ev.finished;
      if (ev.finished) {
        EXPECT_EQ(e.Stats(ev.seq).new_tokens, static_cast<int64_t>(r.tokens[ev.seq].size()));
      }
    }
    r.most_running = std::max(r.most_running, e.Running());
    EXPECT_LE(e.Running(), o.max_batch);
    EXPECT_LT(step, 200);
  }
  r.reused = e.reused_tokens();
  r.preempted = e.preemptions();
  EXPECT_EQ(e.resumptions(), e.preemptions());
  EXPECT_EQ(e.free_blocks() * o.block_size, e.pool_tokens());  // every block back
  return r;
}

TEST(Engine, BatchedSequencesGiveTheirTokensAlone) {
  Fixture f;
  const auto want = Alone(*f.model);
  EngineOptions o;
  o.block_size = 16, o.max_context = kCtx, o.max_batch = 3;
  const Outcome all = RunAll(*f.model, o);
  EXPECT_EQ(all.tokens, want);
  EXPECT_EQ(all.most_running, 3);
  EXPECT_EQ(all.reused, 32);  // prompt 1 took prompt 0's two whole blocks of their 37 tokens
  // Without sharing: the same tokens, nothing reused.
  o.prefix_reuse = false;
  const Outcome own = RunAll(*f.model, o);
  EXPECT_EQ(own.tokens, want);
  EXPECT_EQ(own.reused, 0);
  // A pool of 5 blocks (80 tokens of 8 KB each): as many sequences at a time as their blocks
  // allow, the youngest preempted when the others grow; the same tokens.
  o.prefix_reuse = true, o.max_batch = 4;
  o.kv_memory = f.model->CacheShape(80, DType::kF32, 16).TotalBytes();
  const Outcome tight = RunAll(*f.model, o);
  EXPECT_EQ(tight.tokens, want);
  EXPECT_LE(tight.most_running, 3);
  EXPECT_EQ(all.interleaved, 0);  // whole prompts: a prompt is done in the step it joins
  // Prompts 16 tokens a step: the others decode while a long prompt is still coming in; the
  // same tokens, prefix sharing included.
  o.kv_memory = 0, o.max_batch = 4, o.prompt_chunk = 16;
  const Outcome chunked = RunAll(*f.model, o);
  EXPECT_EQ(chunked.tokens, want);
  EXPECT_GT(chunked.interleaved, 0);
  EXPECT_EQ(chunked.reused, 16);  // (prompt 0's first chunk was in when prompt 1 began)
}

// Sparse sequences share prompt prefixes too, each as much as leaves it attending as alone
// (SparseConfig::ShareablePrefix), with the representatives of the shared blocks: their tokens
// equal each prompt's alone with a planner of its own, from running sequences (a batch of 3) and
// from kept prompts (one at a time), with a dense prefill, a sparse one (whole micro-batches of
// 32, never from a dense prefill's KV) and preselection (its own observation window).
TEST(Engine, SparseSequencesSharePrefixesAndAnswerAsAlone) {
  Fixture f;
  Model& m = *f.model;
  m.set_ubatch(32);
  const int64_t V = m.config().vocab_size, ctx = 160, max_new = 10;
  std::vector<std::vector<int32_t>> p(3);
  for (int64_t i = 0; i < 100; ++i) p[0].push_back(static_cast<int32_t>((i * 37 + 7) % V));
  p[1].assign(p[0].begin(), p[0].begin() + 80);
  for (int64_t i = 0; i < 20; ++i) p[1].push_back(static_cast<int32_t>((i * 11 + 2) % V));
  p[2].assign(p[0].begin(), p[0].begin() + 88);
  for (int64_t i = 0; i < 12; ++i) p[2].push_back(static_cast<int32_t>((i * 5 + 9) % V));
  SparseConfig c;
  c.block_size = 8, c.init_tokens = 8, c.local_window = 16, c.topk = 2, c.dense_layers = 0;
  const auto planner = [&](const SparseConfig& sc) {
    return std::make_unique<SparseAttention>(m.config(), sc, m.backend(), f.tc, ctx, DType::kF32);
  };
  struct Case {
    const char* what;
    SparseConfig cfg;
    int64_t batch_reused, kept_reused;  // tokens taken: from running sequences, from kept ones
  };
  std::vector<Case> cases = {{"dense prefill", c, 80 + 88, 80 + 88}};
  c.sparse_prefill = true, c.prefill_chunk = 16;
  cases.push_back({"sparse prefill", c, 64 + 64, 64 + 64});
  c.sparse_prefill = false, c.preselect_blocks = 4, c.obs_window = 16, c.repr = ReprType::kMax;
  cases.push_back({"preselection", c, 80 + 80, 80 + 80});
  for (const Case& k : cases) {
    std::vector<std::vector<int32_t>> want;
    for (const auto& prompt : p) {
      auto sp = planner(k.cfg);
      m.set_attention(sp.get());
      KVCache cache(m.CacheShape(ctx, DType::kF32, k.cfg.block_size));
      std::vector<int32_t> toks = {
          m.ForwardGreedy(prompt.data(), static_cast<int64_t>(prompt.size()), cache)};
      while (static_cast<int64_t>(toks.size()) < max_new)
        toks.push_back(m.ForwardGreedy(&toks.back(), 1, cache));
      m.set_attention(nullptr);
      want.push_back(toks);
    }
    for (int64_t batch : {3, 1}) {
      EngineOptions o;
      o.block_size = k.cfg.block_size, o.max_context = ctx, o.max_batch = batch;
      o.prefix_cache = batch == 1 ? 4 : 0;
      Engine e(m, o);
      // (A dense sequence of the same prompt first: its KV is a dense prefill's.)
      SequenceRequest d;
      d.prompt = p[0], d.max_new = 3, d.ignore_eos = true;
      e.Submit(std::move(d));
      for (const auto& prompt : p) {
        SequenceRequest r;
        r.prompt = prompt, r.max_new = max_new, r.ignore_eos = true, r.policy = planner(k.cfg);
        e.Submit(std::move(r));
      }
      std::vector<std::vector<int32_t>> got(p.size() + 1);
      int64_t adopted = 0;  // representatives taken with shared blocks (not computed again)
      while (!e.Idle())
        for (const TokenEvent& ev : e.Step()) {
          got[ev.seq].push_back(ev.token);
          if (ev.finished && ev.seq > 0) adopted += e.Policy(ev.seq)->adopted_blocks();
        }
      // (Sequences 2 and 3 take prompt 1's representatives of the blocks they share that its
      // planner computed, from the running planner or the kept prompt.)
      EXPECT_GT(adopted, 0) << k.what << ", batch " << batch;
      got.erase(got.begin());
      EXPECT_EQ(got, want) << k.what << ", batch " << batch;
      // The dense sequence's prompt serves the dense prefills' first sparse sequence whole (99
      // tokens: 96 in blocks, or its last 16 queries left: 80); the sparse prefill's shares only
      // among sparse prefills.
      const int64_t first = k.cfg.sparse_prefill ? 0 : (k.cfg.preselect_blocks > 0 ? 80 : 96);
      EXPECT_EQ(e.reused_tokens(), first + (batch == 1 ? k.kept_reused : k.batch_reused))
          << k.what << ", batch " << batch;
    }
  }
}

// When the pool runs out, the youngest running sequence is swapped out to host memory and
// resumes, oldest first, once blocks are free: every sequence, dense or sparse, still gives the
// tokens it gives alone, across pools from one sequence's blocks up.
TEST(Engine, PreemptedSequencesResumeAndAnswerAsAlone) {
  Fixture f;
  const auto want = Alone(*f.model);
  EngineOptions o;
  o.block_size = 16, o.max_context = kCtx, o.max_batch = 4;
  int64_t preempted = 0;
  for (const int64_t blocks : {4, 5, 6, 7, 8}) {
    for (const bool reuse : {true, false}) {
      o.prefix_reuse = reuse;
      o.kv_memory = f.model->CacheShape(blocks * 16, DType::kF32, 16).TotalBytes();
      const Outcome r = RunAll(*f.model, o);
      EXPECT_EQ(r.tokens, want) << blocks << " blocks, reuse " << reuse;
      preempted += r.preempted;
      o.prompt_chunk = o.prompt_chunk == 0 ? 16 : 0;  // (chunked prompts every other run)
    }
  }
  EXPECT_GT(preempted, 0);
  // Sparse sequences: their planners' state stays with them while their blocks are out.
  Model& m = *f.model;
  const int64_t V = m.config().vocab_size, ctx = 80, max_new = 50;
  SparseConfig c;
  c.block_size = 8, c.init_tokens = 8, c.local_window = 16, c.topk = 2, c.dense_layers = 0;
  std::vector<std::vector<int32_t>> p(3), alone;
  for (size_t s = 0; s < p.size(); ++s) {
    for (int64_t i = 0; i < 20; ++i)
      p[s].push_back(static_cast<int32_t>((i * 37 + 7 + 101 * static_cast<int64_t>(s)) % V));
    auto sp = std::make_unique<SparseAttention>(m.config(), c, m.backend(), f.tc, ctx, DType::kF32);
    m.set_attention(sp.get());
    KVCache cache(m.CacheShape(ctx, DType::kF32, c.block_size));
    std::vector<int32_t> toks = {m.ForwardGreedy(p[s].data(), 20, cache)};
    while (static_cast<int64_t>(toks.size()) < max_new)
      toks.push_back(m.ForwardGreedy(&toks.back(), 1, cache));
    m.set_attention(nullptr);
    alone.push_back(toks);
  }
  EngineOptions so;
  so.block_size = c.block_size, so.max_context = ctx, so.max_batch = 3;
  so.kv_memory = m.CacheShape(ctx, DType::kF32, c.block_size).TotalBytes();  // 10 blocks
  Engine e(m, so);
  for (const auto& prompt : p) {
    SequenceRequest r;
    r.prompt = prompt, r.max_new = max_new, r.ignore_eos = true;
    r.policy =
        std::make_unique<SparseAttention>(m.config(), c, m.backend(), f.tc, ctx, DType::kF32);
    e.Submit(std::move(r));
  }
  std::vector<std::vector<int32_t>> got(p.size());
  int64_t most = 0;
  while (!e.Idle()) {
    for (const TokenEvent& ev : e.Step()) got[ev.seq].push_back(ev.token);
    most = std::max(most, e.Running());
  }
  EXPECT_EQ(got, alone);
  EXPECT_EQ(most, 3);  // (all three began together: 3 blocks each)
  EXPECT_GT(e.preemptions(), 0);
  EXPECT_EQ(e.resumptions(), e.preemptions());
  EXPECT_EQ(e.free_blocks(), 10);
}

// On the GPU, blocks swapped out of GPU memory into host memory and back: the tokens of a pool
// with room for every sequence, whatever the pool (bf16 KV, the Engine's batch kernels).
TEST(Engine, GpuPreemptedSequencesAnswerAsWithRoom) {
  NEEDLE_REQUIRE_GPU(gpu);
#ifdef NEEDLE_HAVE_CUDA
  for (const std::string& dir : {test::FixturesDir() + "/qwen2_bias_gqa7_bf16",
                                 test::FixturesDir() + "/../../../models/needle-tiny"}) {
    auto model = LoadModel(dir, *gpu);
    EngineOptions o;
    o.block_size = 16, o.max_context = kCtx, o.max_batch = 4, o.kv_type = DType::kBF16;
    const Outcome wide = RunAll(*model, o);
    EXPECT_EQ(wide.preempted, 0) << dir;
    int64_t preempted = 0;
    for (const int64_t blocks : {4, 5, 6}) {
      o.kv_memory = model->CacheShape(blocks * 16, DType::kBF16, 16).TotalBytes();
      const Outcome tight = RunAll(*model, o);
      EXPECT_EQ(tight.tokens, wide.tokens) << dir << ", " << blocks << " blocks";
      preempted += tight.preempted;
    }
    EXPECT_GT(preempted, 0) << dir;
  }
#endif
}

// A sampled sequence draws the same tokens beside greedy ones as alone (its own generator, its
// row's logits), and another seed draws others.
TEST(Engine, SampledSequencesDrawTheirOwnTokens) {
  Fixture f;
  const auto prompts = Prompts(f.model->config().vocab_size);
  const auto run = [&](int64_t batch, uint64_t seed) {
    EngineOptions o;
    o.block_size = 16, o.max_context = kCtx, o.max_batch = batch;
    Engine e(*f.model, o);
    for (size_t i = 0; i < 3; ++i) {
      SequenceRequest r;
      r.prompt = prompts[i];
      r.max_new = 12;
      r.ignore_eos = true;
      if (i == 1) r.sampling.temperature = 1.5f, r.sampling.seed = seed;
      e.Submit(std::move(r));
    }
    std::vector<std::vector<int32_t>> toks(3);
    while (!e.Idle())
      for (const TokenEvent& ev : e.Step()) toks[ev.seq].push_back(ev.token);
    return toks;
  };
  const auto alone = run(1, 7), batched = run(3, 7), other = run(3, 8);
  EXPECT_EQ(batched, alone);
  EXPECT_EQ(batched[1].size(), 12u);
  EXPECT_NE(other[1], batched[1]);
  EXPECT_EQ(other[0], batched[0]);
}

// Logprobs: a sequence's prompt tokens (after the first) and its generated tokens are scored by
// log_softmax of the logits before them, with the k most likely listed: the values of the whole
// prompt's logits computed alone (exact for the prompt, whatever prompt_logprob_rows cuts it
// into; the decode rows of a batch within float rounding of the batched products), beside
// sequences that ask for none; its answer is unchanged by asking.
TEST(Engine, LogprobsAreThoseOfTheLogitsAlone) {
  Fixture f;
  const int64_t V = f.model->config().vocab_size;
  const auto prompts = Prompts(V);
  const auto want = Alone(*f.model);
  // Alone: the logits of every prompt position and of each generated token.
  std::vector<float> all;
  KVCache cache(f.model->CacheShape(kCtx, DType::kF32, 16));
  const std::vector<int32_t>& p = prompts[0];
  const int64_t P = static_cast<int64_t>(p.size());
  f.model->Forward(p.data(), P, cache, true, &all);
  for (size_t i = 0; i + 1 < want[0].size(); ++i) {
    std::vector<float> l;
    f.model->Forward(&want[0][i], 1, cache, false, &l);
    all.insert(all.end(), l.begin(), l.end());
  }
  for (int64_t rows : {256, 7}) {
    EngineOptions o;
    o.block_size = 16, o.max_context = kCtx, o.max_batch = 3, o.prompt_logprob_rows = rows;
    Engine e(*f.model, o);
    for (size_t i = 0; i < 3; ++i) {
      SequenceRequest r;
      r.prompt = prompts[i];
      r.max_new = kMaxNew[i];
      if (i == 0) r.logprobs = 3, r.prompt_logprobs = true;
      if (i == 2) r.logprobs = 0;
      e.Submit(std::move(r));
    }
    std::vector<std::vector<int32_t>> toks(3);
    std::vector<TokenLogprob> gen;
    std::vector<TokenLogprob> prompt_lp;
    while (!e.Idle())
      for (const TokenEvent& ev : e.Step()) {
        toks[ev.seq].push_back(ev.token);
        EXPECT_EQ(ev.logprob.size(), ev.seq == 1 ? 0u : 1u);
        if (ev.seq == 0) {
          if (gen.empty()) prompt_lp = e.PromptLogprobs(0);
          gen.push_back(ev.logprob.at(0));
        }
        if (ev.seq == 2) {
          EXPECT_TRUE(ev.logprob.at(0).top.empty());
        }
      }
    for (size_t i = 0; i < 3; ++i) EXPECT_EQ(toks[i], want[i]) << i;
    ASSERT_EQ(prompt_lp.size(), static_cast<size_t>(P - 1));
    for (int64_t j = 0; j + 1 < P; ++j) {
      const TokenLogprob w = ScoreToken(all.data() + j * V, V, p[j + 1], 3);
      EXPECT_EQ(prompt_lp[j].token, p[j + 1]);
      EXPECT_EQ(prompt_lp[j].logprob, w.logprob) << j;
      EXPECT_EQ(prompt_lp[j].top, w.top) << j;
    }
    ASSERT_EQ(gen.size(), want[0].size());
    for (size_t i = 0; i < gen.size(); ++i) {
      const TokenLogprob w = ScoreToken(all.data() + (P - 1 + i) * V, V, want[0][i], 3);
      EXPECT_EQ(gen[i].token, want[0][i]);
      EXPECT_NEAR(gen[i].logprob, w.logprob, 1e-4) << i;
      ASSERT_EQ(gen[i].top.size(), 3u);
      EXPECT_EQ(gen[i].top[0].first, want[0][i]) << i;  // greedy: the most likely
      EXPECT_EQ(gen[i].top[0].second, gen[i].logprob) << i;
      for (size_t k = 0; k < 3; ++k) {
        EXPECT_NEAR(gen[i].top[k].second, w.top[k].second, 1e-4);
      }
    }
  }
  // The values themselves: log_softmax, its top k descending.
  const std::vector<float> l = {1.f, 3.f, 3.f, -2.f};
  const TokenLogprob t = ScoreToken(l.data(), 4, 3, 2);
  const double lse = std::log(std::exp(1.0) + 2 * std::exp(3.0) + std::exp(-2.0));
  EXPECT_NEAR(t.logprob, -2 - lse, 1e-6);
  ASSERT_EQ(t.top.size(), 2u);
  EXPECT_EQ(t.top[0].first, 1);  // (a tie: the lower id first)
  EXPECT_EQ(t.top[1].first, 2);
  EXPECT_NEAR(t.top[0].second, 3 - lse, 1e-6);
  EXPECT_THROW(ScoreToken(l.data(), 4, 4, 1), Error);
}

// The prefix cache: a finished sequence's prompt blocks stay for a later prompt that begins alike
// (it prefills only the rest, with the tokens it gives alone), until admission needs the blocks:
// then the least recently used prompts go, and nothing waits or fails for them.
TEST(Engine, FinishedPromptsServeLaterOnesUntilTheirBlocksAreNeeded) {
  Fixture f;
  const auto want = Alone(*f.model);
  const auto prompts = Prompts(f.model->config().vocab_size);
  EngineOptions o;
  o.block_size = 16, o.max_context = kCtx, o.max_batch = 1, o.prefix_cache = 4;
  // A pool of exactly one sequence of the context (4 blocks).
  o.kv_memory = f.model->CacheShape(kCtx, DType::kF32, 16).TotalBytes();
  Engine e(*f.model, o);
  const auto run = [&](size_t i) {
    SequenceRequest r;
    r.prompt = prompts[i];
    r.max_new = kMaxNew[i];
    const int64_t id = e.Submit(std::move(r));
    std::vector<int32_t> toks;
    while (!e.Idle())
      for (const TokenEvent& ev : e.Step())
        if (ev.seq == id) toks.push_back(ev.token);
    EXPECT_EQ(toks, want[i]) << i;
  };
  run(0);  // 45 tokens: its first 2 blocks kept when it finishes (at the next step)
  EXPECT_EQ(e.reused_tokens(), 0);
  run(1);  // begins with prompt 0's first 37 tokens: 32 of them from the cache
  EXPECT_EQ(e.reused_tokens(), 32);
  EXPECT_GE(e.cached_prefixes(), 1);
  run(2);  // 2 blocks: they fit beside the 2 kept; its own first block is kept too
  EXPECT_EQ(e.reused_tokens(), 32);
  e.Step();
  EXPECT_EQ(e.cached_blocks(), 3);
  EXPECT_EQ(e.free_blocks() + e.cached_blocks(), 4);
  // A sequence of the whole context (4 blocks): every kept prompt is evicted for it, and it runs.
  SequenceRequest r;
  r.prompt = {5, 6, 7};
  r.max_new = kCtx - 3;
  r.ignore_eos = true;
  e.Submit(std::move(r));
  int64_t n = 0;
  while (!e.Idle()) n += static_cast<int64_t>(e.Step().size());
  EXPECT_EQ(n, kCtx - 3);
  EXPECT_EQ(e.cached_blocks(), 0);
  EXPECT_EQ(e.free_blocks(), 4);
}

TEST(Engine, CancelledSequencesStopAndGiveTheirBlocksBack) {
  Fixture f;
  const auto want = Alone(*f.model);
  EngineOptions o;
  o.block_size = 16, o.max_context = kCtx, o.max_batch = 4;
  const Outcome r = RunAll(*f.model, o, 3);  // sequence 1 cancelled before the fourth step
  for (size_t i : {0u, 2u, 3u}) EXPECT_EQ(r.tokens[i], want[i]) << i;
  EXPECT_LT(r.tokens[1].size(), want[1].size());
  EXPECT_EQ(r.tokens[1],
            std::vector<int32_t>(want[1].begin(),
                                 want[1].begin() + static_cast<long>(r.tokens[1].size())));
  // A waiting sequence cancelled never runs; the pool is whole again once all have left.
  Engine e(*f.model, o);
  SequenceRequest a, b;
  a.prompt = {1, 2, 3}, a.max_new = 2;
  b.prompt = {4, 5, 6}, b.max_new = 2;
  e.Submit(std::move(a));
  const int64_t id = e.Submit(std::move(b));
  e.Cancel(id);
  EXPECT_EQ(e.Waiting(), 1);
  int64_t events = 0;
  while (!e.Idle())
    for (const TokenEvent& ev : e.Step()) {
      EXPECT_NE(ev.seq, id);
      ++events;
    }
  EXPECT_EQ(events, 2);
  EXPECT_THROW(e.Stats(id), Error);
}

TEST(Engine, RefusesWhatCannotRun) {
  Fixture f;
  EngineOptions o;
  o.block_size = 16, o.max_context = kCtx, o.max_batch = 2;
  Engine e(*f.model, o);
  const auto refused = [&](std::vector<int32_t> prompt, int64_t max_new, const std::string& want) {
    SequenceRequest r;
    r.prompt = std::move(prompt);
    r.max_new = max_new;
    try {
      e.Submit(std::move(r));
      ADD_FAILURE() << "accepted: " << want;
    } catch (const Error& err) {
      EXPECT_NE(std::string(err.what()).find(want), std::string::npos) << err.what();
    }
  };
  refused({}, 4, "empty prompt");
  refused({1, 2}, 0, "max_new 0");
  refused(std::vector<int32_t>(60, 1), 10, "exceed the context of 64 tokens");
  EXPECT_TRUE(e.Idle());
  // A budget below one sequence of the context: refused when the engine is made, with both sizes.
  o.kv_memory = f.model->CacheShape(48, DType::kF32, 16).TotalBytes();
  try {
    Engine small(*f.model, o);
    ADD_FAILURE() << "a pool below one sequence";
  } catch (const Error& err) {
    const std::string m = err.what();
    EXPECT_NE(m.find("64 tokens needs 64.0 KiB"), std::string::npos) << m;
    EXPECT_NE(m.find("allows 48.0 KiB"), std::string::npos) << m;
  }
  o.kv_memory = 0, o.max_batch = 0;
  EXPECT_THROW(Engine(*f.model, o), Error);
}

}  // namespace
}  // namespace needle
