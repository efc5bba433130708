// Block-sparse attention as an AttentionPolicy of the model.
//
// Prefill (a Forward call of several tokens) attends densely; as blocks fill, their Max/Mean/Quest
// representatives are computed. When the prompt is complete, the last obs_window queries vote
// (observation.h) for Dynamic representatives and for the SnapKV preselected candidate set.
// Decode: layers below dense_layers, and any step with no Context region yet, attend densely;
// the others score the candidate Context blocks (scoring.h), keep the top `topk` per layer or per
// KV head (reusing a selection for token_step tokens / layer_step layers, always adding blocks
// that joined the Context since), build a LayerPlan and run the block kernel over
// Initial + selected + Local. Blocks generated after the prompt are always candidates. After the
// kernel, the softmax mass of each selected block (block_mass.h) picks up to retain_blocks blocks
// (the heaviest, each with its successor) to keep in the layer's next selection, in place of as
// many chosen by score; at the end of the prompt the last prompt query seeds them.
#pragma once

#include <cstdint>
#include <memory>
#include <ostream>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/model/model.h"
#include "sparse_attn/observation.h"
#include "sparse_attn/plan.h"
#include "sparse_attn/representatives.h"
#include "sparse_attn/scoring.h"
#include "sparse_attn/sparse_config.h"

namespace needle {

// Carries out the attention the planner decides, where the KV lies: the CPU executor runs the
// backend's kernels over the cache it is given; the hybrid engine's (engine/cuda/hybrid.h)
// attends Initial + Local on the GPU and the selected Context blocks on the CPU.
class PlanExecutor {
 public:
  virtual ~PlanExecutor() = default;
  // Every visible key of `layer` for a.T queries (prompts, dense layers, steps with no Context).
  // q, out: as AttentionPolicy::Attend's; kv: the planner's view of the layer; lse: host
  // [T, heads] or nullptr.
  virtual void Dense(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv,
                     float* out, float* lse) = 0;
  // One decode query over the plan's keys (Initial + plan.blocks + Local); lse: host [heads].
  // mass (optional): retention's block masses of plan.blocks (block_mass.h), [kv_head][i]; returns
  // whether it filled them (else the planner computes them itself).
  virtual bool Planned(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv,
                       const LayerPlan& plan, float* out, float* lse,
                       std::vector<std::vector<float>>* mass) = 0;
  // Retention's masses later: asked before Planned when the step's lse is read only by them (the
  // next selection at `layer` is the first reader). An executor that answers true leaves lse and
  // mass to LateMass (Planned returns false, lse unset), which the planner calls, with the same
  // blocks, before that selection: the host need not wait for the GPU's partial at this step.
  virtual bool TakesLateMass(int64_t /*layer*/, const LayerPlan& /*plan*/) { return false; }
  virtual void LateMass(int64_t /*layer*/, const std::vector<std::vector<int32_t>>& /*blocks*/,
                        float* /*lse*/, std::vector<std::vector<float>>* /*mass*/) {}
  // Scores the candidate blocks where this executor keeps representatives (scores: host
  // [kv_heads][n], as fast::ScoreBlocks); false: the planner scores them on the CPU.
  virtual bool Score(int64_t /*layer*/, const RepresentativeStore& /*reps*/, const ScoreArgs& /*a*/,
                     float* /*scores*/) {
    return false;
  }
  // Queries a.T >= 1 (a sparse prefill's chunk) over the key spans of each (token, KV head)
  // (engine/cpu/ops.h AttnSpans); lse: host [T, heads] or nullptr. false: not supported here.
  virtual bool Spans(int64_t /*layer*/, const float* /*q*/, const AttnArgs& /*a*/,
                     const KVLayerView& /*kv*/, const AttnSpans& /*spans*/, float* /*out*/,
                     float* /*lse*/) {
    return false;
  }
  // One chunk of a sparse prefill, as the planner decided it: each query p of a.T (from a.pos0)
  // attends Initial [0, init_end), the Context blocks blocks[h] of its KV head h (ascending, the
  // same count for every head) and Local [local_begin, p]; with inv_freq (--pos-remap block) at
  // AppendQuerySpans' remapped positions. The same keys as the spans Spans would get.
  struct Chunk {
    int64_t init_end, local_begin;
    const std::vector<std::vector<int32_t>>* blocks;  // [kv_head]
    const float* inv_freq;                            // [head_dim / 2] or nullptr (no remap)
  };
  // A sparse prefill chunk's queries a (a.pos0 .. + a.T) combined as scoring combines them
  // (GroupQueries: qa, qb [kv_heads, D]), rotated first by the chunk's score shift where
  // SparseAttention::PrefillChunks says so; false: the planner combines its host queries.
  virtual bool ChunkQueries(int64_t /*layer*/, const AttnArgs& /*a*/, float* /*qa*/,
                            float* /*qb*/) {
    return false;
  }
  // Attends one sparse prefill chunk (q, out, lse as Spans'); false: not here (the planner
  // builds the spans and calls Spans).
  virtual bool PrefillChunk(int64_t /*layer*/, const float* /*q*/, const AttnArgs& /*a*/,
                            const KVLayerView& /*kv*/, const Chunk& /*chunk*/, float* /*out*/,
                            float* /*lse*/) {
    return false;
  }
  // A block with its score, as selection ranks them: higher score first, then lower id.
  struct Scored {
    float score;
    int32_t block;
  };
  // A sparse prefill chunk a (a.pos0: its first query) marked executor_top by
  // SparseAttention::PrefillChunkScoring: the shortlist of its candidates scored with its
  // combined queries (ChunkQueries'), SparseAttention::ChunkShortlist's size, as ScoreTop's.
  // false: not scored here (the planner scores them).
  virtual bool ChunkTop(int64_t /*layer*/, const AttnArgs& /*a*/,
                        std::vector<std::vector<Scored>>* /*top*/) {
    return false;
  }
  // Scores the candidates and keeps only the `want` best of each KV head (sum_heads: of their
  // scores summed over KV heads, in head order, one row), where the scores are (so that only the
  // shortlist comes back). top: [rows] lists of min(want, n) entries, in any order. false: not
  // supported (the planner calls Score, or scores on the CPU).
  virtual bool ScoreTop(int64_t /*layer*/, const RepresentativeStore& /*reps*/,
                        const ScoreArgs& /*a*/, bool /*sum_heads*/, int64_t /*want*/,
                        std::vector<std::vector<Scored>>* /*top*/) {
    return false;
  }

  // A decode step's whole plan for one layer carried out where the KV lies (device placement:
  // scoring, selection with retention, the attention and retention's block masses, all on the
  // GPU), the host waiting for none of it. The rules are plan_rules.h'; the planner asks only
  // where they are all its rules need (SparseAttention::PlansOnExecutor).
  struct ExecutorPlan {
    int64_t init_blocks, ctx_end_block;  // the candidates: Context blocks [init_blocks, ctx_end)
    int64_t topk, retained;              // SparseConfig::topk and retained()
    int64_t shortlist;                   // the scoring's shortlist per row (ShortlistSize())
    bool by_layer;                       // SelectMode::kLayer: one selection for every KV head
    bool retain;                         // retention for the layer's next step
    // The retention to select with, where the planner holds it (the prompt's seed, or a step it
    // planned itself): [kv_head] ascending lists, or empty (none yet). nullptr: the executor's
    // own, from its previous step at this layer.
    const std::vector<std::vector<int32_t>>* seed;
  };
  // Whether PlanDecode may be asked (as a rule, for the whole sequence).
  virtual bool PlansDecode() const { return false; }
  // q, out: as Planned's (an executor that plans on the GPU reads its own copies; q may be
  // nullptr then). plan: when not nullptr, filled with the blocks selected and kept (waiting for
  // them); else left alone.
  virtual void PlanDecode(int64_t /*layer*/, const float* /*q*/, const AttnArgs& /*a*/,
                          const KVLayerView& /*kv*/, const RepresentativeStore& /*reps*/,
                          const ExecutorPlan& /*p*/, float* /*out*/, LayerPlan* /*plan*/) {}
  // The retention PlanDecode left for `layer` ([kv_heads] lists; empty: none), for a step the
  // planner makes itself.
  virtual void TakeRetention(int64_t /*layer*/, std::vector<std::vector<int32_t>>* /*retained*/) {}
};

// The CPU's executor: the backend's kernels over the cache the planner reads (the planner's own
// default; a base for executors that add to it).
class CpuPlanExecutor : public PlanExecutor {
 public:
  explicit CpuPlanExecutor(Backend& b) : b_(b) {}
  void Dense(int64_t, const float* q, const AttnArgs& a, const KVLayerView& kv, float* out,
             float* lse) override {
    b_.Attention(q, kv, a, nullptr, out, lse);
  }
  bool Planned(int64_t, const float* q, const AttnArgs& a, const KVLayerView& kv,
               const LayerPlan& plan, float* out, float* lse,
               std::vector<std::vector<float>>*) override {
    plan.ToSpans(a.kv_heads, &spans_, a.inv_freq, a.head_dim);
    b_.Attention(q, kv, a, &spans_, out, lse);
    return false;
  }
  bool Spans(int64_t, const float* q, const AttnArgs& a, const KVLayerView& kv,
             const AttnSpans& spans, float* out, float* lse) override {
    b_.Attention(q, kv, a, &spans, out, lse);
    return true;
  }

 private:
  Backend& b_;
  AttnSpans spans_;
};

class SparseAttention final : public AttentionPolicy {
 public:
  // max_tokens: the KV cache capacity; kv_type decides the representatives' storage.
  SparseAttention(const ModelConfig& model, const SparseConfig& cfg, Backend& backend,
                  ThreadingContext& tc, int64_t max_tokens, DType kv_type);

  void BeginStep(const StepInfo& s) override {
    step_ = s;
    if (s.call_T == 1) ++decode_step_;
  }
  void Attend(int64_t layer, const float* q, const AttnArgs& a, KVCache& cache,
              float* out) override;
  void Reset();  // for a new sequence in the same cache
  // AttentionPolicy::Rewind: as Reset, but the representatives of the whole blocks below
  // `tokens` stay, as AdoptRepresentatives would take them from another planner over the same
  // keys (no Dynamic ones: they follow each prompt's observation window). The answer is the one
  // the sequence gets alone where `tokens` is within SparseConfig::ShareablePrefix, as for a
  // shared prefix.
  void Rewind(KVCache& cache, int64_t tokens) override;
  // Where the plan runs (nullptr: the backend's kernels over the cache Attend is given). The
  // planner itself always reads the cache Attend is given, in host memory.
  void set_executor(PlanExecutor* e) { exec_ = e != nullptr ? e : &cpu_exec_; }
  // Indexes a cache filled by other means (benchmarks): the representatives of every full
  // block of `layer` as if a prompt of cache.size() tokens had been prefilled (not Dynamic).
  void IndexContext(int64_t layer, const KVCache& cache);
  const RepresentativeStore& representatives() const { return reps_; }
  // A shared prefix's representatives: takes those of blocks [the first Context block,
  // end_block) that `from` has ready, computed by a planner of settings from_cfg over the same
  // keys (another sequence's, or kept with a prefix's blocks), instead of computing them from the
  // keys again; returns how many blocks (of every layer together). None where they would differ:
  // Dynamic representatives (they follow each prompt's observation window), another block
  // size, remap or kind of store.
  int64_t AdoptRepresentatives(const RepresentativeStore& from, const SparseConfig& from_cfg,
                               int64_t end_block);
  int64_t adopted_blocks() const { return adopted_; }
  // What the representatives are computed as (for a KV file's extra section: its meta): those
  // of another planner with the same text are the same for the same keys.
  std::string RepresentativesKind() const;
  // Whether Attend(layer) at this decode step (a.pos0) will ask its executor for a shortlist
  // (PlanExecutor::ScoreTop) of the candidate blocks [*first, *end), with `*want` and
  // `*sum_heads`: so that an executor may start it early. False when the layer attends densely,
  // reuses an earlier selection, or ranks preselected candidates.
  bool WillShortlist(int64_t layer, const AttnArgs& a, int64_t* first, int64_t* end, int64_t* want,
                     bool* sum_heads) const;
  // Whether the decode query a.pos0 of `layer` attends a plan (Initial + Context blocks + Local)
  // rather than every key: a sparse layer with a Context region at that position.
  bool AttendsPlan(int64_t layer, const AttnArgs& a) const {
    const int64_t B = cfg_.block_size;
    return !DenseLayer(layer, a) && cfg_.LocalBegin(a.pos0) / B > cfg_.init_end() / B;
  }
  // Whether Attend(layer) at this decode step hands the whole plan to its executor
  // (PlanExecutor::PlanDecode): it plans one (AttendsPlan), the executor can, and every rule the
  // plan needs is plan_rules.h' (Max, Mean or Quest representatives; no preselection, re-ranking,
  // remapping, token_step / layer_step reuse or --attn-recall). Attend then reads neither q nor
  // the layer's new keys on the host: the new block's representatives wait until it joins the
  // Context (EnsureRepresentatives).
  bool PlansOnExecutor(int64_t layer, const AttnArgs& a) const;
  // Whether a decode step at `layer` reads its query's lse on the host (Dynamic representatives'
  // window, --attn-recall); when not, a dense layer's executor need not return it.
  bool ReadsDecodeLse() const { return cfg_.repr == ReprType::kDynamic || recall_; }

  // Diagnostics.
  void set_recall(bool on) { recall_ = on; }
  void set_plan_sink(std::ostream* os) { plan_sink_ = os; }
  // Per layer: mean over decode steps and query heads of the fraction of the full attention's
  // probability mass that fell on the attended keys (1 for dense steps); -1 when never measured.
  std::vector<double> RecallPerLayer() const;
  // Watches tokens [begin, end) (an answer's place in the prompt): per layer, the mean over the
  // prompt's last query and every decode step of the share of KV heads that attended them (an
  // Initial, Local or selected block holding one of them); -1 when never measured. end <= begin:
  // off.
  void set_watch(int64_t begin, int64_t end);
  std::vector<double> WatchPerLayer() const;
  const LayerPlan& last_plan(int64_t layer) const { return last_plan_[layer]; }
  // --prefill sparse: the chunks of a prompt micro-batch a (at this step), in order: queries
  // [c0, c0 + n); whether the chunk selects Context blocks (scores) and, with --pos-remap, the
  // shift its scoring queries are rotated by (else 0).
  struct ChunkSpec {
    int64_t c0, n;
    bool scores;
    int64_t score_shift;
    // The candidate Context blocks [cand_first, cand_end) of a chunk that scores; executor_top:
    // an executor may score them where the queries are (PrefillChunkScoring said so).
    int64_t cand_first = 0, cand_end = 0;
    bool executor_top = false;
    // The best-scored candidates re-ranked by their best key (SparseConfig::rescore_blocks; the
    // prompt's last query, selecting alone: RescoreLast()).
    int64_t rescore = 0;
  };
  std::vector<ChunkSpec> PrefillChunks(const AttnArgs& a) const;
  // PrefillChunks for an executor that scores chunks where their queries are (PlanExecutor::
  // ChunkTop): computes the representatives of the candidates of every chunk whose candidates
  // all precede the micro-batch (their keys are in kv, the planner's cache), and marks those
  // chunks executor_top; the shortlist to return is ChunkShortlist's (with re-ranking, the
  // candidates to re-rank, which the planner then reads with ChunkQueries' sums).
  std::vector<ChunkSpec> PrefillChunkScoring(int64_t layer, const AttnArgs& a,
                                             const KVLayerView& kv);
  // The shortlist an executor returns for a chunk: `want` best of each KV head, or (sum_heads)
  // one row of the scores summed over KV heads.
  void ChunkShortlist(int64_t* want, bool* sum_heads) const {
    *want = std::max(cfg_.topk, cfg_.rescore_blocks);
    *sum_heads = cfg_.select == SelectMode::kLayer;
  }
  const SparseConfig& config() const { return cfg_; }
  // Host time of the planner's decode work, summed over steps and layers (seconds).
  struct Times {
    double reps = 0;    // representatives of blocks that joined the Context
    double select = 0;  // scoring and top-k
    double retain = 0;  // the attention mass of the selected blocks (retention)
  };
  const Times& times() const { return times_; }

 private:
  struct Selection {
    bool valid = false;
    int64_t step = 0;
    int64_t ctx_end_block = 0;
    std::vector<std::vector<int32_t>> blocks;
  };
  void Prefill(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv, float* out);
  void EndOfPrompt(int64_t layer, const AttnArgs& a, const KVLayerView& kv);
  // --prefill sparse: the micro-batch's queries in chunks, each over Initial + the chunk's topk
  // Context blocks + the Local window before it + itself (lse: [T, heads] or nullptr).
  void SparsePrefill(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv,
                     float* out, float* lse);
  void Decode(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv, float* out);
  // relative_freq: RelativeFreq(a) (--pos-remap: block-relative representatives).
  void EnsureRepresentatives(int64_t layer, const KVLayerView& kv, int64_t from_block,
                             int64_t to_block, float scale, const float* relative_freq);
  // --pos-remap: the call's RoPE frequencies (an error without them); else nullptr.
  const float* RelativeFreq(const AttnArgs& a) const;
  // --pos-remap: the T queries q [T, heads, D] rotated by RemapScoreShift(lb), for scoring
  // against block-relative representatives (in score_q_, valid until the next call).
  const float* ScoringQueries(const float* q, int64_t T, const AttnArgs& a, int64_t lb);
  void SelectBlocks(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv,
                    int64_t ctx_end_block, LayerPlan* plan);
  // The candidates of each row an executor's shortlist must keep: topk (or rescore_blocks, to be
  // re-ranked by their best key), plus the retained blocks it may include (which are skipped).
  int64_t ShortlistSize() const {
    return std::max(cfg_.topk, cfg_.rescore_blocks) + cfg_.retained();
  }
  // The layer whose Selection `layer` uses (the first of its group of layer_step).
  int64_t SelectorOf(int64_t layer) const {
    const int64_t rel = layer - cfg_.dense_layers;
    return cfg_.dense_layers + rel / cfg_.layer_step * cfg_.layer_step;
  }
  // Whether `layer` makes a fresh selection at decode step `step` (else it reuses its selector's):
  // always without a valid one, else in a selector layer once token_step steps have passed.
  bool SelectsAt(int64_t layer, int64_t step) const {
    const Selection& s = sel_[SelectorOf(layer)];
    return !s.valid ||
           ((layer - cfg_.dense_layers) % cfg_.layer_step == 0 && step - s.step >= cfg_.token_step);
  }
  // Layers that attend densely at every step: the first dense_layers and sliding-window ones.
  // With sparse prefill, the first dense_layers only while the queries stay within the model's
  // trained length (so that every query's attended set stays bounded).
  bool DenseLayer(int64_t layer, const AttnArgs& a) const {
    if (a.window > 0) return true;
    if (layer >= cfg_.dense_layers) return false;
    return !cfg_.sparse_prefill || a.pos0 + a.T <= model_.max_position_embeddings;
  }
  // retained_[layer] from the softmax mass that query q (lse: its log-sum-exp over the keys it
  // attended) put on `blocks` ([kv_head][n]).
  // have_mass: mass_ holds them already (the executor's). remapped: `blocks` are the selection
  // of a query attended with position remapping (a decode step's, or a sparse prefill's last
  // query's): the masses then use the same rotations.
  // Counts one query's attended set for set_watch (dense: every key).
  void Watch(int64_t layer, const std::vector<std::vector<int32_t>>& blocks, int64_t init_end,
             int64_t local_begin, bool dense);
  void Retain(int64_t layer, const float* q, const float* lse, const AttnArgs& a,
              const KVLayerView& kv, const std::vector<std::vector<int32_t>>& blocks,
              bool have_mass = false, bool remapped = false);

  // Reset's and Rewind's: every state of the sequence but the representatives of blocks < keep.
  void ForgetFrom(int64_t keep);

  ModelConfig model_;
  SparseConfig cfg_;
  Backend& b_;
  CpuPlanExecutor cpu_exec_{b_};
  PlanExecutor* exec_ = &cpu_exec_;
  ThreadingContext& tc_;
  StepInfo step_;
  int64_t decode_step_ = -1;
  RepresentativeStore reps_;
  int64_t adopted_ = 0;              // representatives taken by AdoptRepresentatives
  std::vector<QueryWindow> window_;  // [layer]
  std::vector<std::vector<std::vector<uint8_t>>> presel_;  // [layer][kv_head][block]
  std::vector<int64_t> presel_end_;                        // [layer]: blocks >= this are candidates
  std::vector<Selection> sel_;                             // [layer group]
  std::vector<float> score_rot_, score_q_;  // ScoringQueries' rotation row and queries
  // EnsureRepresentatives: [from, to) known ready at the layer's version ver. [layer]
  std::vector<int64_t> ensured_from_, ensured_to_;
  int64_t watch_begin_ = 0, watch_end_ = 0;
  std::vector<double> watch_sum_;
  std::vector<int64_t> watch_n_;
  std::vector<uint64_t> ensured_ver_;
  std::vector<LayerPlan> last_plan_;  // [layer]
  bool recall_ = false;
  std::vector<double> recall_sum_;
  std::vector<int64_t> recall_n_;
  std::ostream* plan_sink_ = nullptr;
  Times times_;
  std::vector<float> scratch_out_, scratch_lse_, lse_;
  // [layer][kv_head]: the blocks with the most attention mass at the layer's last sparse step.
  std::vector<std::vector<std::vector<int32_t>>> retained_;
  // [layer]: whether the layer's retention is the executor's (PlanDecode kept it), not retained_.
  std::vector<uint8_t> retained_on_exec_;
  // Decode through PlanDecode; plan: the LayerPlan to fill (its blocks read back when a
  // diagnostic reads them).
  void PlanOnExecutor(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv,
                      int64_t ctx_end_block, float* out, LayerPlan* plan);
  // [layer]: the blocks whose retention waits for PlanExecutor::LateMass (empty: none).
  std::vector<std::vector<std::vector<int32_t>>> late_blocks_;
  void FinishLateMass(int64_t layer, const AttnArgs& a, const KVLayerView& kv);
  std::vector<std::vector<float>> mass_;  // [kv_head][selected block]: scratch
  std::vector<int32_t> all_;  // SelectBlocks' candidates, kept: consecutive blocks from the first
  std::vector<float> prefill_lse_;  // [T, heads] of the prompt's last micro-batch
  // --prefill sparse: the Context blocks the prompt's last query attended ([kv_head][n]; empty
  // when it selected none), from which its masses seed retention.
  std::vector<std::vector<int32_t>> last_query_sel_;
};

}  // namespace needle
