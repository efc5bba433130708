#include "eval/runner_batch.h"

#include <algorithm>
#include <map>
#include <memory>

#include "engine/base/error.h"
#include "engine/base/seconds.h"
#include "engine/runtime/engine.h"
#include "sparse_attn/sparse_attention.h"

namespace needle::eval {

void RunBatched(Model& model, const Tokenizer& tok, ThreadingContext& tc, const std::string& task,
                const EvalConfig& cfg, const std::vector<const datasets::Sample*>& todo,
                const RunnerOptions& opt, int64_t max_new,
                const std::function<std::vector<int32_t>(const datasets::Sample&)>& prompt_ids,
                const std::function<void(EvalResult, const datasets::Sample&)>& record) {
  if (todo.empty()) return;
  // Sparse attention on a GPU (the hybrid engine): the samples run in the Engine's slots, each
  // with caches of its own for the longest prompt (no pool), rewound between samples to the
  // prefix they share. The prompts are tokenized first, to size the slots.
  const bool slots = cfg.sparse && model.backend().kv_memory() != nullptr;
  if (cfg.sparse && !slots && opt.placement == KVPlacement::kDevice)
    Fail("--kv-placement device: the model runs on the CPU, whose KV cache is in host memory");
  std::vector<std::vector<int32_t>> tokenized;
  int64_t longest = 0;
  if (slots)
    for (const datasets::Sample* s : todo) {
      tokenized.push_back(prompt_ids(*s));
      longest = std::max(longest, static_cast<int64_t>(tokenized.back().size()));
    }
  EngineOptions eo;
  eo.max_batch = std::min<int64_t>(opt.batch, static_cast<int64_t>(todo.size()));
  eo.block_size = cfg.sparse ? cfg.sparse_cfg.block_size : 128;
  eo.max_context = slots ? longest + max_new : opt.context_limit;
  eo.kv_type = opt.kv_type;
  eo.kv_memory = opt.kv_memory;
  std::string said;
  if (slots) {
    SequenceOptions so;
    so.kv_type = opt.kv_type, so.kv_memory = opt.kv_memory, so.ubatch = opt.ubatch;
    so.gpu_memory = opt.gpu_memory, so.placement = opt.placement;
    eo.own_caches =
        SlotCaches(model, cfg.sparse_cfg, tc, so, eo.max_batch, [&](const SequenceAttention& a) {
          if (a.placement != said)
            std::fprintf(stderr, "eval %s [%s]: %s\n", task.c_str(), cfg.name.c_str(),
                         (said = a.placement).c_str());
        });
  }
  model.set_attention(nullptr);
  Engine engine(model, eo);
  if (slots)
    std::fprintf(stderr,
                 "eval %s [%s]: up to %lld samples at once, each in caches of its own for %lld "
                 "tokens\n",
                 task.c_str(), cfg.name.c_str(), static_cast<long long>(eo.max_batch),
                 static_cast<long long>(eo.max_context));
  else
    std::fprintf(stderr, "eval %s [%s]: up to %lld samples at once, KV pool of %lld tokens (%s)\n",
                 task.c_str(), cfg.name.c_str(), static_cast<long long>(eo.max_batch),
                 static_cast<long long>(engine.pool_tokens()),
                 FormatBytes(engine.pool_bytes()).c_str());
  // A submitted sample's answer as it streams in.
  struct Answer {
    const datasets::Sample* s;
    std::unique_ptr<StreamDecoder> dec;
    std::string text;
  };
  std::map<int64_t, Answer> answers;
  size_t next = 0;
  while (next < todo.size() || !engine.Idle()) {
    // Samples are tokenized as they are submitted: as many as the batch has room for, at least
    // one waiting (a long prompt is not held in memory long before its turn).
    while (next < todo.size() &&
           engine.Waiting() < std::max<int64_t>(1, eo.max_batch - engine.Running())) {
      const datasets::Sample& s = *todo[next];
      SequenceRequest r;
      r.prompt = slots ? std::move(tokenized[next]) : prompt_ids(s);
      ++next;
      r.max_new = max_new;
      if (cfg.sparse && !slots) {  // (a slot's planner is the slot's)
        r.policy = std::make_unique<SparseAttention>(
            model.config(), cfg.sparse_cfg, model.backend(), tc,
            static_cast<int64_t>(r.prompt.size()) + max_new, opt.kv_type);
        r.policy->set_recall(opt.recall);
      }
      int64_t id = 0;
      try {
        id = engine.Submit(std::move(r));
      } catch (const Error& e) {
        Fail("needle eval --batch: ", task, " sample ", s.id, ": ", e.what());
      }
      answers[id] = Answer{&s, std::make_unique<StreamDecoder>(tok, true), {}};
    }
    for (const TokenEvent& ev : engine.Step()) {
      Answer& a = answers.at(ev.seq);
      a.text += a.dec->Push(ev.token);
      if (!ev.finished) continue;
      a.text += a.dec->Flush();
      const GenerateStats& st = engine.Stats(ev.seq);
      EvalResult res = MakeResult(task, cfg, *a.s, opt, st.prompt_tokens, a.text, st);
      if (cfg.sparse && opt.recall) res.recall = MeanRecall(*engine.Policy(ev.seq));
      record(std::move(res), *a.s);
      answers.erase(ev.seq);
    }
  }
  if (engine.reused_tokens() > 0 || !cfg.sparse)
    std::fprintf(stderr,
                 "eval %s [%s]: prefix reuse: %lld of %lld prompt tokens taken from running "
                 "samples' KV blocks instead of prefilled\n",
                 task.c_str(), cfg.name.c_str(), static_cast<long long>(engine.reused_tokens()),
                 static_cast<long long>(engine.prompt_tokens()));
}

}  // namespace needle::eval
