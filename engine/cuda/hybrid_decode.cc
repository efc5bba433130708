// The hybrid engine's decode step, as its PlanExecutor (hybrid.h, docs/ARCHITECTURE.md's "one
// decode step"): the GPU's window and its share of the selected blocks, the CPU's blocks, the
// log-sum-exp merge, retention's block sums; the selection's scoring on the GPU.
#include "engine/base/switches.h"
#include "engine/cuda/hybrid_impl.h"
#include "sparse_attn/plan_rules.h"

namespace needle {

using hybrid::MergeLse;

KVLayerView HybridAttention::Impl::WindowView(int64_t layer, const AttnArgs& a, int64_t n_g,
                                              AttnArgs* a2, bool init, bool per_head, bool upload) {
  const int64_t B = c.block_size, p = a.pos0, ie = init ? c.init_end() : 0, lb = c.LocalBegin(p);
  const int64_t shift = lb - ie - n_g * B;             // positions the view moves Local by
  const int64_t n = (p - shift) / B + 1, ib = ie / B;  // blocks of the view, Initial blocks
  // (Local alone: no gathered blocks; per head: its own key, the tables' layout differs.)
  const int64_t key = per_head ? -2 - n_g : init ? n_g : -1;
  const int64_t heads = per_head ? m.num_kv_heads : 1;
  if (!upload || lb != table_lb || p / B != table_pb || key != table_ng) {
    table_host.resize(static_cast<size_t>(heads * n));
    for (int64_t j = 0; j < n; ++j) {
      // (per head: the Context entries are the caller's; the extra slots stand in until then)
      table_host[j] = j < ib ? model_cache->SlotOf(layer, j)
                      : j < ib + n_g
                          ? static_cast<int32_t>(model_cache->shape().ExtraSlot(layer, j - ib))
                          : model_cache->SlotOf(layer, lb / B + (j - ib - n_g));
      NEEDLE_CHECK(table_host[j] >= 0);
    }
    for (int64_t h = 1; h < heads; ++h)
      std::copy_n(table_host.begin(), n, table_host.begin() + h * n);
    if (upload) {
      int32_t* d = table_dev.Get<int32_t>(table_host.size());
      H2D(d, table_host.data(), table_host.size() * sizeof(int32_t));
      table_lb = lb, table_pb = p / B, table_ng = key;
    } else {
      table_lb = -1;  // (the caller writes the device table)
    }
  }
  KVLayerView v = model_cache->Layer(layer);
  v.table = table_dev.Get<int32_t>(table_host.size());
  v.table_head_stride = per_head ? n : 0;
  *a2 = a;
  a2->pos0 = p - shift;
  return v;
}

int64_t HybridAttention::Impl::GpuShare(const LayerPlan& plan) const {
  if (!gather_on || plan.blocks.empty()) return 0;
  size_t shortest = plan.blocks[0].size();
  for (const auto& b : plan.blocks) shortest = std::min(shortest, b.size());
  return std::min(resident.slots(), (c.gpu_share * static_cast<int64_t>(shortest) + 50) / 100);
}

int64_t HybridAttention::Impl::PlaceContext(int64_t layer, const LayerPlan& plan, int64_t n_g) {
  const int64_t Hk = m.num_kv_heads;
  // More than the share where every head's GPU slots already hold more of its selected blocks:
  // they cost the GPU no copy and take blocks off the CPU (NEEDLE_HYBRID_HELD=0: the share alone).
  static const bool held_on = EnvOnUnlessZero("NEEDLE_HYBRID_HELD");
  n_g = resident.Place(layer, plan.blocks, plan.retained, n_g, &copies,
                       held_on ? resident.slots() : n_g, held_on ? take_rest : 0);
  for (const auto& cp : copies)
    if (!device_kv && !PinHost(layer, cp.block, cp.block + 1)) {
      gather_on = false;
      ClearResident();
      copies.clear();
      return 0;
    }
  stats.gpu_blocks += n_g * Hk;
  stats.gpu_reused += n_g * Hk - static_cast<int64_t>(copies.size());
  return n_g;
}

void HybridAttention::Impl::QueueGather(int64_t layer, const KVLayerView& v, int64_t n_g) {
  if (n_g <= 0) return;
  const int64_t Hk = m.num_kv_heads, x0 = model_cache->shape().ExtraSlot(layer, 0);
  const int64_t n = v.table_head_stride, ib = c.init_end() / c.block_size;
  NEEDLE_CHECK(n >= ib + n_g && static_cast<int64_t>(table_host.size()) == Hk * n);
  // (After the layer's fills: they may have written the slots it attends or copies into. An
  // event never recorded waits for nothing.)
  if (fill_on)
    NEEDLE_CUDA_CHECK(cudaStreamWaitEvent(stream, fill_done[static_cast<size_t>(layer)], 0));
  // The kernel reads the lists and the view's table from pinned memory; they are rewritten only
  // after the next layer's wait for the stream.
  const size_t nc = copies.size();
  auto* pin = reinterpret_cast<int32_t*>(src_pin.Get(2 * nc + static_cast<size_t>(Hk * n)));
  int32_t* entries = pin + 2 * nc;
  std::copy(table_host.begin(), table_host.end(), entries);
  for (int64_t h = 0; h < Hk; ++h)
    for (int64_t j = 0; j < n_g; ++j)
      entries[h * n + ib + j] = static_cast<int32_t>(x0 + resident.ViewSlot(layer, h, j));
  cuda::TableEntries e;
  e.values = entries, e.table = const_cast<int32_t*>(v.table);
  e.rows = Hk, e.width = n, e.stride = n;
  // (Device placement: the blocks come from the layer's own ring, in GPU memory.)
  QueueCopies(layer, device_kv ? *model_cache : host, copies, pin, stream, e, 0);
  copies.clear();
}

void HybridAttention::Impl::QueueCopies(int64_t layer, KVCache& from,
                                        const std::vector<ResidentBlocks::Copy>& list, int32_t* pin,
                                        cudaStream_t s, const cuda::TableEntries& e,
                                        int max_blocks) {
  const int64_t Hk = m.num_kv_heads, x0 = model_cache->shape().ExtraSlot(layer, 0);
  const size_t nc = list.size();
  int32_t *src = pin, *dst = pin + nc;
  for (size_t i = 0; i < nc; ++i) {
    src[i] = from.SlotOf(layer, list[i].block) * static_cast<int32_t>(Hk) + list[i].head;
    dst[i] = list[i].to * static_cast<int32_t>(Hk) + list[i].head;
  }
  cuda::GatherBlocks(from.BlockData(layer, false, 0), from.BlockData(layer, true, 0), src, dst,
                     static_cast<int64_t>(nc), host.BlockBytes() / static_cast<size_t>(Hk),
                     model_cache->BlockData(layer, false, x0),
                     model_cache->BlockData(layer, true, x0), s, e, max_blocks);
}

// Thread blocks of a fill's kernel (each of K and V): few, beside the model's kernels, whose
// blocks fill the multiprocessors; a block keeps 16 KB of PCIe reads in flight.
constexpr int kFillBlocks = 8;

bool HybridAttention::Impl::TakeFills(int64_t layer,
                                      const std::vector<std::vector<int32_t>>& lists) {
  // (Its lists are rewritten: the layer's last fill, a step ago, is done as a rule.)
  NEEDLE_CUDA_CHECK(cudaEventSynchronize(fill_done[static_cast<size_t>(layer)]));
  resident.Fill(layer, lists, resident.slots(), &fills);
  for (const auto& cp : fills)
    if (!PinHost(layer, cp.block, cp.block + 1)) {
      fills.clear();
      return false;
    }
  return true;
}

void HybridAttention::Impl::QueueFill(int64_t layer,
                                      const std::vector<std::vector<int32_t>>& lists) {
  const auto l = static_cast<size_t>(layer);
  if (!TakeFills(layer, lists)) {
    gather_on = false;  // (as PlaceContext: the CPU attends everything from now on)
    ClearResident();
    return;
  }
  if (fills.empty()) return;
  auto* pin = reinterpret_cast<int32_t*>(fill_pin[l].Get(2 * fills.size()));
  QueueCopies(layer, host, fills, pin, fill_stream, {}, kFillBlocks);
  NEEDLE_CUDA_CHECK(cudaEventRecord(fill_done[l], fill_stream));
  stats.gpu_filled += static_cast<int64_t>(fills.size());
}

void HybridAttention::Impl::ClearResident() {
  DrainHost();  // (the host worker's fills and the slots' bookkeeping)
  if (fill_stream != nullptr) NEEDLE_CUDA_CHECK(cudaStreamSynchronize(fill_stream));
  resident.Clear();
  ResetBlockMap();  // (the device plan of host placement's view of the slots)
}

void HybridAttention::Impl::RowToPinned(int64_t layer, int64_t p, bool later) {
  host.AssignBlocks(layer, p, 1);
  if (p % c.block_size == 0) PinHost(layer, p / c.block_size, p / c.block_size + 1);
  if (later)
    pending_rows.emplace_back(layer, p);
  else
    QueueRowToPinned(*model_cache, layer, p, RowPin(), stream);
}

void HybridAttention::Impl::FlushRows() {
  if (pending_rows.empty()) return;
  const size_t rb = KVRowBytes(host.shape()), bytes = rb * pending_rows.size();
  auto* pin = reinterpret_cast<uint8_t*>(rows_pin.Get((bytes + 3) / 4));
  QueueRowsToPinned(*model_cache, pending_rows, rows_dev.Get<uint8_t>(bytes), pin, stream);
  Sync(&stats.gpu_wait);  // (the step that queued them is over: at most its tail and the copy)
  for (size_t i = 0; i < pending_rows.size(); ++i)
    RowFromPinned(pin + i * rb, host, pending_rows[i].first, pending_rows[i].second);
  pending_rows.clear();
}

void HybridAttention::Impl::Dense(int64_t layer, const float* q, const AttnArgs& a,
                                  const KVLayerView& kv, float* out, float* lse) {
  AttnArgs a2 = a;
  KVLayerView v;
  const int64_t B = c.block_size, ib = c.init_end() / B, cb = c.LocalBegin(a.pos0) / B;
  if (step.call_T == 1 && !Dense(layer) && cb > ib) {
    // A layer whose keys live in host memory that the planner attends densely at this step
    // (the first dense_layers within the trained length, with --prefill sparse): a plan of
    // every Context block.
    LayerPlan all;
    all.blocks.assign(static_cast<size_t>(a.kv_heads), {});
    for (auto& hb : all.blocks)
      for (int64_t b = ib; b < cb; ++b) hb.push_back(static_cast<int32_t>(b));
    dense_lse.resize(static_cast<size_t>(a.heads));
    Planned(layer, q, a, kv, all, out, lse != nullptr ? lse : dense_lse.data(), nullptr);
    return;
  }
  if (step.call_T > 1)
    v = Dense(layer) ? model_cache->Layer(layer) : staging.Layer(0);
  else
    v = Dense(layer) ? model_cache->Layer(layer) : WindowView(layer, a, 0, &a2);
  float* lse_dev = lse != nullptr ? lse_g.Get<float>(static_cast<size_t>(a.T * a.heads)) : nullptr;
  cuda::Attention(q_dev, v, a2, out_dev, lse_dev, sm, ws, stream);
  if (lse != nullptr) {
    const auto t = Clock::now();
    LseToHost(lse_dev, a.T * a.heads, lse);
    if (step.call_T == 1) stats.gpu_wait += Since(t);
  }
}

bool HybridAttention::Impl::Planned(int64_t layer, const float* q, const AttnArgs& a,
                                    const KVLayerView& kv, const LayerPlan& plan, float*,
                                    float* lse, std::vector<std::vector<float>>* mass) {
  const int64_t HD = a.heads * a.head_dim, Hk = a.kv_heads, G = a.heads / Hk;
  // The GPU's share: n_g selected blocks of every KV head (those it holds from earlier steps,
  // the others copied from the host cache), attended with Initial + Local; their softmax sums.
  // With position remapping, Local alone: the Initial and Context keys move by amounts that
  // change with the step, and the CPU rotates its query.
  const bool remap = plan.remap && a.inv_freq != nullptr;
  auto t = Clock::now();
  int64_t n_g = remap ? 0 : GpuShare(plan);
  if (n_g > 0) n_g = PlaceContext(layer, plan, n_g);
  const bool late = late_next;  // (TakesLateMass said so: the stats stay for LateMass)
  late_next = false;
  // (n_g 0: every block's sums from the CPU, which LateMass reads through the offsets too.)
  if (n_g > 0 || late) StatsOffsets(layer, plan.blocks, n_g, a.heads, G, &stats_at);
  // Every selected block on the GPU (device placement, or the blocks it holds): its output is
  // the layer's.
  const bool gpu_all = !remap && AllOnGpu(plan, n_g);
  if (gpu_all) tc.Rest();  // (the workers woken for the CPU's blocks: there are none)
  // The CPU: the rest, in plan order. It starts on the workers before the GPU's copies and
  // attention are queued, which the host does meanwhile (NEEDLE_HYBRID_CPU_FIRST=0: after).
  const std::vector<std::vector<int32_t>>* cb = &plan.blocks;
  if (n_g > 0 && !gpu_all) {
    cpu_blocks.resize(plan.blocks.size());
    size_t i = 0;
    for (size_t h = 0; h < plan.blocks.size(); ++h) {
      cpu_blocks[h].clear();
      for (int32_t b : plan.blocks[h])
        if (stats_at[i++] < 0) cpu_blocks[h].push_back(b);
    }
    cb = &cpu_blocks;
  }
  float* cpu_part = gpu_all ? nullptr : part_pin.Get(static_cast<size_t>(HD + a.heads));
  if (remap) plan.ToSpans(Hk, &spans, a.inv_freq, a.head_dim, false);
  auto attend_cpu = [&] {
    if (remap)
      cpu->Attention(q, kv, a, &spans, cpu_part, cpu_part + HD);
    else
      fast::AttendBlocks(q, kv, a, *cb, cpu_part, cpu_part + HD, &block_stats, tc);
  };
  struct JoinOnExit {  // (the started attention reads this frame: joined on every way out)
    ThreadingContext* tc = nullptr;
    ~JoinOnExit() {
      if (tc == nullptr) return;
      try {
        tc->Join();
      } catch (...) {  // (already leaving by an exception)
      }
    }
  } joiner;
  const bool cpu_first = !gpu_all && CpuFirst();
  if (cpu_first) {
    tc.Start(attend_cpu);
    joiner.tc = &tc;
  }
  // (The view, then the copies and the view's per-head table, whose Context entries n_g may
  // change from layer to layer, in one kernel.)
  AttnArgs a2;
  const KVLayerView v = WindowView(layer, a, n_g, &a2, !remap, n_g > 0, n_g == 0);
  QueueGather(layer, v, n_g);
  stats.gather += Since(t);
  t = Clock::now();
  // Device: [g_out HD][g_lse heads][block sums n_stats][c_out HD][c_lse heads]; the lse and
  // the sums come back in one copy. The sums: the attention's own of every 32-key tile of the
  // gathered blocks (view keys [Initial, Initial + n_g blocks): cuda::AttentionTileStats) where
  // its kernel writes them, else a pass of their own (cuda::BlockStats, whole blocks).
  // NEEDLE_HYBRID_TILE_STATS=0: always the pass.
  const bool want_stats = mass != nullptr || late;
  static const bool tile_stats_on = EnvOnUnlessZero("NEEDLE_HYBRID_TILE_STATS");
  const int64_t tiles =
      want_stats && tile_stats_on && c.block_size % 32 == 0 ? c.block_size / 32 : 1;
  const size_t n_stats = want_stats ? static_cast<size_t>(Hk * n_g * tiles * G * 2) : 0;
  float* g = gpu_part.Get<float>(static_cast<size_t>(2 * (HD + a.heads)) + n_stats);
  float *g_out = g, *g_lse = g + HD, *c_out = g_lse + a.heads + n_stats, *c_lse = c_out + HD;
  const int64_t tiles_got =
      AttendTiled(v, a2, gpu_all ? out_dev : g_out, g_lse, n_stats > 0 ? tiles : 1,
                  c.init_end() / c.block_size * c.block_size, n_g, g_lse + a.heads);
  if (tiles_got == 1 && n_stats > 0)  // (the blocks where the view's table says)
    cuda::BlockStats(q_dev, v.k, v.dtype, n_g, Hk, G, c.block_size, a.head_dim, a.scale,
                     g_lse + a.heads, stream, v.table + c.init_end() / c.block_size,
                     v.table_head_stride);
  float* g_pin = (late ? late_pin[layer] : gl_pin).Get(static_cast<size_t>(a.heads) + n_stats);
  D2H(g_pin, g_lse, (static_cast<size_t>(a.heads) + n_stats) * 4);
  NEEDLE_CUDA_CHECK(cudaEventRecord(late ? late_done[layer] : gpu_done, stream));
  // The CPU's blocks into the GPU's free or least recently used slots, for later steps.
  if (fill_on && gather_on && n_g > 0 && !gpu_all) QueueFill(layer, *cb);
  stats.launch += Since(t);
  if (late) {  // the GPU's sums stay for LateMass
    late_at[layer] = stats_at;
    late_tiles[layer] = tiles_got;
    late_ng[layer] = n_g;
    late_cpu_lse[layer].clear();
    late_cpu_stats[layer].clear();
  }
  if (late && gpu_all) return false;  // no wait
  if (gpu_all) {
    t = Clock::now();
    NEEDLE_CUDA_CHECK(cudaEventSynchronize(gpu_done));
    stats.gpu_wait += Since(t);
    stats.gpu_wait_part += Since(t);
    std::copy_n(g_pin, a.heads, lse);
    if (mass == nullptr) return false;
    PlanOrderStats(WholeBlockStats(g_pin, a.heads, Hk * n_g, G, tiles_got), stats_at, nullptr, G);
    fast::BlockMassFromStats(all_stats, lse, G, plan.blocks, mass);
    return true;
  }
  // (Started above: what is left of it once the GPU's work is queued.)
  t = Clock::now();
  if (cpu_first) {
    joiner.tc = nullptr;
    tc.Join();
  } else {
    attend_cpu();
  }
  stats.cpu_attend += Since(t);
  for (const auto& b : *cb) stats.cpu_blocks += static_cast<int64_t>(b.size());
  // GPU: the CPU's partial merged into the layer's output. No wait for it: the host computes
  // the merged log-sum-exp itself, from the GPU's, which came with its block sums.
  t = Clock::now();
  H2D(c_out, cpu_part, static_cast<size_t>(HD + a.heads) * 4);
  cuda::MergeAttention(g_out, g_lse, c_out, c_lse, a.heads, a.head_dim, out_dev, nullptr, stream);
  stats.copies += Since(t);
  if (late) {  // the CPU's lse and sums kept for LateMass; no wait for the GPU's partial
    late_cpu_lse[layer].assign(cpu_part + HD, cpu_part + HD + a.heads);
    late_cpu_stats[layer] = block_stats;
    return false;
  }
  t = Clock::now();
  NEEDLE_CUDA_CHECK(cudaEventSynchronize(gpu_done));
  stats.gpu_wait += Since(t);
  stats.gpu_wait_part += Since(t);
  for (int64_t r = 0; r < a.heads; ++r) lse[r] = MergeLse(g_pin[r], cpu_part[HD + r]);
  if (mass == nullptr || remap) return false;
  const std::vector<float>* st = &block_stats;
  if (n_g > 0) {  // every head's blocks in plan order, each from the GPU's slot or the CPU
    PlanOrderStats(WholeBlockStats(g_pin, a.heads, Hk * n_g, G, tiles_got), stats_at,
                   block_stats.data(), G);
    st = &all_stats;
  }
  fast::BlockMassFromStats(*st, lse, G, plan.blocks, mass);
  return true;
}

// NEEDLE_HYBRID_CPU_FIRST=0: the CPU's blocks attended after the GPU's launches are queued, as
// before (comparisons), read once. H100 host, bench_hybrid 24G (synthetic, host placement),
// pairs of runs after against first: Qwen2.5-7B 128K 89.1 / 87.8 -> 96.9 / 89.9 tok/s,
// Llama-3.1-8B 128K 59.7 / 62.5 -> 63.3 / 63.4, Qwen2.5-7B 1M 76.8 / 80.8 / 57.5 / 80.1 / 78.7
// -> 76.6 / 74.8 / 63.8 / 82.4 / 83.1 (bench/RESULTS.md): the launches (0.7-0.8 ms a step at 1M)
// take a little longer beside the CPU's attention, which saves more than that at 128K.
bool HybridAttention::Impl::CpuFirst() {
  static const bool on = EnvOnUnlessZero("NEEDLE_HYBRID_CPU_FIRST");
  return on;
}

bool HybridAttention::Impl::TakesLateMass(int64_t, const LayerPlan& plan) {
  // (Host placement: the GPU attends Initial + Local at least; its partial is merged without the
  // host's waiting for it.)
  late_next =
      !plan.remap && (device_kv ? AllOnGpu(plan, GpuShare(plan)) : late_on && GpuShare(plan) > 0);
  return late_next;
}

void HybridAttention::Impl::LateMass(int64_t layer, const std::vector<std::vector<int32_t>>& blocks,
                                     float* lse, std::vector<std::vector<float>>* mass) {
  const auto t = Clock::now();
  NEEDLE_CUDA_CHECK(cudaEventSynchronize(late_done[layer]));  // (long done, as a rule)
  stats.gpu_wait += Since(t);
  const int64_t H = m.num_heads, Hk = m.num_kv_heads, G = H / Hk;
  const auto l = static_cast<size_t>(layer);
  const float* pin = late_pin[l].Get(0);
  const std::vector<float>& cpu_lse = late_cpu_lse[l];
  for (int64_t r = 0; r < H; ++r)
    lse[r] = cpu_lse.empty() ? pin[r] : MergeLse(pin[r], cpu_lse[static_cast<size_t>(r)]);
  PlanOrderStats(WholeBlockStats(pin, H, Hk * late_ng[l], G, late_tiles[l]), late_at[l],
                 late_cpu_stats[l].empty() ? nullptr : late_cpu_stats[l].data(), G);
  fast::BlockMassFromStats(all_stats, lse, G, blocks, mass);
}

void HybridAttention::Impl::StatsOffsets(int64_t layer,
                                         const std::vector<std::vector<int32_t>>& blocks,
                                         int64_t n_g, int64_t heads, int64_t G,
                                         std::vector<int32_t>* at) const {
  at->clear();
  for (size_t h = 0; h < blocks.size(); ++h)
    for (int32_t b : blocks[h]) {
      const auto hh = static_cast<int64_t>(h);
      const int64_t j = GpuSlotOf(layer, hh, n_g, b);
      at->push_back(j < 0 ? -1 : static_cast<int32_t>(heads + (hh * n_g + j) * G * 2));
    }
}

// The tiles' sums of each of n blocks as one block's (plan_rules.h BlockFromTiles).
const float* HybridAttention::Impl::WholeBlockStats(const float* pin, int64_t heads, int64_t n,
                                                    int64_t G, int64_t tiles) {
  if (tiles == 1) return pin;
  whole_stats.resize(static_cast<size_t>(heads + n * G * 2));
  for (int64_t b = 0; b < n; ++b)  // [n][tiles][G][2] after the lse -> [n][G][2]
    plan_rules::BlockFromTiles(pin + heads + b * tiles * G * 2, static_cast<int>(tiles),
                               static_cast<int>(G), whole_stats.data() + heads + b * G * 2);
  return whole_stats.data();
}

int64_t HybridAttention::Impl::AttendTiled(const KVLayerView& v, const AttnArgs& a2, float* out,
                                           float* lse, int64_t tiles, int64_t key0,
                                           int64_t n_blocks, float* sums) {
  if (tiles > 1 && cuda::AttentionTileStats(q_dev, v, a2, out, lse, sm, ws, stream, key0,
                                            key0 + n_blocks * c.block_size, sums))
    return tiles;
  cuda::Attention(q_dev, v, a2, out, lse, sm, ws, stream);
  return 1;
}

void HybridAttention::Impl::PlanOrderStats(const float* gpu, const std::vector<int32_t>& at,
                                           const float* cpu, int64_t G) {
  all_stats.clear();
  for (const int32_t o : at) {
    const float* from = o >= 0 ? gpu + o : cpu;
    if (o < 0) cpu += G * 2;
    all_stats.insert(all_stats.end(), from, from + G * 2);
  }
}

bool HybridAttention::Impl::AllOnGpu(const LayerPlan& plan, int64_t n_g) const {
  if (n_g <= 0 || plan.blocks.empty()) return false;
  for (const auto& hb : plan.blocks)
    if (static_cast<int64_t>(hb.size()) != n_g) return false;
  return true;
}

int64_t HybridAttention::Impl::GpuSlotOf(int64_t layer, int64_t h, int64_t n_g, int32_t b) const {
  for (int64_t j = 0; j < n_g; ++j)
    if (resident.ViewBlock(layer, h, j) == b) return j;
  return -1;
}

bool HybridAttention::Impl::Score(int64_t layer, const RepresentativeStore& reps,
                                  const ScoreArgs& a, float* scores) {
  return !c.pos_remap && scorer.Score(layer, reps, a, q_dev, scores);
}

bool HybridAttention::Impl::ScoreTop(int64_t layer, const RepresentativeStore& reps,
                                     const ScoreArgs& a, bool sum_heads, int64_t want,
                                     std::vector<std::vector<Scored>>* top) {
  return !c.pos_remap && scorer.ScoreTop(layer, reps, a, sum_heads, want, q_dev, top);
}

}  // namespace needle
