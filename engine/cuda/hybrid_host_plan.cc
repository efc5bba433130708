// Host placement's decode steps planned on the GPU (PlanExecutor::PlanDecode with the KV cache in
// host memory; the default, NEEDLE_HYBRID_DEVICE_PLAN=0 turns it off; host_plan_on implies
// fill_on). Per sparse layer, on the model's stream:
//   1. the scoring, top-k and selection as device placement queues them (hybrid_device_plan.cc),
//      the selection reading a block-to-slot map per KV head (BlockMap: the GPU block cache's
//      extra slots, -1 for a block it does not hold): each head's view holds its selected blocks
//      where the GPU has them and a hole (masked by the attention) for the others, which are
//      listed for the CPU (SelectArgs::cpu);
//   2. the selection, the CPU's lists and the query copied to pinned memory (sel_ready);
//   3. the GPU's attention over Initial + its held blocks + Local, into a partial.
// The host waits for sel_ready only, attends the listed blocks from the host cache (AttendBlocks)
// while the GPU attends its own, and queues the log-sum-exp merge into the layer's output, the
// CPU's block sums into the retention's inputs, the retention (as device placement) and the
// fill: the CPU's blocks copied into the least recently attended slots on the fill stream, with
// the map's entries (new and evicted blocks) in the same kernel; the layer's next selection
// waits for it. Unlike the host's own plan (hybrid_decode.cc), the GPU never waits for the host's
// selection, placement and launches (2.3 ms of a 1M step on an H100 host, bench/RESULTS.md),
// and nothing is copied over PCIe inside the step.
#include "engine/cuda/block_select.h"
#include "engine/cuda/device_plan.h"
#include "engine/cuda/hybrid_impl.h"

namespace needle {

// Thread blocks of a fill's kernel (each of K and V), as the host's own plans' fills.
constexpr int kHostPlanFillBlocks = 8;

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
  auto* pin = reinterpret_cast<int32_t*>(
      sel_pin.Get(static_cast<size_t>(HD + Hk * n_sel + Hk * (R + 1 + n_sel + 1))));
  float* q_host = reinterpret_cast<float*>(pin);
  int32_t* sel_h = pin + HD;
  int32_t* kept_h = sel_h + Hk * n_sel;
  const int32_t* cpu_h = kept_h + Hk * (R + 1);
  D2H(q_host, q_dev, static_cast<size_t>(HD) * 4);
  D2H(sel_h, sel, static_cast<size_t>(Hk * n_sel) * 4);
  D2H(kept_h, kept, static_cast<size_t>(Hk * (R + 1 + n_sel + 1)) * 4);
  NEEDLE_CUDA_CHECK(cudaEventRecord(sel_ready, stream));
  // The GPU's partial: [out HD][lse heads], then the CPU's the same.
  float* g = gpu_part.Get<float>(static_cast<size_t>(2 * (HD + a.heads)));
  float *g_out = g, *g_lse = g + HD, *c_out = g_lse + a.heads, *c_lse = c_out + HD;
  // (Only the TMA kernel masks the holes: another one would read them as zero keys.)
  if (AttendTiled(v, a2, g_out, g_lse, tiles, view_at * c.block_size, n_sel, sums) != tiles)
    Fail(
        "hybrid engine: the device plan of host placement needs the TMA decode kernel, which "
        "did not take layer ",
        layer, "'s attention");
  Mark(kAttend);
  // The host: the CPU's blocks once the selection is here (its threads woken when the GPU
  // finished the previous layer, as Attend does for the host's own plans).
  auto t = Clock::now();
  NEEDLE_CUDA_CHECK(cudaEventSynchronize(layer_start));
  tc.Wake(400);
  NEEDLE_CUDA_CHECK(cudaEventSynchronize(sel_ready));
  stats.gpu_wait += Since(t);
  cpu_blocks.resize(static_cast<size_t>(Hk));  // (the lists keep their capacity between layers)
  host_held.resize(static_cast<size_t>(Hk));
  int64_t n_cpu = 0;
  for (int64_t h = 0; h < Hk; ++h) {
    cpu_blocks[h].clear();
    host_held[h].clear();
    const int32_t cnt = cpu_h[Hk * n_sel + h];
    NEEDLE_CHECK(cnt >= 0 && cnt <= n_sel);
    int32_t i = 0;
    for (int64_t j = 0; j < n_sel; ++j) {
      const int32_t b = sel_h[h * n_sel + j];
      if (i < cnt && cpu_h[h * n_sel + i] == j) {
        cpu_blocks[h].push_back(b);
        ++i;
      } else {
        host_held[h].push_back(b);
      }
    }
    n_cpu += cnt;
  }
  float* cpu_part = part_pin.Get(static_cast<size_t>(HD + a.heads));
  t = Clock::now();
  if (n_cpu > 0) {
    fast::AttendBlocks(q_host, host.Layer(layer), a, cpu_blocks, cpu_part, cpu_part + HD,
                       &block_stats, tc);
  } else {
    tc.Rest();
    std::fill(cpu_part, cpu_part + HD, 0.f);
    std::fill(cpu_part + HD, cpu_part + HD + a.heads, -INFINITY);
  }
  stats.cpu_attend += Since(t);
  stats.cpu_blocks += n_cpu;
  stats.gpu_blocks += Hk * n_sel - n_cpu;
  // The merge, and the CPU's block sums into the retention's inputs at their selection places
  // (tile 0 of the block; its other tiles' sums are 0: the attention masked the hole).
  t = Clock::now();
  H2D(c_out, cpu_part, static_cast<size_t>(HD + a.heads) * 4);
  cuda::MergeAttention(g_out, g_lse, c_out, c_lse, a.heads, a.head_dim, out_dev, lse, stream);
  if (p.retain && n_cpu > 0) {
    const size_t w = static_cast<size_t>(n_cpu * G * 2);
    auto* e = reinterpret_cast<int32_t*>(stats_pin.Get(2 * w));
    std::memcpy(e, block_stats.data(), w * 4);  // (the floats' bits, written as they are)
    size_t x = 0;
    for (int64_t h = 0; h < Hk; ++h)
      for (int32_t i = 0; i < cpu_h[Hk * n_sel + h]; ++i) {
        const int64_t j = cpu_h[h * n_sel + i];
        for (int64_t f = 0; f < G * 2; ++f, ++x)
          e[w + x] = static_cast<int32_t>((h * n_sel + j) * tiles * G * 2 + f);
      }
    cuda::TableEntries te;
    te.values = e, te.at = e + w, te.table = reinterpret_cast<int32_t*>(sums);
    te.rows = 1, te.width = static_cast<int64_t>(w);
    cuda::GatherBlocks(nullptr, nullptr, nullptr, nullptr, 0, 16, nullptr, nullptr, stream, te);
  }
  stats.copies += Since(t);
  if (p.retain && R > 0) {
    const cuda::RetainArgs ra =
        cuda::MakeRetainArgs(sel, n_sel, sums, tiles, lse, Hk, G, p.by_layer, R, ret, rcount);
    QueueRetention(layer, ra, R, &pend);
  }
  FlushNextRetention(layer);
  QueueMapFill(layer);
  // The next sparse layer's last fill (queued a step ago, or earlier in this step for the next
  // step's first layers), before its selection reads the map.
  for (int64_t i = 1; i <= m.num_layers; ++i) {
    const int64_t l = (layer + i) % m.num_layers;
    if (Dense(l)) continue;
    NEEDLE_CUDA_CHECK(cudaStreamWaitEvent(stream, fill_done[static_cast<size_t>(l)], 0));
    break;
  }
  if (plan == nullptr) return;
  plan->blocks.assign(static_cast<size_t>(Hk), {});
  for (int64_t hh = 0; hh < Hk; ++hh)
    plan->blocks[hh].assign(sel_h + hh * n_sel, sel_h + (hh + 1) * n_sel);
  // (The kept retention: what the selection started from, as PlanDecode reports it.)
  plan->retained.clear();
  if (kept_h[Hk * R] >= 0)
    for (int64_t hh = 0; hh < Hk; ++hh)
      plan->retained.emplace_back(kept_h + hh * R, kept_h + hh * R + kept_h[Hk * R + hh]);
}

void HybridAttention::Impl::QueueMapFill(int64_t layer) {
  const auto l = static_cast<size_t>(layer);
  resident.Attend(layer, host_held);  // (the slots this step attends: the fill takes none)
  NEEDLE_CUDA_CHECK(cudaEventSynchronize(fill_done[l]));  // (its lists are rewritten)
  resident.Fill(layer, cpu_blocks, resident.slots(), &fills);
  if (fills.empty()) return;
  for (const auto& cp : fills)
    if (!PinHost(layer, cp.block, cp.block + 1)) {  // (the CPU attends them from now on)
      fills.clear();
      return;
    }
  // The pinned lists: the copies' sources and destinations, then the map's entries (each new
  // block's slot, each evicted block's -1) and their places.
  const int64_t Hk = m.num_kv_heads, nf = static_cast<int64_t>(fills.size());
  auto* pin = reinterpret_cast<int32_t*>(fill_pin[l].Get(static_cast<size_t>(2 * nf + 4 * nf)));
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
  QueueCopies(layer, host, fills, pin, fill_stream, te, kHostPlanFillBlocks);
  NEEDLE_CUDA_CHECK(cudaEventRecord(fill_done[l], fill_stream));
  stats.gpu_filled += nf;
}

}  // namespace needle
