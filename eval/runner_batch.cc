#include "eval/runner_batch.h"

#include <algorithm>
#include <deque>
#include <memory>

#include "engine/base/error.h"
#include "engine/base/seconds.h"
#include "kvcache/block_pool.h"
#include "sparse_attn/sparse_attention.h"

namespace needle::eval {

namespace {
struct Running {
  const datasets::Sample* s = nullptr;
  std::vector<int32_t> ids;  // the prompt (a later sample may share its blocks)
  std::unique_ptr<KVCache> cache;
  std::unique_ptr<SparseAttention> sparse;  // a sparse configuration's planner (its own state)
  int64_t prompt_tokens = 0, blocks = 0;    // blocks: reserved in each layer of the pool
  std::unique_ptr<StreamDecoder> dec;
  std::string text;
  int32_t next = 0;  // the token to feed at the next step
  GenerateStats st;
  Clock::time_point decode_start;
  bool done = false;
};
}  // namespace

void RunBatched(Model& model, const Tokenizer& tok, ThreadingContext& tc, const std::string& task,
                const EvalConfig& cfg, const std::vector<const datasets::Sample*>& todo,
                const RunnerOptions& opt, int64_t max_new,
                const std::function<std::vector<int32_t>(const datasets::Sample&)>& prompt_ids,
                const std::function<void(EvalResult, const datasets::Sample&)>& record) {
  if (todo.empty()) return;
  KVMemory* memory = model.backend().kv_memory();
  if (cfg.sparse && memory != nullptr)
    Fail("needle eval --batch: sparse attention on ", memory->Name(),
         " runs one sample at a time for now");
  if (cfg.sparse && opt.placement == KVPlacement::kDevice)
    Fail("--kv-placement device: the model runs on the CPU, whose KV cache is in host memory");
  const int64_t B = cfg.sparse ? cfg.sparse_cfg.block_size : 128, per_seq = opt.context_limit;
  const int64_t batch = std::min<int64_t>(opt.batch, static_cast<int64_t>(todo.size()));
  // The pool: room for `batch` samples of the whole context where the budget allows, else as
  // many tokens as it allows (at least one sample's: BlockPool names the numbers otherwise).
  KVCacheShape shape = model.CacheShape(batch * per_seq, opt.kv_type, B);
  const size_t budget = opt.kv_memory != 0  ? opt.kv_memory
                        : memory != nullptr ? memory->AvailableBytes()
                                            : AvailableMemoryBytes();
  if (budget != 0 && shape.TotalBytes() > budget) {
    const int64_t fit = static_cast<int64_t>(budget / shape.BytesPerToken()) / B * B;
    shape = model.CacheShape(std::max(fit, per_seq), opt.kv_type, B);
  }
  BlockPool pool(shape, opt.kv_memory, memory);
  const int64_t pool_blocks = pool.slots(0);
  std::fprintf(stderr, "eval %s [%s]: up to %lld samples at once, KV pool of %lld tokens (%s)\n",
               task.c_str(), cfg.name.c_str(), static_cast<long long>(batch),
               static_cast<long long>(pool_blocks * B), FormatBytes(shape.TotalBytes()).c_str());
  const auto& eos = model.config().eos_token_ids;
  // Prefix reuse: a sample whose prompt begins as a running sample's does takes that sample's
  // whole blocks of the common prefix (KVCache::SharePrefix) and prefills the rest. Dense
  // attention only: a sparse planner's state of the prefix (representatives, observation votes)
  // is its own; and not with dynamic NTK rope, whose frequencies follow each prompt's length.
  const bool reuse = !cfg.sparse && model.config().rope.type != RopeType::kDynamic;
  int64_t prompt_total = 0, prompt_reused = 0;
  model.set_attention(nullptr);
  std::deque<const datasets::Sample*> waiting(todo.begin(), todo.end());
  std::vector<std::unique_ptr<Running>> running;
  int64_t reserved = 0;
  std::vector<int32_t> front_ids;  // the first waiting sample's prompt, once tokenized
  bool front_ready = false;
  // Feeds token t to r's answer; whether r is finished (EOS, or max_new tokens).
  const auto take = [&](Running& r, int32_t t) {
    r.text += r.dec->Push(t);
    ++r.st.new_tokens;
    r.next = t;
    if (std::find(eos.begin(), eos.end(), t) != eos.end()) r.st.stopped_at_eos = true;
    r.done = r.st.stopped_at_eos || r.st.new_tokens == max_new;
  };
  const auto finish = [&](Running& r) {
    r.text += r.dec->Flush();
    r.st.decode_seconds = Since(r.decode_start);
    EvalResult res = MakeResult(task, cfg, *r.s, opt, r.prompt_tokens, r.text, r.st);
    if (r.sparse != nullptr && opt.recall) res.recall = MeanRecall(*r.sparse);
    record(std::move(res), *r.s);
    reserved -= r.blocks;
  };
  while (!waiting.empty() || !running.empty()) {
    // Admit: in order, while the batch and the pool's unreserved blocks allow.
    while (!waiting.empty() && static_cast<int64_t>(running.size()) < batch) {
      const datasets::Sample& s = *waiting.front();
      // (Tokenized once: a sample that waits for blocks keeps its tokens until it joins.)
      if (!front_ready) front_ids = prompt_ids(s), front_ready = true;
      const std::vector<int32_t>& ids = front_ids;
      const int64_t P = static_cast<int64_t>(ids.size()), ctx = P + max_new;
      const int64_t need = (ctx + B - 1) / B;
      if (need > pool_blocks)
        Fail("needle eval --batch: ", task, " sample ", s.id, " needs ", ctx,
             " tokens of KV, more than the pool's ", pool_blocks * B, " (the --kv-memory budget)");
      if (reserved + need > pool_blocks) break;  // waits for a running sample to finish
      waiting.pop_front();
      auto r = std::make_unique<Running>();
      r->s = &s, r->prompt_tokens = P, r->blocks = need;
      reserved += need;
      r->cache = std::make_unique<KVCache>(pool, ctx);
      if (cfg.sparse) {
        r->sparse = std::make_unique<SparseAttention>(model.config(), cfg.sparse_cfg,
                                                      model.backend(), tc, ctx, opt.kv_type);
        r->sparse->set_recall(opt.recall);
      }
      r->dec = std::make_unique<StreamDecoder>(tok, true);
      r->st.prompt_tokens = P;
      const auto t0 = Clock::now();
      int64_t shared = 0;  // whole blocks of the longest common prefix, at least a token left
      const Running* donor = nullptr;
      for (const auto& o : running) {
        if (!reuse) break;
        const int64_t n = std::min<int64_t>(P - 1, static_cast<int64_t>(o->ids.size()));
        int64_t c = 0;
        while (c < n && o->ids[c] == ids[c]) ++c;
        c = std::min(c, o->cache->size()) / B * B;
        if (c > shared) shared = c, donor = o.get();
      }
      if (donor != nullptr) r->cache->SharePrefix(*donor->cache, shared);
      prompt_total += P, prompt_reused += shared;
      model.set_attention(r->sparse.get());
      const int32_t first = model.ForwardGreedy(ids.data() + shared, P - shared, *r->cache);
      model.set_attention(nullptr);
      r->st.prefill_seconds = Since(t0);
      r->decode_start = Clock::now();
      r->ids = std::move(front_ids);
      front_ready = false;
      take(*r, first);
      if (r->done) {
        finish(*r);
        continue;
      }
      running.push_back(std::move(r));
    }
    if (running.empty()) continue;
    // One decode step for every running sample, then the finished ones leave.
    std::vector<KVCache*> caches;
    std::vector<AttentionPolicy*> policies;
    std::vector<int32_t> ids, next(running.size());
    for (const auto& r : running)
      caches.push_back(r->cache.get()), policies.push_back(r->sparse.get()), ids.push_back(r->next);
    model.ForwardBatch(ids.data(), static_cast<int64_t>(ids.size()), caches.data(), next.data(),
                       nullptr, policies.data());
    for (size_t i = 0; i < running.size(); ++i) take(*running[i], next[i]);
    for (auto& r : running)
      if (r->done) finish(*r);
    running.erase(std::remove_if(running.begin(), running.end(),
                                 [](const std::unique_ptr<Running>& r) { return r->done; }),
                  running.end());
  }
  if (reuse)
    std::fprintf(stderr,
                 "eval %s [%s]: prefix reuse: %lld of %lld prompt tokens taken from running "
                 "samples' KV blocks instead of prefilled\n",
                 task.c_str(), cfg.name.c_str(), static_cast<long long>(prompt_reused),
                 static_cast<long long>(prompt_total));
}

}  // namespace needle::eval
