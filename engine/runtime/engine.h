// Many sequences over one KV block pool (issue 19; vLLM's split, ../shared/reference/
// vllm_engine.md): the Engine owns the pool, the waiting and running queues and each sequence's
// KV cache (its block table) and attention policy; Model::ForwardBatch runs a step over them.
// `needle eval --batch` submits samples to it; a server would submit requests the same way.
//
// A step (Step):
//   1. sequences that finished at the previous step leave (their blocks back to the pool);
//   2. scheduling (vLLM's, by blocks actually free): the running sequences' blocks for this step
//      (a decode's new block, a prompt chunk's) come first. While the pool lacks them, kept
//      prompts are evicted (least recently used first), then the youngest running sequence is
//      preempted: its blocks are copied to host memory and given back (KVCache::SwapOut), and
//      it waits, state and all, among the preempted. Preempted sequences resume first (oldest
//      first; their blocks copied back into free slots), then waiting ones are admitted in order
//      while max_batch and the free blocks allow their first step; the first that does not fit
//      waits, and the ones behind it with it. So a sequence takes blocks as it grows, not its
//      whole answer's when it joins, and no sequence fails for want of a block: alone, one
//      always fits (the pool holds one of max_context tokens).
//      Swap, not recompute: a swapped sequence resumes with the very bits it left with, so its
//      answer is the one it gives alone, dense or sparse (its planner's state stays with it),
//      CPU or GPU. Recomputing its tokens as a prompt would be exact only where a prefill gives
//      the bits of one-token steps, which the GPU's kernels (a GEMM for many rows, a GEMV for
//      one) do not, nor a sparse prompt's end-of-prompt observation (it would see another
//      window). For a GPU pool the host memory is the cheap side; for a host pool it is the
//      same memory outside the pool's budget (kv_memory bounds the running sequences' blocks).
//      Where an admitted sequence's prompt begins as a running sequence's does, or as a
//      finished one's kept in the prefix cache (prefix_cache), and their prefills compute the
//      same KV (EngineOptions::prefix_reuse), it takes that sequence's whole blocks of the
//      common prefix by reference (KVCache::SharePrefix) and prefills only the rest. The prefix
//      cache keeps the prompts' whole blocks of finished sequences (by reference: nothing
//      copied) until admission needs their blocks, least recently used first;
//   3. sequences still prefilling take their next chunk of prompt_chunk tokens (dense; the
//      whole rest with prompt_chunk 0, or with a sparse policy, whose end-of-prompt observation
//      wants the prompt in one call), each alone; the last chunk gives the first token. So a
//      long prompt does not stall the others' decoding for its whole prefill. (Not mixed into
//      the decode rows' products: a prompt chunk's hundreds of rows take the GEMM, and the decode
//      rows beside them would then get other bits than alone; see PreferBatchKernels);
//   4. every running sequence past its prompt decodes one token, all in one
//      Model::ForwardBatch.
// Sequences with caches of their own (EngineOptions::own_caches: the hybrid engine's, sparse
// attention on a GPU, whose KV lives in host DRAM and GPU rings of its own): no pool. At most
// max_batch run at once, each in a slot (its caches and policy, made for max_context tokens when
// the Engine is); a finished sequence's slot serves the next one, rewound (AttentionPolicy::Rewind)
// to the longest prompt prefix they share that leaves the new one attending as alone
// (SparseConfig::ShareablePrefix), else to nothing. Their prompts are prefilled whole in the
// step they join. With more than one slot, the slots' rows decode in one Model::ForwardBatch
// (the projections and the MLP shared, each row's attention through its own policy), every
// step on the batch kernels; one slot decodes alone (Model::Forward, the one-row kernels).
// A sequence finishes at an end-of-sequence token of the model or at its max_new-th token.
// Greedy decoding: a batch gives each sequence the tokens it gives alone (tests/
// test_model_batch.cc, tests/test_engine.cc).
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/model/generate.h"
#include "engine/model/logprobs.h"
#include "engine/model/model.h"
#include "engine/model/sampling.h"
#include "engine/runtime/sequence_attention.h"
#include "kvcache/block_pool.h"
#include "sparse_attn/sparse_attention.h"

namespace needle {

struct EngineOptions {
  int64_t max_batch = 1;     // sequences decoding at once (>= 1)
  int64_t block_size = 128;  // tokens per KV block (the sparse settings' block size if sparse)
  int64_t max_context = 0;   // tokens of one sequence, prompt and answer (>= 1)
  DType kv_type = DType::kF32;
  size_t kv_memory = 0;  // the pool's budget in bytes (0: what the memory has available)
  // Share prompt prefixes between sequences whose prefills compute the same KV (off: every prompt
  // prefilled whole): dense prefills (dense sequences, and sparse ones with a dense prefill)
  // among themselves, sparse prefills of the same settings among themselves, each sparse
  // sequence only as much as leaves it attending as alone (SparseConfig::ShareablePrefix; its
  // planner computes the shared blocks' representatives from their keys). Never with dynamic
  // NTK rope (its frequencies follow each prompt's length).
  bool prefix_reuse = true;
  // Prompt tokens a dense sequence prefills per step (0: its whole prompt in the step it joins).
  int64_t prompt_chunk = 0;
  // Prompt tokens per forward call of a sequence that wants its prompt's logprobs (each brings
  // back a row of vocab_size logits).
  int64_t prompt_logprob_rows = 256;
  // Finished sequences' prompts kept for later prompts that begin alike (at most this many; 0:
  // none). Their blocks count against the pool until evicted, which admission does
  // (least recently used first) whenever a waiting sequence needs them: the pool's budget
  // (kv_memory) is the cache's bound.
  int64_t prefix_cache = 0;
  // When set, every sequence runs in caches of its own, made by this for a sequence of `ctx`
  // tokens (the hybrid engine: engine/runtime/sequence_attention.h), max_batch of them when the
  // Engine is made, and the Engine keeps no pool (above). Requests then carry no policy: the
  // slot's is theirs.
  // gpu_taken: the GPU memory the slots made before take (their SequenceAttention::gpu_bytes),
  // so that all of them together fit one budget.
  std::function<SequenceAttention(int64_t ctx, size_t gpu_taken)> own_caches;
};

struct SequenceRequest {
  std::vector<int32_t> prompt;  // at least one token
  int64_t max_new = 1;          // tokens to generate at most (>= 1)
  // The sequence's attention policy (a sparse planner of its own), or null: dense.
  std::unique_ptr<SparseAttention> policy;
  // How its tokens are chosen (greedy by default; a sampled sequence draws from its own
  // generator, seeded by sampling.seed, over its row's logits).
  SamplingParams sampling;
  bool ignore_eos = false;  // finish at max_new only
  // Log-probabilities (engine/model/logprobs.h): -1 none; k >= 0: of every token produced, with
  // the k most likely at its place (its TokenEvent's logprob).
  int64_t logprobs = -1;
  // Also of every prompt token after the first, each under the logits before it (PromptLogprobs;
  // with the top logprobs when logprobs > 0). Such a prompt is prefilled whole (no shared prefix:
  // every position's logits are needed) in chunks of at most prompt_logprob_rows tokens.
  bool prompt_logprobs = false;
};

// One token a step produced for a sequence; finished: its last. logprob: when the sequence asked
// for them (SequenceRequest::logprobs >= 0), else empty.
struct TokenEvent {
  int64_t seq = 0;
  int32_t token = 0;
  bool finished = false;
  std::vector<TokenLogprob> logprob;  // none or one
};

class Engine {
 public:
  // The pool: room for max_batch sequences of max_context tokens where the budget allows, else
  // as many blocks as it allows (at least one sequence's: an Error naming the numbers
  // otherwise). The model's own attention policy must be the default (dense).
  Engine(Model& model, const EngineOptions& o);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a sequence; returns its id (0, 1, ... in submission order). Throws Error, naming the
  // numbers, for an empty prompt, max_new < 1, or a prompt and answer beyond max_context (the
  // pool always holds one such sequence).
  int64_t Submit(SequenceRequest r);
  // Drops a waiting or running sequence now (a client gone): its blocks go back to the pool and
  // it produces no more tokens. Unknown or finished ids are ignored.
  void Cancel(int64_t seq);
  // One step (above); the tokens it produced, admitted sequences' first tokens first. A sequence
  // that finished stays readable (Stats, Policy) until the next Step.
  std::vector<TokenEvent> Step();

  bool Idle() const { return waiting_.empty() && running_.empty() && swapped_.empty(); }
  int64_t Waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t Preempted() const { return static_cast<int64_t>(swapped_.size()); }  // (swapped out now)
  int64_t Running() const;     // sequences admitted and not finished
  int64_t Prefilling() const;  // of those, the ones whose prompt is not all in their cache yet
  // A sequence's counts and times (prefill: its own; decode: wall clock from its first token to
  // its last, the steps it shared included) and its policy; for a waiting, running or just
  // finished sequence, else Error.
  const GenerateStats& Stats(int64_t seq) const;
  SparseAttention* Policy(int64_t seq) const;
  // A prompt_logprobs sequence's prompt tokens 1..P-1 scored (P - 1 entries), once its prompt is
  // prefilled (at its first TokenEvent); for a running or just finished sequence, else Error.
  const std::vector<TokenLogprob>& PromptLogprobs(int64_t seq) const;
  // Prompt tokens of admitted sequences, and of those the ones taken from shared blocks.
  int64_t prompt_tokens() const { return prompt_tokens_; }
  // Preemptions (swaps out) and resumptions (swaps in) so far.
  int64_t preemptions() const { return preempted_; }
  int64_t resumptions() const { return resumed_; }
  int64_t reused_tokens() const { return reused_tokens_; }
  int64_t pool_tokens() const { return pool_blocks_ * block_size_; }
  int64_t free_blocks() const {  // (of layer 0; all alike)
    return pool_ != nullptr ? pool_->FreeSlots(0) : 0;
  }
  // Prompts in the prefix cache, and the blocks (per layer) they hold.
  int64_t cached_prefixes() const { return static_cast<int64_t>(prefixes_.size()); }
  int64_t cached_blocks() const { return cached_blocks_; }
  size_t pool_bytes() const { return pool_ != nullptr ? pool_->shape().TotalBytes() : 0; }
  // Slots of sequences with caches of their own (own_caches), made so far.
  int64_t own_slots() const { return static_cast<int64_t>(slots_.size()); }

 private:
  struct Seq;
  Seq* Find(int64_t seq) const;
  void Admit(std::unique_ptr<Seq> s);
  // Step's part 2 (above): preemption, resumption, admission.
  void Schedule();
  // The prompt tokens s prefills in one step from `prefilled` on.
  int64_t Chunk(const Seq& s, int64_t prefilled) const;
  // The blocks (per layer) s's cache takes in this step.
  int64_t Growth(const Seq& s) const;
  void Preempt(Seq& s);  // s swapped out, from the running to the preempted
  void SharePrefix(Seq& s);
  void Prefill(Seq& s, std::vector<TokenEvent>* events);
  void Take(Seq& s, int32_t token, const float* logits, std::vector<TokenEvent>* events);
  int32_t PrefillChunk(Seq& s, int64_t n, bool last, const float** row);
  struct Prefix;
  void KeepPrefix(const Seq& s);
  // Evicts the least recently used prompt that no running sequence shares, other than `keep`;
  // false when there is none.
  bool EvictPrefix(const Prefix* keep);
  // The kept prompt s's prompt shares the most whole blocks with (its tokens in *tokens), or null.
  Prefix* BestPrefix(const Seq& s, int64_t* tokens);
  // The tokens s's prompt can take from a cache holding `held` tokens of `tokens`, computed by
  // the prefill of a prompt of donor_prompt tokens with prefill key `key`: none for another key
  // (SparseConfig::PrefillKey: a dense prefill, or a sparse one's settings); else their common
  // prefix in whole blocks, at least one prompt token left to prefill (its logits give the first
  // token), and for a sparse sequence what SparseConfig::ShareablePrefix allows (so that it
  // attends exactly as alone).
  int64_t Shareable(const Seq& s, const std::vector<int32_t>& tokens, int64_t held,
                    const std::string& key, int64_t donor_prompt) const;
  // Shareable past the key: for a prompt of sparse settings cfg (null: dense).
  int64_t SharedPrefix(const std::vector<int32_t>& prompt, const SparseConfig* cfg,
                       const std::vector<int32_t>& tokens, int64_t held,
                       int64_t donor_prompt) const;
  static std::string PrefillKey(const Seq& s);
  void Leave(Seq& s);  // s leaves the running sequences (its kept prompt unpinned)
  // A sequence's cache and policy: the pool's and its own, or its slot's.
  KVCache& CacheOf(Seq& s) const;
  AttentionPolicy* PolicyOf(Seq& s) const;
  // own_caches: the waiting sequences admitted into free slots (Schedule's part for them).
  void AdmitOwn();
  // own_caches with one slot: each of `rows` decodes its next token alone (Model::Forward on the
  // one-row kernels), into next[i] (logits too where asked: [rows, vocab] in *logits).
  void DecodeAlone(const std::vector<Seq*>& rows, int32_t* next, std::vector<float>* logits);

  Model& model_;
  EngineOptions opt_;
  int64_t block_size_, pool_blocks_ = 0, next_id_ = 0, preempted_ = 0, resumed_ = 0;
  int64_t prompt_tokens_ = 0, reused_tokens_ = 0;
  bool reuse_;
  std::unique_ptr<BlockPool> pool_;
  std::deque<std::unique_ptr<Seq>> waiting_;
  std::vector<std::unique_ptr<Seq>> running_;  // finished ones until the next Step
  std::deque<std::unique_ptr<Seq>> swapped_;   // preempted, by id (oldest first)
  std::vector<float> logits_;                  // a prefill's logits (host)
  struct Prefix {
    std::vector<int32_t> tokens;     // whole blocks of a finished prompt
    std::unique_ptr<KVCache> cache;  // holding their blocks
    std::string key;                 // its prefill's (Engine::PrefillKey)
    int64_t prompt = 0;              // the tokens of the prompt they began
    // A sparse prompt's representatives of these blocks (SparseAttention::AdoptRepresentatives;
    // Quest's are 1/block_size of the blocks' bytes, Max's and Mean's half that), and the
    // settings they follow.
    std::unique_ptr<RepresentativeStore> reps;
    SparseConfig cfg;
    uint64_t used = 0;
    int64_t users = 0;  // sequences admitted on it whose prefill has not begun (it stays)
  };
  std::vector<std::unique_ptr<Prefix>> prefixes_;
  // The largest host buffer a resumed sequence left (SwappedBlocks), for the next preemption:
  // its pages are mapped already (at most one sequence's blocks kept).
  SwappedBlocks spare_swap_;
  struct Slot {
    SequenceAttention own;        // its caches and policy (own_caches(max_context))
    std::vector<int32_t> prompt;  // the prompt of the last sequence it held (in its caches)
    bool busy = false;
  };
  std::vector<std::unique_ptr<Slot>> slots_;
  int64_t cached_blocks_ = 0;
  uint64_t clock_ = 0;
};

}  // namespace needle
