#include "sparse_attn/sparse_attention.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>

#include "engine/base/error.h"
#include "engine/base/seconds.h"
#include "sparse_attn/best_key.h"
#include "sparse_attn/block_mass.h"
#include "sparse_attn/plan_rules.h"
#include "sparse_attn/scoring.h"

namespace needle {

SparseAttention::SparseAttention(const ModelConfig& model, const SparseConfig& cfg,
                                 Backend& backend, ThreadingContext& tc, int64_t max_tokens,
                                 DType kv_type)
    : model_(model),
      cfg_(cfg),
      b_(backend),
      tc_(tc),
      reps_(model.num_layers, model.num_kv_heads, model.head_dim,
            (max_tokens + cfg.block_size - 1) / cfg.block_size, cfg.repr,
            kv_type == DType::kF32 ? DType::kF32 : DType::kBF16) {
  cfg_.Validate();
  for (int64_t l = 0; l < model.num_layers; ++l)
    window_.emplace_back(cfg.obs_window, model.num_heads, model.head_dim);
  presel_.resize(static_cast<size_t>(model.num_layers));
  presel_end_.assign(static_cast<size_t>(model.num_layers), 0);
  sel_.resize(static_cast<size_t>(model.num_layers));
  retained_.resize(static_cast<size_t>(model.num_layers));
  late_blocks_.resize(static_cast<size_t>(model.num_layers));
  retained_on_exec_.assign(static_cast<size_t>(model.num_layers), 0);
  last_plan_.resize(static_cast<size_t>(model.num_layers));
  recall_sum_.assign(static_cast<size_t>(model.num_layers), 0.0);
  recall_n_.assign(static_cast<size_t>(model.num_layers), 0);
  ensured_from_.assign(static_cast<size_t>(model.num_layers), 0);
  ensured_to_.assign(static_cast<size_t>(model.num_layers), 0);
  ensured_ver_.assign(static_cast<size_t>(model.num_layers), ~uint64_t{0});
}

void SparseAttention::Reset() { ForgetFrom(0); }

void SparseAttention::Rewind(KVCache& cache, int64_t tokens) {
  cache.Truncate(tokens);
  ForgetFrom(cfg_.repr == ReprType::kDynamic ? 0 : tokens / cfg_.block_size);
}

void SparseAttention::ForgetFrom(int64_t keep) {
  for (int64_t l = 0; l < model_.num_layers; ++l) {
    reps_.Invalidate(l, keep);
    window_[l].Clear();
    presel_[l].clear();
    presel_end_[l] = 0;
  }
  for (auto& s : sel_) s = Selection{};
  for (auto& r : retained_) r.clear();
  for (auto& b : late_blocks_) b.clear();
  std::fill(retained_on_exec_.begin(), retained_on_exec_.end(), 0);
  decode_step_ = -1;
}

void SparseAttention::IndexContext(int64_t layer, const KVCache& cache) {
  if (cfg_.repr == ReprType::kDynamic) Fail("IndexContext: Dynamic representatives need a prefill");
  if (cfg_.pos_remap)
    Fail("IndexContext: --pos-remap block needs a prefill (the RoPE frequencies)");
  const KVLayerView kv = cache.Layer(layer);
  const int64_t B = cfg_.block_size, first = cfg_.init_end() / B, end = cache.size() / B;
  tc_.ParallelFor(static_cast<size_t>(std::max<int64_t>(0, end - first)), 16,
                  [&](size_t b, size_t e) {
                    for (size_t i = b; i < e; ++i)
                      reps_.ComputeFromKeys(layer, first + static_cast<int64_t>(i), kv);
                  });
}

void SparseAttention::set_watch(int64_t begin, int64_t end) {
  watch_begin_ = begin, watch_end_ = end;
  watch_sum_.assign(static_cast<size_t>(model_.num_layers), 0.0);
  watch_n_.assign(static_cast<size_t>(model_.num_layers), 0);
}

std::vector<double> SparseAttention::WatchPerLayer() const {
  std::vector<double> r(watch_sum_.size(), -1.0);
  for (size_t l = 0; l < r.size(); ++l)
    if (watch_n_[l] > 0) r[l] = watch_sum_[l] / static_cast<double>(watch_n_[l]);
  return r;
}

void SparseAttention::Watch(int64_t layer, const std::vector<std::vector<int32_t>>& blocks,
                            int64_t init_end, int64_t local_begin, bool dense) {
  if (watch_end_ <= watch_begin_ || watch_sum_.empty()) return;
  const int64_t B = cfg_.block_size;
  const bool always = dense || watch_begin_ < init_end || watch_end_ > local_begin;
  double hit = 0;
  for (const auto& hb : blocks) {
    bool h = always;
    for (int32_t b : hb)
      h = h || (int64_t{b} * B < watch_end_ && (int64_t{b} + 1) * B > watch_begin_);
    hit += h ? 1.0 : 0.0;
  }
  watch_sum_[layer] +=
      blocks.empty() ? (always ? 1.0 : 0.0) : hit / static_cast<double>(blocks.size());
  watch_n_[layer] += 1;
}

std::vector<double> SparseAttention::RecallPerLayer() const {
  std::vector<double> r(recall_sum_.size(), -1.0);
  for (size_t l = 0; l < r.size(); ++l)
    if (recall_n_[l] > 0) r[l] = recall_sum_[l] / static_cast<double>(recall_n_[l]);
  return r;
}

void SparseAttention::Attend(int64_t layer, const float* q, const AttnArgs& a, KVCache& cache,
                             float* out) {
  // The keys of this step are written already (the cache's size counts them only after it).
  KVLayerView kv = cache.Layer(layer);
  kv.n_tokens = a.pos0 + a.T;
  if (step_.call_T > 1)
    Prefill(layer, q, a, kv, out);
  else
    Decode(layer, q, a, kv, out);
}

void SparseAttention::Prefill(int64_t layer, const float* q, const AttnArgs& a,
                              const KVLayerView& kv, float* out) {
  // The prompt's last query seeds retention (below): keep the lse of the last micro-batch.
  const bool seed = step_.last_of_call && cfg_.retained() > 0 && !DenseLayer(layer, a);
  if (seed) prefill_lse_.resize(static_cast<size_t>(a.T * a.heads));
  last_query_sel_.clear();
  if (cfg_.sparse_prefill && !DenseLayer(layer, a)) {
    SparsePrefill(layer, q, a, kv, out, seed ? prefill_lse_.data() : nullptr);
  } else {
    exec_->Dense(layer, q, a, kv, out, seed ? prefill_lse_.data() : nullptr);
    if (step_.last_of_call) Watch(layer, {}, 0, 0, true);  // the prompt's last query: every key
  }
  // The observation window keeps the prompt's last queries (their lse is computed at the end):
  // only those of this micro-batch that can still be among them (a full window moves every row
  // of it with each push: pushing every micro-batch's last queries cost the 7B hybrid prefill
  // about 6 ms a layer and micro-batch).
  QueryWindow& w = window_[layer];
  const int64_t call_end = step_.call_pos0 + step_.call_T;
  for (int64_t t =
           std::max<int64_t>({0, a.T - cfg_.obs_window, call_end - cfg_.obs_window - a.pos0});
       t < a.T; ++t)
    w.Push(q + t * a.heads * a.head_dim, nullptr, a.pos0 + t);
  const int64_t B = cfg_.block_size, end = a.pos0 + a.T;
  if (cfg_.repr != ReprType::kDynamic) {
    // Representatives of every block this step filled (Initial blocks never compete), blocks in
    // parallel (each writes only its own).
    const int64_t b0 = std::max(a.pos0 / B, cfg_.init_end() / B), b1 = end / B;
    const float* rel = RelativeFreq(a);
    if (b1 > b0)
      tc_.ParallelFor(static_cast<size_t>(b1 - b0), 1, [&](size_t x, size_t y) {
        for (size_t i = x; i < y; ++i)
          reps_.ComputeFromKeys(layer, b0 + static_cast<int64_t>(i), kv, rel);
      });
  }
  if (step_.last_of_call) EndOfPrompt(layer, a, kv);
  const int64_t first_ctx_end = cfg_.LocalBegin(end) / B;  // Context of the first decode step
  if (seed && first_ctx_end > cfg_.init_end() / B) {
    // Seed retention for the first decode step with the blocks the prompt's last query (which
    // predicted the first answer token) attended most: of a dense prefill, every Context block;
    // of a sparse one, the blocks it selected, their masses as it attended them (remapped).
    AttnArgs la = a;
    la.T = 1;
    la.pos0 = end - 1;
    const float* lq = q + (a.T - 1) * a.heads * a.head_dim;
    const float* llse = prefill_lse_.data() + (a.T - 1) * a.heads;
    if (!last_query_sel_.empty()) {
      Retain(layer, lq, llse, la, kv, last_query_sel_, false,
             cfg_.pos_remap && a.inv_freq != nullptr);
    } else {
      std::vector<int32_t> ctx;
      for (int64_t blk = cfg_.init_end() / B; blk < first_ctx_end; ++blk)
        ctx.push_back(static_cast<int32_t>(blk));
      Retain(layer, lq, llse, la, kv,
             std::vector<std::vector<int32_t>>(static_cast<size_t>(kv.kv_heads), ctx));
    }
  }
}

void SparseAttention::EndOfPrompt(int64_t layer, const AttnArgs& a, const KVLayerView& kv) {
  const int64_t B = cfg_.block_size, P = a.pos0 + a.T, init_blocks = cfg_.init_end() / B;
  QueryWindow& w = window_[layer];
  const bool need_votes = cfg_.repr == ReprType::kDynamic || cfg_.preselect_blocks > 0;
  if (need_votes && w.size() > 0) {
    // lse of the window queries over everything they see (consecutive positions).
    AttnArgs wa = a;
    wa.T = w.size();
    wa.pos0 = w.pos().front();
    scratch_out_.resize(static_cast<size_t>(wa.T * a.heads * a.head_dim));
    b_.Attention(w.q().data(), kv, wa, nullptr, scratch_out_.data(), w.lse().data());
    std::vector<float> votes;
    ObservationVotes(kv, w, a.heads, a.scale, 0, P, tc_, &votes);
    if (cfg_.repr == ReprType::kDynamic) {
      std::vector<float> bv(static_cast<size_t>(kv.kv_heads * B));
      for (int64_t blk = init_blocks; blk < P / B; ++blk) {
        for (int64_t h = 0; h < kv.kv_heads; ++h)
          std::copy_n(votes.data() + h * P + blk * B, B, bv.data() + h * B);
        reps_.ComputeDynamic(layer, blk, kv, bv.data(), cfg_.repr_count);
      }
    }
    if (cfg_.preselect_blocks > 0) {
      const int64_t ctx_end_block = cfg_.LocalBegin(P - 1) / B;
      presel_[layer] = Preselect(votes, kv.kv_heads, P, B, init_blocks, ctx_end_block,
                                 cfg_.preselect_blocks, cfg_.preselect_pool, cfg_.select);
      presel_end_[layer] = ctx_end_block;
    }
  }
  w.Clear();  // from here on the window collects decode queries
}

const float* SparseAttention::RelativeFreq(const AttnArgs& a) const {
  if (!cfg_.pos_remap) return nullptr;
  if (a.inv_freq == nullptr) Fail("--pos-remap: the attention call carries no RoPE frequencies");
  return a.inv_freq;
}

const float* SparseAttention::ScoringQueries(const float* q, int64_t T, const AttnArgs& a,
                                             int64_t lb) {
  const int64_t D = a.head_dim, rows = T * a.heads;
  score_rot_.resize(static_cast<size_t>(D));
  score_q_.resize(static_cast<size_t>(rows * D));
  RotationRow(cfg_.RemapScoreShift(lb), RelativeFreq(a), D, score_rot_.data());
  RotateRows(q, rows, D, score_rot_.data(), score_q_.data());
  return score_q_.data();
}

std::string SparseAttention::RepresentativesKind() const {
  return std::string("{\"repr\":\"") + ReprTypeName(cfg_.repr) + "\",\"storage\":\"" +
         DTypeName(reps_.storage()) + "\",\"block_size\":" + std::to_string(cfg_.block_size) +
         ",\"pos_remap\":" + (cfg_.pos_remap ? "true" : "false") + "}";
}

int64_t SparseAttention::AdoptRepresentatives(const RepresentativeStore& from,
                                              const SparseConfig& from_cfg, int64_t end_block) {
  if (cfg_.repr == ReprType::kDynamic || from_cfg.repr != cfg_.repr ||
      from_cfg.block_size != cfg_.block_size || from_cfg.pos_remap != cfg_.pos_remap ||
      !reps_.SameKind(from))
    return 0;
  int64_t n = 0;
  const int64_t last = std::min({end_block, from.max_blocks(), reps_.max_blocks()});
  for (int64_t layer = 0; layer < reps_.layers(); ++layer)
    for (int64_t b = cfg_.init_end() / cfg_.block_size; b < last; ++b)
      if (from.ready(layer, b) && !reps_.ready(layer, b)) reps_.CopyBlock(from, layer, b, b), ++n;
  adopted_ += n;
  return n;
}

void SparseAttention::EnsureRepresentatives(int64_t layer, const KVLayerView& kv,
                                            int64_t from_block, int64_t to_block, float scale,
                                            const float* relative_freq) {
  const int64_t B = cfg_.block_size;
  // Blocks [ensured_from_, ensured_to_) were all ready when the layer was at ensured_ver_ (only
  // a change to the layer makes one not ready): look at the rest only (O(new blocks) a step).
  const size_t l = static_cast<size_t>(layer);
  const bool known = reps_.version(layer) == ensured_ver_[l] && from_block >= ensured_from_[l] &&
                     from_block <= ensured_to_[l];
  if (!known) ensured_from_[l] = from_block, ensured_to_[l] = from_block;
  for (int64_t blk = std::max(from_block, ensured_to_[l]); blk < to_block; ++blk) {
    if (reps_.ready(layer, blk)) continue;
    if (cfg_.repr != ReprType::kDynamic) {
      reps_.ComputeFromKeys(layer, blk, kv, relative_freq);
    } else {
      // A block that filled during decode: its tokens were in every recent query's Local region.
      std::vector<float> votes;
      ObservationVotes(kv, window_[layer], model_.num_heads, scale, blk * B, (blk + 1) * B, tc_,
                       &votes);
      reps_.ComputeDynamic(layer, blk, kv, votes.data(), cfg_.repr_count);
    }
  }
  ensured_to_[l] = std::max(ensured_to_[l], to_block);
  ensured_ver_[l] = reps_.version(layer);
}

bool SparseAttention::WillShortlist(int64_t layer, const AttnArgs& a, int64_t* first, int64_t* end,
                                    int64_t* want, bool* sum_heads) const {
  if (a.T != 1 || !AttendsPlan(layer, a) || !SelectsAt(layer, decode_step_) ||
      !presel_[layer].empty())
    return false;
  *first = cfg_.init_end() / cfg_.block_size, *end = cfg_.LocalBegin(a.pos0) / cfg_.block_size;
  *want = ShortlistSize();
  *sum_heads = cfg_.select == SelectMode::kLayer;
  return true;
}

bool SparseAttention::PlansOnExecutor(int64_t layer, const AttnArgs& a) const {
  return a.T == 1 && step_.call_T == 1 && exec_->PlansDecode() && AttendsPlan(layer, a) &&
         cfg_.repr != ReprType::kDynamic && !cfg_.pos_remap && cfg_.rescore_blocks == 0 &&
         cfg_.token_step == 1 && cfg_.layer_step == 1 && presel_[layer].empty() && !recall_;
}

void SparseAttention::PlanOnExecutor(int64_t layer, const float* q, const AttnArgs& a,
                                     const KVLayerView& kv, int64_t ctx_end_block, float* out,
                                     LayerPlan* plan) {
  const int64_t init_blocks = cfg_.init_end() / cfg_.block_size;
  auto t = Clock::now();
  EnsureRepresentatives(layer, kv, init_blocks, ctx_end_block, a.scale, nullptr);
  times_.reps += Since(t);
  t = Clock::now();
  const auto l = static_cast<size_t>(layer);
  const bool seed = retained_on_exec_[l] == 0;
  PlanExecutor::ExecutorPlan p{init_blocks,         ctx_end_block,
                               cfg_.topk,           cfg_.retained(),
                               ShortlistSize(),     cfg_.select == SelectMode::kLayer,
                               cfg_.retained() > 0, seed ? &retained_[l] : nullptr};
  // (The plan's blocks come back only for a reader of them: --dump-plan, set_watch.)
  const bool read = plan_sink_ != nullptr || (watch_end_ > watch_begin_ && !watch_sum_.empty());
  exec_->PlanDecode(layer, q, a, kv, reps_, p, out, read ? plan : nullptr);
  retained_on_exec_[l] = 1;
  plan->candidates = ctx_end_block - init_blocks;
  times_.select += Since(t);
}

void SparseAttention::SelectBlocks(int64_t layer, const float* q, const AttnArgs& a,
                                   const KVLayerView& kv, int64_t ctx_end_block, LayerPlan* plan) {
  const int64_t Hk = a.kv_heads, init_blocks = cfg_.init_end() / cfg_.block_size;
  Selection& s = sel_[SelectorOf(layer)];
  if (!late_blocks_[layer].empty()) FinishLateMass(layer, a, kv);
  if (SelectsAt(layer, decode_step_)) {
    // Candidates: Context blocks, restricted to the preselected set where there is one (blocks
    // that joined the Context after the prompt always compete).
    // (Kept between calls: every layer of a step, and most steps, have the same ones.)
    const auto n_all = static_cast<size_t>(std::max<int64_t>(0, ctx_end_block - init_blocks));
    if ((!all_.empty() && all_.front() != init_blocks) || all_.size() > n_all) all_.clear();
    for (size_t i = all_.size(); i < n_all; ++i)
      all_.push_back(static_cast<int32_t>(init_blocks + static_cast<int64_t>(i)));
    const std::vector<int32_t>& all = all_;
    const auto& ps = presel_[layer];
    const auto allowed = [&](int64_t h, int32_t blk) {
      return ps.empty() || blk >= presel_end_[layer] || ps[h][blk] != 0;
    };
    // One head's selection: the blocks kept for their attention mass at the previous step (still
    // Context and allowed), then the best-scored of the others up to topk. The others come from
    // `ids` / `sc` [n] (every candidate, or an executor's shortlist of the best).
    const bool by_layer = cfg_.select == SelectMode::kLayer;
    const float* rel = RelativeFreq(a);
    const float* sq = cfg_.pos_remap ? ScoringQueries(q, 1, a, cfg_.LocalBegin(a.pos0)) : q;
    const ScoreArgs sa{
        sq, 1, a.heads, Hk, a.head_dim, all.data(), static_cast<int64_t>(all.size())};
    // Re-ranking's combined queries, once for every row.
    std::vector<float> qs;
    if (cfg_.rescore_blocks > 0) {
      qs.resize(static_cast<size_t>(Hk * a.head_dim));
      std::vector<float> unused(qs.size());
      GroupQueries(sa, false, qs.data(), unused.data());
    }
    auto select = [&](int64_t h, const int32_t* cand, const float* sc, size_t n,
                      const std::vector<int32_t>* kept, std::vector<int32_t>* keep_out,
                      int64_t* ncand) {
      std::vector<int32_t> keep;
      keep.reserve(static_cast<size_t>(std::max<int64_t>(cfg_.retained(), 0)));
      if (kept != nullptr)
        for (int32_t blk : *kept)
          if (blk >= init_blocks && blk < ctx_end_block && allowed(h, blk) &&
              static_cast<int64_t>(keep.size()) < cfg_.retained())
            keep.push_back(blk);
      std::vector<int32_t> ids;
      std::vector<float> scores;
      ids.reserve(n), scores.reserve(n);
      *ncand = static_cast<int64_t>(keep.size());
      for (size_t i = 0; i < n; ++i) {
        if (!allowed(h, cand[i]) || std::find(keep.begin(), keep.end(), cand[i]) != keep.end())
          continue;
        ids.push_back(cand[i]);
        scores.push_back(sc[i]);
      }
      *ncand += static_cast<int64_t>(ids.size());
      std::vector<int32_t> out =
          RankCandidates(scores.data(), ids.data(), static_cast<int64_t>(ids.size()),
                         cfg_.topk - static_cast<int64_t>(keep.size()), cfg_.rescore_blocks, sa,
                         qs.data(), kv, rel, by_layer ? -1 : h, tc_);
      out.insert(out.end(), keep.begin(), keep.end());
      std::sort(out.begin(), out.end());
      *keep_out = std::move(keep);  // ascending, as `kept` is
      return out;
    };
    const bool retain = cfg_.retained() > 0 && retained_[layer].size() == static_cast<size_t>(Hk);
    // Where the executor can rank the candidates itself, only its best ShortlistSize() of each
    // row come back (topk, or rescore_blocks to re-rank, + retained): enough, since at most
    // `retained` of them are kept blocks, which the ranking skips (every candidate is allowed: no
    // preselection).
    std::vector<std::vector<PlanExecutor::Scored>> top;
    const bool shortlist =
        ps.empty() && exec_->ScoreTop(layer, reps_, sa, by_layer, ShortlistSize(), &top);
    std::vector<float> sc;       // [rows][n]: every candidate's score
    std::vector<int32_t> sl_id;  // [rows][want]: the shortlist
    std::vector<float> sl_sc;
    size_t row_n = all.size();
    if (shortlist) {
      row_n = top.empty() ? 0 : top[0].size();
      for (const auto& row : top) {
        NEEDLE_CHECK(row.size() == row_n);
        for (const auto& e : row) sl_id.push_back(e.block), sl_sc.push_back(e.score);
      }
    } else {
      sc.resize(static_cast<size_t>(Hk) * all.size());
      if (!exec_->Score(layer, reps_, sa, sc.data()))
        fast::ScoreBlocks(reps_, layer, sa, sc.data(), tc_);
      if (by_layer) SumOverHeads(sc.data(), Hk, static_cast<int64_t>(all.size()));
    }
    // Row r's candidates: ids and scores.
    const auto row_ids = [&](int64_t r) {
      return shortlist ? sl_id.data() + r * row_n : all.data();
    };
    const auto row_sc = [&](int64_t r) {
      return (shortlist ? sl_sc.data() : sc.data()) + r * row_n;
    };
    s.blocks.assign(static_cast<size_t>(Hk), {});
    plan->retained.assign(retain ? static_cast<size_t>(Hk) : 0, {});
    if (by_layer) {
      std::vector<int32_t> keep;
      // Layer mode: candidates as for head 0 (preselection is identical for every head then).
      s.blocks[0] = select(0, row_ids(0), row_sc(0), row_n, retain ? &retained_[layer][0] : nullptr,
                           &keep, &plan->candidates);
      for (auto& blk : s.blocks) blk = s.blocks[0];
      for (auto& r : plan->retained) r = keep;
    } else {
      // One selection per KV head (each is O(candidates)); in parallel only when there are enough
      // candidates to pay for waking the threads (tens of microseconds between GPU waits).
      std::vector<int64_t> ncand(static_cast<size_t>(Hk));
      std::vector<std::vector<int32_t>> keep(static_cast<size_t>(Hk));
      const auto run = [&](size_t hb, size_t he) {
        for (size_t h = hb; h < he; ++h) {
          const auto r = static_cast<int64_t>(h);
          s.blocks[h] = select(r, row_ids(r), row_sc(r), row_n,
                               retain ? &retained_[layer][h] : nullptr, &keep[h], &ncand[h]);
        }
      };
      if (static_cast<int64_t>(row_n) * Hk >= 65536)
        tc_.ParallelFor(static_cast<size_t>(Hk), 1, run);
      else
        run(0, static_cast<size_t>(Hk));
      plan->candidates = *std::max_element(ncand.begin(), ncand.end());
      if (retain) plan->retained = std::move(keep);
    }
    // A shortlist counted only itself: every candidate competed (no preselection).
    if (shortlist) plan->candidates = static_cast<int64_t>(all.size());
    s.valid = true;
    s.step = decode_step_;
    s.ctx_end_block = ctx_end_block;
    plan->blocks = s.blocks;
    return;
  }
  // Reuse: the earlier selection plus every block that joined the Context since.
  plan->reused = true;
  plan->blocks = s.blocks;
  for (auto& hb : plan->blocks)
    for (int64_t blk = s.ctx_end_block; blk < ctx_end_block; ++blk)
      hb.push_back(static_cast<int32_t>(blk));
}

void SparseAttention::Decode(int64_t layer, const float* q, const AttnArgs& a,
                             const KVLayerView& kv, float* out) {
  NEEDLE_CHECK(a.T == 1);
  const int64_t p = a.pos0, B = cfg_.block_size;
  LayerPlan plan;
  plan.step = decode_step_;
  plan.layer = layer;
  plan.pos = p;
  plan.block_size = B;
  plan.init_end = std::min(cfg_.init_end(), p + 1);
  plan.local_begin = cfg_.LocalBegin(p);
  const int64_t ctx_end_block = plan.local_begin / B, init_blocks = cfg_.init_end() / B;
  plan.dense = !AttendsPlan(layer, a);
  plan.remap = cfg_.pos_remap;
  lse_.resize(static_cast<size_t>(a.heads));
  bool want_mass = false, have_mass = false, late = false;
  const bool on_exec = !plan.dense && PlansOnExecutor(layer, a);
  if (!plan.dense && !on_exec && retained_on_exec_[static_cast<size_t>(layer)] != 0) {
    exec_->TakeRetention(layer, &retained_[static_cast<size_t>(layer)]);  // a step made here
    retained_on_exec_[static_cast<size_t>(layer)] = 0;
  }
  if (plan.dense) {
    exec_->Dense(layer, q, a, kv, out, ReadsDecodeLse() ? lse_.data() : nullptr);
  } else if (on_exec) {
    PlanOnExecutor(layer, q, a, kv, ctx_end_block, out, &plan);
  } else {
    auto t = Clock::now();
    EnsureRepresentatives(layer, kv, init_blocks, ctx_end_block, a.scale, RelativeFreq(a));
    times_.reps += Since(t);
    t = Clock::now();
    SelectBlocks(layer, q, a, kv, ctx_end_block, &plan);
    times_.select += Since(t);
    // Retention is read by this layer's next fresh selection: compute it only when the next step
    // makes one here (known once this step's selection is made).
    want_mass = cfg_.retained() > 0 && SelectsAt(layer, decode_step_ + 1);
    // (Dynamic representatives and --attn-recall read this step's lse now.)
    late = want_mass && cfg_.repr != ReprType::kDynamic && !recall_ &&
           exec_->TakesLateMass(layer, plan);
    have_mass = exec_->Planned(layer, q, a, kv, plan, out, lse_.data(),
                               want_mass && !late ? &mass_ : nullptr);
  }
  Watch(layer, plan.blocks, plan.init_end, plan.local_begin, plan.dense);
  if (late) {
    late_blocks_[layer] = plan.blocks;  // retention when the next selection here needs it
  } else if (!plan.dense && want_mass) {
    const auto t = Clock::now();
    Retain(layer, q, lse_.data(), a, kv, plan.blocks, have_mass,
           plan.remap && a.inv_freq != nullptr);
    times_.retain += Since(t);
  }
  if (cfg_.repr == ReprType::kDynamic) window_[layer].Push(q, lse_.data(), p);
  // (An executor's plan: the layer's keys of this step reach the host later; the block's
  // representatives are made when it joins the Context, EnsureRepresentatives.)
  // A block this token completed gets its representatives now (Dynamic ones wait until the block
  // joins the Context, so that the queries that attended it have voted).
  // (Not in dense layers: they never select, and the hybrid engine keeps their keys on the GPU
  // only.)
  if (!DenseLayer(layer, a) && !on_exec && cfg_.repr != ReprType::kDynamic && (p + 1) % B == 0 &&
      p + 1 > cfg_.init_end())
    reps_.ComputeFromKeys(layer, p / B, kv, RelativeFreq(a));
  if (recall_) {
    double mass = 1.0;
    if (!plan.dense) {
      // Attended mass = exp(lse over the attended keys - lse over all keys).
      scratch_out_.resize(static_cast<size_t>(a.heads * a.head_dim));
      scratch_lse_.resize(static_cast<size_t>(a.heads));
      b_.Attention(q, kv, a, nullptr, scratch_out_.data(), scratch_lse_.data());
      mass = 0.0;
      for (int64_t h = 0; h < a.heads; ++h)
        mass += std::exp(static_cast<double>(lse_[h]) - scratch_lse_[h]);
      mass /= static_cast<double>(a.heads);
    }
    recall_sum_[layer] += mass;
    recall_n_[layer] += 1;
  }
  if (plan_sink_ != nullptr) *plan_sink_ << plan.ToJson() << "\n";
  last_plan_[layer] = std::move(plan);
}

}  // namespace needle
