// Device placement's decode steps planned on the GPU (PlanExecutor::PlanDecode): the scoring's
// shortlist, the selection with retention (device_plan.h, the rules of sparse_attn/plan_rules.h),
// the attention over Initial + selected + Local through a block table per KV head (each head's
// selected blocks read where they lie in the layer's ring) and the next step's retention, all
// queued on the model's stream. The host waits for none of it: the step's only wait is the
// model's for its logits.
#include "engine/cuda/block_select.h"
#include "engine/cuda/device_plan.h"
#include "engine/cuda/hybrid_impl.h"

namespace needle {

namespace {
// Retention lists as the device keeps them, h: [kv_heads][R] blocks, then [kv_heads] counts
// (-1: no retention yet), into one list per KV head (none when there is no retention).
void RetentionLists(const int32_t* h, int64_t Hk, int64_t R,
                    std::vector<std::vector<int32_t>>* out) {
  out->clear();
  if (h[Hk * R] < 0) return;
  for (int64_t hh = 0; hh < Hk; ++hh) out->emplace_back(h + hh * R, h + hh * R + h[Hk * R + hh]);
}
}  // namespace

bool HybridAttention::Impl::PlansDecode() const {
  return (device_kv || (host_plan_on && HostPlanAttentionOk())) && gather_on && device_plan_on &&
         resident.slots() >= c.topk && c.topk + c.retained() <= cuda::kMaxDeviceShortlist;
}

bool HybridAttention::Impl::HostPlanAttentionOk() const {
  const KVCacheShape& s = host.shape();
  const int64_t G = m.num_heads / m.num_kv_heads;
  return (s.dtype == DType::kBF16 || s.dtype == DType::kF16) &&
         (m.head_dim == 64 || m.head_dim == 128) && G <= 8 && c.block_size % 32 == 0 &&
         c.block_size >= 64 && cc_major >= 9 && std::getenv("NEEDLE_CUDA_ATTN_DECODE") == nullptr;
}

int32_t* HybridAttention::Impl::DeviceRetention(int64_t layer, int64_t R) {
  const int64_t Hk = m.num_kv_heads, per = Hk * (R + 1);
  // (Sized once for every layer: the retention of each stays between steps.)
  return dp_ret.Get<int32_t>(static_cast<size_t>(m.num_layers * per)) + layer * per;
}

void HybridAttention::Impl::PlanDecode(int64_t layer, const float*, const AttnArgs& a,
                                       const KVLayerView&, const RepresentativeStore& reps,
                                       const ExecutorPlan& p, float*, LayerPlan* plan) {
  if (!device_kv) return PlanDecodeHost(layer, a, reps, p, plan);
  const int64_t Hk = a.kv_heads, G = a.heads / Hk, R = p.retained;
  const int64_t n = p.ctx_end_block - p.init_blocks, n_sel = std::min(p.topk, n);
  int32_t* ret = DeviceRetention(layer, R);  // [Hk][R], then rcount [Hk]
  int32_t* rcount = ret + Hk * R;
  const int64_t tiles = c.block_size % 32 == 0 ? c.block_size / 32 : 1;
  int32_t* lay = LayerPlanBuffers(layer, tiles);  // (sizes dp_pending too)
  PendingRetain& pend = dp_pending[static_cast<size_t>(layer)];
  if (pend.side) FlushRetention(layer);  // (before anything reads or writes the retention)
  SeedRetention(p, Hk, ret, &pend);
  Mark(kPlan);
  // The layer's own buffers (LayerPlanBuffers): this step's selection in the half the last
  // step's is not in, its blocks' sums [Hk][n_sel][tiles][G][2] (a block's in 32-key tiles where
  // the attention writes them, else whole) and the lse [heads]; scratch: kept [Hk][R], kcount
  // [Hk].
  const int cur = 1 - pend.half;
  int32_t* sel = lay + cur * Hk * c.topk;
  float* sums = reinterpret_cast<float*>(lay + 2 * Hk * c.topk);
  float* lse = sums + 2 * Hk * c.topk * tiles * G;
  int32_t* kept = dp_scratch.Get<int32_t>(static_cast<size_t>(Hk * (R + 1)));
  int32_t* kcount = kept + Hk * R;
  // The attention's view: per KV head, Initial + its selected blocks + Local; the selection
  // writes each head's Context entries (the blocks' slots in the ring) after the view's table is
  // queued. (Its extra slots are not used: the blocks the hybrid's host-planned steps keep there
  // stay valid.) The attention reads the rest of the table, and issues the Initial and Local
  // tiles, while the top-k runs (it launches the attention early: block_select.cu).
  AttnArgs a2;
  KVLayerView v = WindowView(layer, a, n_sel, &a2, true, true);
  const int64_t view_at = p.init_blocks;  // (the view's Initial blocks: its Context entries' start)
  v.table_step_lo = view_at * c.block_size, v.table_step_hi = (view_at + n_sel) * c.block_size;
  const KVLayerView ring = model_cache->Layer(layer);
  const cuda::SelectArgs sa =
      cuda::MakeSelectArgs(p.shortlist, std::min(p.shortlist, n), ret, rcount, R, p.init_blocks,
                           p.ctx_end_block, p.topk, Hk, p.by_layer, ring.table, n_sel, sel, kept,
                           kcount, const_cast<int32_t*>(v.table), v.table_head_stride, view_at);
  QueueSelection(layer, reps, p, sa, &pend);
  pend.half = cur;
  // Retention's block sums come with the attention (its decode kernel sums each tile of the
  // selected blocks, view keys [Initial, Initial + n_sel blocks)), or from a pass of their own.
  const bool tiled = AttendTiled(v, a2, out_dev, lse, p.retain ? tiles : 1, view_at * c.block_size,
                                 n_sel, sums) > 1;
  Mark(kAttend);
  if (p.retain) {
    if (!tiled)  // (the blocks where the view's table says)
      cuda::BlockStats(q_dev, v.k, v.dtype, n_sel, Hk, G, c.block_size, a.head_dim, a.scale, sums,
                       stream, v.table + view_at, v.table_head_stride);
    Mark(kSums);
    const cuda::RetainArgs ra = cuda::MakeRetainArgs(sel, n_sel, sums, tiled ? tiles : 1, lse, Hk,
                                                     G, p.by_layer, R, ret, rcount);
    QueueRetention(layer, ra, R, &pend);
  }
  FlushNextRetention(layer);
  stats.gpu_blocks += n_sel * Hk;
  if (plan == nullptr) return;
  // A reader of the plan (--dump-plan, set_watch): what the GPU selected and kept.
  std::vector<int32_t> h(static_cast<size_t>(Hk * (n_sel + R + 1)));
  NEEDLE_CUDA_CHECK(cudaMemcpyAsync(h.data(), sel, static_cast<size_t>(Hk * n_sel) * 4,
                                    cudaMemcpyDeviceToHost, stream));
  NEEDLE_CUDA_CHECK(cudaMemcpyAsync(h.data() + Hk * n_sel, kept,
                                    static_cast<size_t>(Hk * (R + 1)) * 4, cudaMemcpyDeviceToHost,
                                    stream));
  Sync(&stats.gpu_wait);
  plan->blocks.assign(static_cast<size_t>(Hk), {});
  for (int64_t hh = 0; hh < Hk; ++hh)
    plan->blocks[hh].assign(h.begin() + hh * n_sel, h.begin() + (hh + 1) * n_sel);
  RetentionLists(h.data() + Hk * n_sel, Hk, R, &plan->retained);
}

void HybridAttention::Impl::QueueSelection(int64_t layer, const RepresentativeStore& reps,
                                           const ExecutorPlan& p, const cuda::SelectArgs& sa,
                                           PendingRetain* pend) {
  const int64_t n = p.ctx_end_block - p.init_blocks;
  const float* vals = nullptr;
  const int32_t* ids = nullptr;
  // (The selection in the top-k's kernel where it fits, after the pending retention: one or two
  // launches fewer a layer.)
  const bool selected = scorer.QueueDeviceShortlist(
      layer, reps, p.init_blocks, n, p.by_layer, p.shortlist, q_dev, &vals, &ids,
      [this](int at) { Mark(at == 0 ? kUpload : kScore); }, &sa, pend->on ? &pend->args : nullptr);
  Mark(kTopk);
  if (!selected) {  // (the pending retention first: the selection reads it)
    FlushRetention(layer);
    cuda::SelectFromShortlist(vals, ids, p.shortlist, std::min(p.shortlist, n), sa, stream);
  }
  pend->on = false;
  Mark(kSelect);
}

void HybridAttention::Impl::SeedRetention(const ExecutorPlan& p, int64_t Hk, int32_t* ret,
                                          PendingRetain* pend) {
  if (p.seed == nullptr) return;  // (the executor's own, from the layer's last step)
  const int64_t R = p.retained;
  std::vector<int32_t> h(static_cast<size_t>(Hk * (R + 1)), 0);
  const bool has = p.seed->size() == static_cast<size_t>(Hk);
  for (int64_t hh = 0; hh < Hk; ++hh) {
    const int64_t cnt = has ? std::min<int64_t>(R, static_cast<int64_t>((*p.seed)[hh].size())) : -1;
    h[static_cast<size_t>(Hk * R + hh)] = static_cast<int32_t>(cnt);
    for (int64_t i = 0; i < cnt; ++i) h[static_cast<size_t>(hh * R + i)] = (*p.seed)[hh][i];
  }
  H2D(ret, h.data(), h.size() * 4);  // (pageable: staged before the call returns)
  pend->on = false;                  // (what it would have computed: replaced)
}

void HybridAttention::Impl::QueueRetention(int64_t layer, const cuda::RetainArgs& ra, int64_t R,
                                           PendingRetain* pend) {
  const auto l = static_cast<size_t>(layer);
  if (retain_stream != nullptr && R > 0) {  // beside the model's next kernels
    NEEDLE_CUDA_CHECK(cudaEventRecord(retain_ready[l], stream));
    NEEDLE_CUDA_CHECK(cudaStreamWaitEvent(retain_stream, retain_ready[l], 0));
    cuda::RetainByMass(ra, retain_stream);
    NEEDLE_CUDA_CHECK(cudaEventRecord(retain_done[l], retain_stream));
    pend->side = true;
  } else if (cuda::FusedSelectOn() && R > 0) {  // left to the next step's top-k kernel
    pend->on = true, pend->args = ra;
  } else {
    cuda::RetainByMass(ra, stream);
    Mark(kRetain);
  }
}

void HybridAttention::Impl::Mark(Phase ph) {
  if (!profile) return;
  if (marks_used == marks.size()) {
    marks.push_back(nullptr);
    NEEDLE_CUDA_CHECK(cudaEventCreate(&marks.back()));
    mark_phase.push_back(0);
  }
  mark_phase[marks_used] = ph;
  NEEDLE_CUDA_CHECK(cudaEventRecord(marks[marks_used++], stream));
}

void HybridAttention::Impl::CollectPhases() {
  if (marks_used > 1) {
    NEEDLE_CUDA_CHECK(cudaEventSynchronize(marks[marks_used - 1]));
    // (Each interval ends at its mark: the phase that mark closes. The step's first one, from
    // the step before, is not counted.)
    for (size_t i = 1; i < marks_used; ++i) {
      float ms = 0;
      NEEDLE_CUDA_CHECK(cudaEventElapsedTime(&ms, marks[i - 1], marks[i]));
      stats.gpu_phase[mark_phase[i]] += ms * 1e-3;
    }
  }
  marks_used = 0;
}

int32_t* HybridAttention::Impl::LayerPlanBuffers(int64_t layer, int64_t tiles) {
  const int64_t Hk = m.num_kv_heads, G = m.num_heads / Hk, K = c.topk;
  const int64_t per = 2 * Hk * K + 2 * Hk * K * tiles * G + m.num_heads;
  if (dp_pending.empty()) dp_pending.resize(static_cast<size_t>(m.num_layers));
  // (Sized once for every layer: a pending retention reads them at the layer's next step.)
  return dp_layers.Get<int32_t>(static_cast<size_t>(m.num_layers * per)) + layer * per;
}

void HybridAttention::Impl::FlushRetention(int64_t layer) {
  if (dp_pending.empty()) return;
  PendingRetain& pend = dp_pending[static_cast<size_t>(layer)];
  if (pend.side) {
    NEEDLE_CUDA_CHECK(cudaStreamWaitEvent(stream, retain_done[static_cast<size_t>(layer)], 0));
    pend.side = false;
  }
  if (!pend.on) return;
  cuda::RetainByMass(pend.args, stream);
  pend.on = false;
}

void HybridAttention::Impl::FlushNextRetention(int64_t layer) {
  const auto n = static_cast<int64_t>(dp_pending.size());
  for (int64_t i = 1; i < n; ++i) {
    const int64_t l = (layer + i) % n;  // (past the last layer: the next step's first)
    if (dp_pending[static_cast<size_t>(l)].side) {
      FlushRetention(l);
      return;
    }
  }
}

void HybridAttention::Impl::TakeRetention(int64_t layer,
                                          std::vector<std::vector<int32_t>>* retained) {
  const int64_t Hk = m.num_kv_heads, R = c.retained();
  DrainHost();
  FlushRetention(layer);  // (the last GPU-planned step's, where left to the next)
  std::vector<int32_t> h(static_cast<size_t>(Hk * (R + 1)));
  NEEDLE_CUDA_CHECK(cudaMemcpyAsync(h.data(), DeviceRetention(layer, R), h.size() * 4,
                                    cudaMemcpyDeviceToHost, stream));
  Sync(&stats.gpu_wait);
  RetentionLists(h.data(), Hk, R, retained);
}

}  // namespace needle
