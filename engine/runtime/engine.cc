#include "engine/runtime/engine.h"

#include <algorithm>

#include "engine/base/error.h"
#include "engine/base/seconds.h"
#include "kvcache/kv_cache.h"

namespace needle {

struct Engine::Seq {
  int64_t id = 0;
  std::vector<int32_t> prompt;
  int64_t max_new = 1;
  // The kept prompt it was admitted on (pinned from its admission to its prefill's start, when
  // it takes the blocks), or null.
  Prefix* kept = nullptr;
  int64_t kept_tokens = 0;
  std::unique_ptr<SparseAttention> policy;
  std::unique_ptr<Sampler> sampler;  // null: greedy
  std::vector<int32_t> context;      // sampled: the tokens so far (the repetition penalty's)
  bool ignore_eos = false;
  int64_t logprobs = -1;
  bool prompt_logprobs = false;
  std::vector<TokenLogprob> prompt_lp;  // prompt_logprobs: tokens 1.. of the prompt so far
  std::unique_ptr<KVCache> cache;       // (null with a slot: its caches are the slot's)
  Slot* slot = nullptr;                 // own_caches: the slot it runs in
  SwappedBlocks swap;                   // its blocks while preempted (cache->swapped())
  GenerateStats st;
  Clock::time_point decode_start;
  int64_t prefilled = 0;  // prompt tokens in the cache (shared ones included)
  bool began = false;     // its prefill has begun (a prefix shared or not)
  int32_t next = 0;       // the token to feed at the next step
  bool done = false;
};

Engine::Engine(Model& model, const EngineOptions& o)
    : model_(model), opt_(o), block_size_(o.block_size) {
  if (o.max_batch < 1) Fail("engine: max_batch ", o.max_batch, " (at least 1)");
  if (o.block_size < 1) Fail("engine: block_size ", o.block_size, " (at least 1)");
  if (o.max_context < 1) Fail("engine: max_context ", o.max_context, " (at least 1)");
  reuse_ = o.prefix_reuse && model.config().rope.type != RopeType::kDynamic;
  if (o.own_caches) {
    // (No pool.) Every slot is made now, as the pool's blocks would be: what does not fit fails
    // here, naming the numbers, and not when a sequence arrives. More than one slot: every step
    // on the batch kernels, the slots' rows in one ForwardBatch; one slot, its sequence on the
    // one-row kernels (needle generate's, faster for one token) in Forward.
    if (o.max_batch > 1) model.backend().PreferBatchKernels(true);
    size_t taken = 0;
    for (int64_t i = 0; i < o.max_batch; ++i) {
      slots_.push_back(std::make_unique<Slot>());
      slots_.back()->own = o.own_caches(o.max_context, taken);
      taken += slots_.back()->own.gpu_bytes;
    }
    return;
  }
  // Every step, one sequence or many, on the backend's batch kernels: a sequence's tokens do not
  // depend on the others in the engine (engine.h), nor on how many there are.
  model.backend().PreferBatchKernels(true);
  KVMemory* memory = model.backend().kv_memory();
  const int64_t B = block_size_, per_seq = (o.max_context + B - 1) / B * B;
  KVCacheShape shape = model.CacheShape(o.max_batch * per_seq, o.kv_type, B);
  const size_t budget = o.kv_memory != 0    ? o.kv_memory
                        : memory != nullptr ? memory->AvailableBytes()
                                            : AvailableMemoryBytes();
  if (budget != 0 && shape.TotalBytes() > budget) {
    const int64_t fit = static_cast<int64_t>(budget / shape.BytesPerToken()) / B * B;
    shape = model.CacheShape(std::max(fit, per_seq), o.kv_type, B);
  }
  pool_ = std::make_unique<BlockPool>(shape, o.kv_memory, memory);  // (names the numbers)
  pool_blocks_ = pool_->slots(0);
}

Engine::~Engine() = default;

int64_t Engine::Running() const {
  int64_t n = 0;
  for (const auto& s : running_) n += s->done ? 0 : 1;
  return n;
}

int64_t Engine::Submit(SequenceRequest r) {
  const int64_t P = static_cast<int64_t>(r.prompt.size()), ctx = P + r.max_new;
  if (P < 1) Fail("engine: a sequence with an empty prompt");
  if (r.max_new < 1) Fail("engine: max_new ", r.max_new, " (at least 1)");
  if (r.logprobs < -1 || r.logprobs > model_.config().vocab_size)
    Fail("engine: logprobs ", r.logprobs, " (-1 to the vocabulary's ", model_.config().vocab_size,
         ")");
  if (ctx > opt_.max_context)
    Fail("engine: a prompt of ", P, " tokens and ", r.max_new, " new ones exceed the context of ",
         opt_.max_context, " tokens");
  if (opt_.own_caches && r.policy != nullptr)
    Fail("engine: a sequence with a policy of its own, where sequences run in the engine's slots");
  NEEDLE_CHECK(opt_.own_caches ||
               (ctx + block_size_ - 1) / block_size_ <= pool_blocks_);  // (one max_context fits)
  auto s = std::make_unique<Seq>();
  s->id = next_id_++;
  s->prompt = std::move(r.prompt);
  s->max_new = r.max_new;
  s->policy = std::move(r.policy);
  s->ignore_eos = r.ignore_eos;
  s->logprobs = r.logprobs;
  s->prompt_logprobs = r.prompt_logprobs;
  if (!r.sampling.greedy()) {
    s->sampler = std::make_unique<Sampler>(r.sampling);  // (validates it)
    s->context = s->prompt;
  }
  s->st.prompt_tokens = P;
  waiting_.push_back(std::move(s));
  return next_id_ - 1;
}

void Engine::Cancel(int64_t seq) {
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it)
    if ((*it)->id == seq) {
      waiting_.erase(it);
      return;
    }
  for (auto it = swapped_.begin(); it != swapped_.end(); ++it)
    if ((*it)->id == seq) {
      swapped_.erase(it);
      return;
    }
  for (auto it = running_.begin(); it != running_.end(); ++it)
    if ((*it)->id == seq && !(*it)->done) {
      Leave(**it);
      if ((*it)->slot != nullptr) (*it)->slot->busy = false;
      running_.erase(it);  // (its cache gives its blocks back)
      return;
    }
}

int64_t Engine::Prefilling() const {
  int64_t n = 0;
  for (const auto& s : running_) n += s->prefilled < static_cast<int64_t>(s->prompt.size());
  return n;
}

Engine::Seq* Engine::Find(int64_t seq) const {
  for (const auto& s : running_)
    if (s->id == seq) return s.get();
  for (const auto& s : waiting_)
    if (s->id == seq) return s.get();
  for (const auto& s : swapped_)
    if (s->id == seq) return s.get();
  Fail("engine: no sequence ", seq, " (waiting, running, preempted or finished at the last step)");
}

const GenerateStats& Engine::Stats(int64_t seq) const { return Find(seq)->st; }
SparseAttention* Engine::Policy(int64_t seq) const {
  const Seq* s = Find(seq);
  return s->slot != nullptr ? s->slot->own.planner : s->policy.get();
}

KVCache& Engine::CacheOf(Seq& s) const { return s.slot != nullptr ? *s.slot->own.cache : *s.cache; }
AttentionPolicy* Engine::PolicyOf(Seq& s) const {
  return s.slot != nullptr ? s.slot->own.policy.get() : s.policy.get();
}
const std::vector<TokenLogprob>& Engine::PromptLogprobs(int64_t seq) const {
  const Seq* s = Find(seq);
  if (!s->prompt_logprobs || s->prefilled < static_cast<int64_t>(s->prompt.size()))
    Fail("engine: sequence ", seq, " has no prompt logprobs (not asked for, or not prefilled)");
  return s->prompt_lp;
}

// logits: the row t was chosen from ([vocab]), for its logprob; null when not asked for.
void Engine::Take(Seq& s, int32_t t, const float* logits, std::vector<TokenEvent>* events) {
  ++s.st.new_tokens;
  s.next = t;
  if (s.sampler != nullptr) s.context.push_back(t);
  const auto& eos = model_.config().eos_token_ids;
  if (!s.ignore_eos && std::find(eos.begin(), eos.end(), t) != eos.end())
    s.st.stopped_at_eos = true;
  s.done = s.st.stopped_at_eos || s.st.new_tokens == s.max_new;
  if (s.done) s.st.decode_seconds = Since(s.decode_start);
  events->push_back({s.id, t, s.done, {}});
  if (s.logprobs >= 0)
    events->back().logprob.push_back(ScoreToken(logits, model_.config().vocab_size, t, s.logprobs));
}

void Engine::Admit(std::unique_ptr<Seq> s) {
  s->cache = std::make_unique<KVCache>(*pool_, static_cast<int64_t>(s->prompt.size()) + s->max_new);
  prompt_tokens_ += static_cast<int64_t>(s->prompt.size());
  running_.push_back(std::move(s));
}

void Engine::KeepPrefix(const Seq& s) {
  const int64_t whole = static_cast<int64_t>(s.prompt.size()) / block_size_ * block_size_;
  if (whole == 0) return;
  // A sparse prompt's representatives of its kept blocks stay with them (not Dynamic ones: they
  // follow each prompt's observation window).
  const auto keep_reps = [&](Prefix& p) {
    if (s.policy == nullptr || s.policy->config().repr == ReprType::kDynamic) return;
    const RepresentativeStore& from = s.policy->representatives();
    const ModelConfig& m = model_.config();
    const int64_t blocks = whole / block_size_;  // (its prompt's: a kept prompt may go on)
    p.reps = std::make_unique<RepresentativeStore>(m.num_layers, m.num_kv_heads, m.head_dim, blocks,
                                                   from.type(), from.storage());
    p.cfg = s.policy->config();
    for (int64_t layer = 0; layer < from.layers(); ++layer)
      for (int64_t b = 0; b < blocks && b < from.max_blocks(); ++b)
        if (from.ready(layer, b)) p.reps->CopyBlock(from, layer, b, b);
  };
  for (const auto& p : prefixes_)  // already kept (a prompt that began as this one): refreshed
    if (static_cast<int64_t>(p->tokens.size()) >= whole && p->key == PrefillKey(s) &&
        std::equal(s.prompt.begin(), s.prompt.begin() + whole, p->tokens.begin())) {
      p->used = ++clock_;
      if (p->reps == nullptr) keep_reps(*p);
      return;
    }
  if (static_cast<int64_t>(prefixes_.size()) >= opt_.prefix_cache && !EvictPrefix(nullptr))
    return;  // (all in use)
  auto p = std::make_unique<Prefix>();
  p->tokens.assign(s.prompt.begin(), s.prompt.begin() + whole);
  p->key = PrefillKey(s);
  p->prompt = static_cast<int64_t>(s.prompt.size());
  p->cache = std::make_unique<KVCache>(*pool_, whole);
  p->cache->SharePrefix(*s.cache, whole);
  p->used = ++clock_;
  keep_reps(*p);
  cached_blocks_ += whole / block_size_;
  prefixes_.push_back(std::move(p));
}

bool Engine::EvictPrefix(const Prefix* keep) {
  auto lru = prefixes_.end();
  for (auto it = prefixes_.begin(); it != prefixes_.end(); ++it)
    if ((*it)->users == 0 && it->get() != keep &&
        (lru == prefixes_.end() || (*it)->used < (*lru)->used))
      lru = it;
  if (lru == prefixes_.end()) return false;
  cached_blocks_ -= static_cast<int64_t>((*lru)->tokens.size()) / block_size_;
  prefixes_.erase(lru);  // (its cache gives its references back)
  return true;
}

std::string Engine::PrefillKey(const Seq& s) {
  return s.policy != nullptr ? s.policy->config().PrefillKey() : "dense";
}

int64_t Engine::Shareable(const Seq& s, const std::vector<int32_t>& tokens, int64_t held,
                          const std::string& key, int64_t donor_prompt) const {
  if (key != PrefillKey(s)) return 0;
  return SharedPrefix(s.prompt, s.policy != nullptr ? &s.policy->config() : nullptr, tokens, held,
                      donor_prompt);
}

int64_t Engine::SharedPrefix(const std::vector<int32_t>& prompt, const SparseConfig* cfg,
                             const std::vector<int32_t>& tokens, int64_t held,
                             int64_t donor_prompt) const {
  const int64_t P = static_cast<int64_t>(prompt.size());
  const int64_t n = std::min<int64_t>({P - 1, static_cast<int64_t>(tokens.size()), held});
  int64_t c = 0;
  while (c < n && tokens[c] == prompt[c]) ++c;
  if (cfg != nullptr) return cfg->ShareablePrefix(c, P, donor_prompt, model_.ubatch());
  return c / block_size_ * block_size_;
}

Engine::Prefix* Engine::BestPrefix(const Seq& s, int64_t* tokens) {
  *tokens = 0;
  if (!reuse_ || s.prompt_logprobs) return nullptr;
  Prefix* best = nullptr;
  for (const auto& p : prefixes_) {
    const int64_t c = Shareable(s, p->tokens, p->cache->size(), p->key, p->prompt);
    if (c > *tokens) *tokens = c, best = p.get();
  }
  return best;
}

void Engine::Leave(Seq& s) {
  if (s.kept != nullptr) --s.kept->users, s.kept = nullptr;
}

void Engine::SharePrefix(Seq& s) {
  // The longest prefix a running sequence's cache holds that s may take (Shareable). (Looked
  // for when the sequence's prefill begins: the sequences before it in the step have prefilled
  // theirs.)
  int64_t shared = 0;
  // A sequence admitted on a kept prompt takes its blocks; the others, a running sequence's.
  const KVCache* from = nullptr;
  // The representatives that come with the blocks (a sparse donor's, or the kept prompt's).
  const RepresentativeStore* reps = nullptr;
  const SparseConfig* reps_cfg = nullptr;
  if (s.kept != nullptr) {
    shared = s.kept_tokens, from = s.kept->cache.get();
    s.kept->used = ++clock_;
    if (s.kept->reps != nullptr) reps = s.kept->reps.get(), reps_cfg = &s.kept->cfg;
  } else if (reuse_ && !s.prompt_logprobs) {
    for (const auto& o : running_) {
      if (o.get() == &s || o->done) continue;
      const int64_t c = Shareable(s, o->prompt, o->cache->size(), PrefillKey(*o),
                                  static_cast<int64_t>(o->prompt.size()));
      // (Of donors alike, one whose planner has the blocks' representatives.)
      if (c > shared || (c == shared && c > 0 && reps == nullptr && o->policy != nullptr)) {
        shared = c, from = o->cache.get();
        reps = o->policy != nullptr ? &o->policy->representatives() : nullptr;
        reps_cfg = o->policy != nullptr ? &o->policy->config() : nullptr;
      }
    }
  }
  if (from != nullptr) s.cache->SharePrefix(*from, shared);
  if (s.policy != nullptr && reps != nullptr)
    s.policy->AdoptRepresentatives(*reps, *reps_cfg, shared / block_size_);
  s.prefilled = shared;
  reused_tokens_ += shared;
  Leave(s);  // (the blocks are its own references now: the kept prompt may go)
}

// Prefills the next n prompt tokens of s (last: they end its prompt); returns the first token
// when last, and in *row the logits of the last prompt token ([vocab] in logits_) when the
// sequence wants them or samples (else null).
int32_t Engine::PrefillChunk(Seq& s, int64_t n, bool last, const float** row) {
  *row = nullptr;
  const int32_t* ids = s.prompt.data() + s.prefilled;
  const int64_t V = model_.config().vocab_size;
  KVCache& cache = CacheOf(s);
  if (s.prompt_logprobs) {  // every row's logits: the prompt's tokens scored
    model_.Forward(ids, n, cache, true, &logits_);
    const int64_t P = static_cast<int64_t>(s.prompt.size());
    for (int64_t r = 0; r < n && s.prefilled + r + 1 < P; ++r)
      s.prompt_lp.push_back(
          ScoreToken(logits_.data() + r * V, V, s.prompt[s.prefilled + r + 1], s.logprobs));
    if (!last) return 0;
    *row = logits_.data() + (n - 1) * V;
  } else if (!last) {
    model_.Forward(ids, n, cache, false, nullptr);
    return 0;
  } else if (s.sampler != nullptr || s.logprobs >= 0) {
    model_.Forward(ids, n, cache, false, &logits_);
    *row = logits_.data();
  } else {
    return model_.ForwardGreedy(ids, n, cache);
  }
  if (s.sampler == nullptr) return Argmax(*row, V);
  std::vector<float> copy(*row, *row + V);  // (sampling changes its copy)
  return s.sampler->Sample(copy, s.context);
}

int64_t Engine::Chunk(const Seq& s, int64_t prefilled) const {
  const int64_t left = static_cast<int64_t>(s.prompt.size()) - prefilled;
  const bool whole = s.policy != nullptr || s.slot != nullptr;
  int64_t n = opt_.prompt_chunk > 0 && !whole ? std::min(opt_.prompt_chunk, left) : left;
  if (s.prompt_logprobs) n = std::min(n, std::max<int64_t>(1, opt_.prompt_logprob_rows));
  return n;
}

int64_t Engine::Growth(const Seq& s) const {
  const int64_t B = block_size_, P = static_cast<int64_t>(s.prompt.size());
  // Tokens in its cache now (one not begun: the kept prompt's it will take, if any; a running
  // donor's prefix it may take is not counted, so the count is at most one too many).
  const int64_t have = s.began ? s.cache->size() : s.kept != nullptr ? s.kept_tokens : 0;
  const int64_t from = s.began ? s.prefilled : have;
  int64_t end = have + 1;  // decoding: one token
  if (from < P) {
    end = from + Chunk(s, from);
    if (end == P) ++end;  // (its prompt ends: it decodes in the same step, unless it finished)
  }
  return (end + B - 1) / B - (have + B - 1) / B;
}

void Engine::Preempt(Seq& s) {
  // (Into the buffer a resumed sequence left, when it has none of its own: its pages are mapped.)
  if (s.swap.capacity < spare_swap_.capacity) std::swap(s.swap, spare_swap_);
  s.cache->SwapOut(&s.swap);
  ++preempted_;
  auto it = std::find_if(running_.begin(), running_.end(),
                         [&](const std::unique_ptr<Seq>& r) { return r.get() == &s; });
  auto at = std::find_if(swapped_.begin(), swapped_.end(),
                         [&](const std::unique_ptr<Seq>& w) { return w->id > s.id; });
  swapped_.insert(at, std::move(*it));
  running_.erase(it);
}

void Engine::AdmitOwn() {
  while (!waiting_.empty() && Running() < opt_.max_batch) {
    std::unique_ptr<Seq> s = std::move(waiting_.front());
    waiting_.pop_front();
    const int64_t P = static_cast<int64_t>(s->prompt.size());
    // The free slot whose caches hold the longest prefix of s's prompt that s may take, else any
    // free one.
    Slot* best = nullptr;
    int64_t shared = 0;
    for (const auto& slot : slots_) {
      if (slot->busy) continue;
      const SparseAttention* planner = slot->own.planner;
      const int64_t c =
          reuse_ && !s->prompt_logprobs
              ? SharedPrefix(s->prompt, planner ? &planner->config() : nullptr, slot->prompt,
                             slot->own.cache->size(), static_cast<int64_t>(slot->prompt.size()))
              : 0;
      if (best == nullptr || c > shared) best = slot.get(), shared = c;
    }
    NEEDLE_CHECK(best != nullptr);  // (max_batch slots, fewer running)
    KVCache& cache = *best->own.cache;
    if (best->own.policy != nullptr)
      best->own.policy->Rewind(cache, shared);
    else
      cache.Truncate(shared);
    best->busy = true;
    best->prompt.clear();  // (its caches' prompt once s's prefill is done)
    s->slot = best;
    s->began = true;
    s->prefilled = shared;
    reused_tokens_ += shared;
    prompt_tokens_ += P;
    running_.push_back(std::move(s));
  }
}

void Engine::DecodeAlone(const std::vector<Seq*>& rows, int32_t* next, std::vector<float>* logits) {
  const size_t V = static_cast<size_t>(model_.config().vocab_size);
  if (logits != nullptr) logits->resize(rows.size() * V);
  std::vector<float> row;
  for (size_t i = 0; i < rows.size(); ++i) {
    Seq& s = *rows[i];
    model_.set_attention(PolicyOf(s));
    try {
      if (logits != nullptr) {
        model_.Forward(&s.next, 1, CacheOf(s), false, &row);
        std::copy(row.begin(), row.end(), logits->begin() + static_cast<std::ptrdiff_t>(i * V));
        next[i] = Argmax(row.data(), static_cast<int64_t>(V));
      } else {
        next[i] = model_.ForwardGreedy(&s.next, 1, CacheOf(s));
      }
    } catch (...) {
      model_.set_attention(nullptr);
      throw;
    }
    model_.set_attention(nullptr);
  }
}

void Engine::Schedule() {
  if (opt_.own_caches) {
    AdmitOwn();
    return;
  }
  // The blocks the running sequences take in this step; while the pool lacks them, kept prompts
  // are evicted, then the youngest running sequences preempted.
  int64_t need = 0;
  for (const auto& s : running_) need += s->done ? 0 : Growth(*s);
  const auto free = [&] { return pool_->FreeSlots(0); };
  while (need > free()) {
    if (EvictPrefix(nullptr)) continue;
    Seq* young = nullptr;
    for (const auto& s : running_)
      if (!s->done && (young == nullptr || s->id > young->id)) young = s.get();
    // (Alone, a sequence always fits: the pool holds one of max_context tokens, and no kept
    // prompt is pinned between steps.)
    NEEDLE_CHECK(young != nullptr && Running() > 1);
    need -= Growth(*young);
    Preempt(*young);
  }
  // Preempted sequences resume first, oldest first; then waiting ones are admitted in order.
  while (!swapped_.empty() && Running() < opt_.max_batch) {
    Seq& w = *swapped_.front();
    const int64_t cost = static_cast<int64_t>(w.swap.blocks[0].size()) + Growth(w);
    while (need + cost > free() && EvictPrefix(nullptr)) {
    }
    if (need + cost > free()) return;
    w.cache->SwapIn(&w.swap);
    if (w.swap.capacity > spare_swap_.capacity) std::swap(w.swap, spare_swap_);
    ++resumed_;
    need += Growth(w);
    running_.push_back(std::move(swapped_.front()));
    swapped_.pop_front();
  }
  while (swapped_.empty() && !waiting_.empty() && Running() < opt_.max_batch) {
    Seq& w = *waiting_.front();
    w.kept = BestPrefix(w, &w.kept_tokens);
    const int64_t cost = Growth(w);
    while (need + cost > free() && EvictPrefix(w.kept)) {
    }
    if (need + cost > free()) {
      w.kept = nullptr, w.kept_tokens = 0;
      return;
    }
    if (w.kept != nullptr) ++w.kept->users;
    need += cost;
    std::unique_ptr<Seq> s = std::move(waiting_.front());
    waiting_.pop_front();
    Admit(std::move(s));
  }
}

void Engine::Prefill(Seq& s, std::vector<TokenEvent>* events) {
  if (!s.began) SharePrefix(s), s.began = true;
  const int64_t P = static_cast<int64_t>(s.prompt.size()), left = P - s.prefilled;
  const int64_t n = Chunk(s, s.prefilled);
  const auto t0 = Clock::now();
  model_.set_attention(PolicyOf(s));
  int32_t first = 0;
  const float* row = nullptr;
  try {
    first = PrefillChunk(s, n, n == left, &row);
  } catch (...) {
    model_.set_attention(nullptr);
    throw;
  }
  model_.set_attention(nullptr);
  s.prefilled += n;
  s.st.prefill_seconds += Since(t0);
  if (s.prefilled < P) return;
  if (s.slot != nullptr) s.slot->prompt = s.prompt;
  s.decode_start = Clock::now();
  Take(s, first, row, events);
}

std::vector<TokenEvent> Engine::Step() {
  // Finished sequences leave (their prompts into the prefix cache first).
  for (const auto& s : running_)
    if (s->done) {
      Leave(*s);
      if (s->slot != nullptr) s->slot->busy = false;
      if (reuse_ && opt_.prefix_cache > 0 && s->slot == nullptr) KeepPrefix(*s);
    }
  running_.erase(std::remove_if(running_.begin(), running_.end(),
                                [](const std::unique_ptr<Seq>& s) { return s->done; }),
                 running_.end());
  std::vector<TokenEvent> events;
  Schedule();
  std::vector<Seq*> step;
  for (const auto& s : running_) {
    const bool prefilling = s->prefilled < static_cast<int64_t>(s->prompt.size());
    if (prefilling) Prefill(*s, &events);
    // (A sequence whose prompt ends in this step decodes its first token's successor in it too.)
    if (!s->done && s->prefilled == static_cast<int64_t>(s->prompt.size())) step.push_back(s.get());
  }
  if (step.empty()) return events;
  std::vector<KVCache*> caches;
  std::vector<AttentionPolicy*> policies;
  std::vector<int32_t> ids, next(step.size());
  bool sampled = false;  // (then every row's logits come back to the host)
  for (Seq* s : step) {
    caches.push_back(&CacheOf(*s)), policies.push_back(PolicyOf(*s)), ids.push_back(s->next);
    sampled |= s->sampler != nullptr || s->logprobs >= 0;
  }
  std::vector<float> logits;
  if (opt_.own_caches && opt_.max_batch == 1)  // (one slot: the one-row kernels, Forward)
    DecodeAlone(step, next.data(), sampled ? &logits : nullptr);
  else
    model_.ForwardBatch(ids.data(), static_cast<int64_t>(ids.size()), caches.data(), next.data(),
                        sampled ? &logits : nullptr, policies.data());
  const size_t V = static_cast<size_t>(model_.config().vocab_size);
  for (size_t i = 0; i < step.size(); ++i) {
    if (step[i]->sampler != nullptr) {
      std::vector<float> row(logits.begin() + i * V, logits.begin() + (i + 1) * V);
      next[i] = step[i]->sampler->Sample(row, step[i]->context);
    }
    Take(*step[i], next[i], sampled ? logits.data() + i * V : nullptr, &events);
  }
  return events;
}

}  // namespace needle
