// Host placement's decode steps planned on the GPU (PlanExecutor::PlanDecode with the KV cache in
// host memory; the default, NEEDLE_HYBRID_DEVICE_PLAN=0 turns it off; host_plan_on implies
// fill_on). Per sparse layer, on the model's stream:
//   1. the scoring, top-k and selection as device placement queues them (hybrid_device_plan.cc),
//      the selection reading a block-to-slot map per KV head (BlockMap: the GPU block cache's
//      extra slots, -1 for a block it does not hold): each head's view holds its selected blocks
//      where the GPU has them and a hole (masked by the attention) for the others, which are
//      listed for the CPU (SelectArgs::cpu);
//   2. the selection, the CPU's lists and the query written to pinned memory by one kernel, then
//      the layer's selection flag (cuda::Post), and the layer's job handed to the host worker
//      (hybrid_host_worker.cc);
//   3. the GPU's attention over Initial + its held blocks + Local, into a partial;
//   4. cuda::JoinHost: the stream waits for the worker's flag of the layer, then puts the CPU's
//      block sums among the retention's inputs; the log-sum-exp merge of the CPU's partial (read
//      from pinned memory) into the layer's output; the retention (as device placement).
// The model's thread waits (asleep) for the layer's flag, then queues the layer's next launches
// (NEEDLE_HYBRID_LAG=k: for the flag of the k-th sparse layer back; NEEDLE_HYBRID_AHEAD=1: it
// queues the whole step ahead and waits at the step's end, AttentionPolicy::StepQueued). The
// worker, per layer: waits for the selection flag, attends the listed blocks from the host cache
// (AttendBlocks) while the GPU attends its own, writes the partial, the sums and the flag, then
// queues the fill: the CPU's blocks copied into the least recently attended slots on the fill
// stream, with the map's entries (new and evicted blocks) in the same kernel; the layer's next
// selection waits for it. Unlike the host's own plan (hybrid_decode.cc), the GPU waits neither for
// the host's selection, placement and launches (2.3 ms of a 1M step on an H100 host,
// bench/RESULTS.md) nor for the host's launches after the CPU's blocks, and nothing is copied
// over PCIe inside the step but the selection and the partial.
#include "engine/cuda/block_select.h"
#include "engine/cuda/device_plan.h"
#include "engine/cuda/host_join.h"
#include "engine/cuda/hybrid_impl.h"

namespace needle {

int32_t* HybridAttention::Impl::BlockMap(int64_t layer) {
  const int64_t Hk = m.num_kv_heads;
  const auto total = static_cast<size_t>(m.num_layers * Hk * map_blocks);
  if (!map_ready) {  // (sized once: every layer's, every block of the longest sequence)
    NEEDLE_CUDA_CHECK(cudaMemsetAsync(dp_map.Get<int32_t>(total), 0xff, total * 4, stream));
    map_ready = true;
  }
  return dp_map.Get<int32_t>(total) + layer * Hk * map_blocks;
}

void HybridAttention::Impl::ResetBlockMap() {
  if (!map_ready) return;
  const auto total = static_cast<size_t>(m.num_layers * m.num_kv_heads * map_blocks);
  NEEDLE_CUDA_CHECK(cudaMemsetAsync(dp_map.Get<int32_t>(total), 0xff, total * 4, stream));
}

void HybridAttention::Impl::PlanDecodeHost(int64_t layer, const AttnArgs& a,
                                           const RepresentativeStore& reps, const ExecutorPlan& p,
                                           LayerPlan* plan) {
  const int64_t Hk = a.kv_heads, G = a.heads / Hk, R = p.retained, HD = a.heads * a.head_dim;
  const int64_t n = p.ctx_end_block - p.init_blocks, n_sel = std::min(p.topk, n);
  NEEDLE_CHECK(p.ctx_end_block <= map_blocks && n_sel <= resident.slots());
  int32_t* ret = DeviceRetention(layer, R);
  int32_t* rcount = ret + Hk * R;
  // (The TMA kernel's tile sums: PlansDecode asked for a case of it, the one that masks holes.)
  const int64_t tiles = c.block_size / 32;
  int32_t* lay = LayerPlanBuffers(layer, tiles);
  if (fill_wait_due) {
    // The step's first layer planned here: the wait for its last fill, queued by the worker
    // during the last step (whose host work is done: BeginStep drained it). Later layers' are
    // queued after the attention of the layer before (below).
    NEEDLE_CUDA_CHECK(cudaStreamWaitEvent(stream, fill_done[static_cast<size_t>(layer)], 0));
    fill_wait_due = false;
  }
  PendingRetain& pend = dp_pending[static_cast<size_t>(layer)];
  if (pend.side) FlushRetention(layer);
  SeedRetention(p, Hk, ret, &pend);
  Mark(kPlan);
  const int cur = 1 - pend.half;
  int32_t* sel = lay + cur * Hk * c.topk;
  float* sums = reinterpret_cast<float*>(lay + 2 * Hk * c.topk);
  float* lse = sums + 2 * Hk * c.topk * tiles * G;  // (the merged lse: retention's)
  // Scratch: kept [Hk][R], kcount [Hk], the CPU's lists [Hk][n_sel] and counts [Hk] (sized for
  // topk: n_sel grows with the context, and a buffer that grows waits for the GPU).
  int32_t* kept = dp_scratch.Get<int32_t>(static_cast<size_t>(Hk * (R + 1 + c.topk + 1)));
  int32_t* kcount = kept + Hk * R;
  int32_t* cpu_dev = kcount + Hk;
  // (The map is current: the stream waited for the layer's last fill after the attention of the
  // sparse layer before it, QueueMapFill, not here between the dependent launches of RoPE and
  // the scoring.)
  AttnArgs a2;
  KVLayerView v = WindowView(layer, a, n_sel, &a2, true, true);
  const int64_t view_at = p.init_blocks;
  v.table_step_lo = view_at * c.block_size, v.table_step_hi = (view_at + n_sel) * c.block_size;
  cuda::SelectArgs sa = cuda::MakeSelectArgs(
      p.shortlist, std::min(p.shortlist, n), ret, rcount, R, p.init_blocks, p.ctx_end_block, p.topk,
      Hk, p.by_layer, BlockMap(layer), n_sel, sel, kept, kcount, const_cast<int32_t*>(v.table),
      v.table_head_stride, view_at);
  sa.table_head_stride = map_blocks, sa.cpu = cpu_dev, sa.cpu_count = cpu_dev + Hk * n_sel;
  QueueSelection(layer, reps, p, sa, &pend);
  pend.half = cur;
  // To the host: the query, the selection [Hk][n_sel], kept [Hk][R], kcount [Hk], the CPU's
  // lists and counts (kept .. counts are one range of the scratch).
  HostLayer& hl = HostLayerBuffers(layer, R);
  const HostSel hs(hl.sel.Get(0), HD, Hk, n_sel, R);
  // (One kernel writing them and then the layer's selection flag, which the worker spins on;
  // the event tells it of a GPU that failed first.)
  const auto* q_words = reinterpret_cast<const uint32_t*>(q_dev);
  const auto* sel_words = reinterpret_cast<const uint32_t*>(sel);
  const auto* kept_words = reinterpret_cast<const uint32_t*>(kept);
  const int64_t kept_n = Hk * (R + 1 + n_sel + 1);
  if (post_sel) {
    cuda::PostToHost po;
    po.r[0] = {q_words, reinterpret_cast<uint32_t*>(hs.q), HD};
    po.r[1] = {sel_words, reinterpret_cast<uint32_t*>(hs.sel), Hk * n_sel};
    po.r[2] = {kept_words, reinterpret_cast<uint32_t*>(hs.kept), kept_n};
    po.flag = sel_flags + layer, po.value = step_seq;
    po.stamp = handshake_dev.Get<uint64_t>(0) + layer;
    cuda::Post(po, stream);
  } else {
    D2H(hs.q, q_dev, static_cast<size_t>(HD) * 4);
    D2H(hs.sel, sel, static_cast<size_t>(Hk * n_sel) * 4);
    D2H(hs.kept, kept, static_cast<size_t>(kept_n) * 4);
  }
  NEEDLE_CUDA_CHECK(cudaEventRecord(hl.sel_ready, stream));
  // The worker's job (whatever fails below, it writes the flag that JoinHost waits for).
  HostJob job;
  job.layer = layer, job.n_sel = n_sel, job.R = R, job.seq = step_seq, job.a = a;
  job.retain = p.retain, job.want_plan = plan != nullptr;
  PushHostJob(job);
  // The GPU's partial: [out HD][lse heads].
  float* g = gpu_part.Get<float>(static_cast<size_t>(HD + a.heads));
  float *g_out = g, *g_lse = g + HD;
  // (Only the TMA kernel masks the holes: another one would read them as zero keys.)
  if (AttendTiled(v, a2, g_out, g_lse, tiles, view_at * c.block_size, n_sel, sums) != tiles)
    Fail(
        "hybrid engine: the device plan of host placement needs the TMA decode kernel, which "
        "did not take layer ",
        layer, "'s attention");
  Mark(kAttend);
  // The host worker's part (hybrid_host_worker.cc): the stream waits for the layer's flag, then
  // merges the CPU's partial from pinned memory into the layer's output; the CPU's block sums go
  // into the retention's inputs at their selection places (tile 0 of the block; its other tiles'
  // sums are 0: the attention masked the hole).
  cuda::HostJoin hj;
  hj.flag = host_flags + layer, hj.want = step_seq, hj.timed_out = host_flags + m.num_layers;
  uint64_t* const timing = handshake_dev.Get<uint64_t>(0);  // ([layers] stamps, then sums)
  hj.post = timing + layer, hj.sums_ns = timing + m.num_layers;
  hj.clock = handshake + layer * cuda::HandshakeClock::kWords;
  if (p.retain) {
    hj.cpu_sums = hl.sums.Get(0), hj.cpu = cpu_dev, hj.sums = sums;
    hj.kv_heads = Hk, hj.n_sel = n_sel, hj.tiles = tiles, hj.G = G;
  }
  cuda::JoinHost(hj, stream);
  const float* part = hl.part.Get(0);
  cuda::MergeAttention(g_out, g_lse, part, part + HD, a.heads, a.head_dim, out_dev, lse, stream);
  Mark(kMerge);
  if (p.retain && R > 0) {
    const cuda::RetainArgs ra =
        cuda::MakeRetainArgs(sel, n_sel, sums, tiles, lse, Hk, G, p.by_layer, R, ret, rcount);
    QueueRetention(layer, ra, R, &pend);
  }
  FlushNextRetention(layer);
  // The next sparse layer's last fill (queued by the worker a step ago), before its selection
  // reads the map; the step's first one's is waited for when the step begins (above).
  for (int64_t l = layer + 1; l < m.num_layers; ++l) {
    if (Dense(l)) continue;
    NEEDLE_CUDA_CHECK(cudaStreamWaitEvent(stream, fill_done[static_cast<size_t>(l)], 0));
    break;
  }
  if (plan == nullptr) {
    // (The fill's bookkeeping goes on on the worker while this thread queues the next launches.)
    if (!host_ahead) WaitHostAttended(host_lag);
    return;
  }
  DrainHost();
  plan->blocks = host_plans[static_cast<size_t>(layer)].blocks;
  plan->retained = host_plans[static_cast<size_t>(layer)].retained;
}

void HybridAttention::Impl::QueueMapFill(int64_t layer) {
  const auto l = static_cast<size_t>(layer);
  resident.Attend(layer, host_held);  // (the slots this step attends: the fill takes none)
  // (Blocks CUDA refused to page-lock: not filled, the CPU attends them from now on.)
  if (!TakeFills(layer, cpu_blocks) || fills.empty()) return;
  // The pinned lists: the copies' sources and destinations, then the map's entries (each new
  // block's slot, each evicted block's -1) and their places.
  const int64_t Hk = m.num_kv_heads, nf = static_cast<int64_t>(fills.size());
  // (At most one fill a CPU block: the buffer was sized for that on the model's thread,
  // HostLayerBuffers. One that grew here would free the old one, and cudaFreeHost waits for the
  // GPU, which may be waiting in JoinHost for this thread's next flag.)
  NEEDLE_CHECK(nf <= Hk * c.topk);
  auto* pin = reinterpret_cast<int32_t*>(fill_pin[l].Get(static_cast<size_t>(6 * Hk * c.topk)));
  int32_t* values = pin + 2 * nf;
  int32_t* at = values + 2 * nf;
  const int64_t base = layer * Hk * map_blocks;
  int64_t ne = 0;
  for (const auto& cp : fills) {
    const int64_t row = base + cp.head * map_blocks;
    values[ne] = static_cast<int32_t>(model_cache->shape().ExtraSlot(layer, cp.to));
    at[ne++] = static_cast<int32_t>(row + cp.block);
    if (cp.evicted >= 0) values[ne] = -1, at[ne++] = static_cast<int32_t>(row + cp.evicted);
  }
  // (A fill's new blocks are not held, its evicted ones are: no entry is written twice.)
  cuda::TableEntries te;
  te.values = values, te.at = at, te.table = BlockMap(0), te.rows = 1, te.width = ne;
  QueueCopies(layer, host, fills, pin, fill_stream, te, fill_ctas);
  NEEDLE_CUDA_CHECK(cudaEventRecord(fill_done[l], fill_stream));
  worker_stats.gpu_filled += nf;
}

}  // namespace needle
