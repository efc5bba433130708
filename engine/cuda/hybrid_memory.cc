// The hybrid engine's layout and GPU memory accounting (engine/cuda/hybrid.h): which layers stay
// whole on the GPU, the shape of its GPU cache, and the budget check made before anything is
// allocated.
#include <algorithm>
#include <sstream>
#include <string>

#include "engine/base/error.h"
#include "engine/base/switches.h"
#include "engine/cuda/chunk_layout.h"
#include "engine/cuda/hybrid.h"

namespace needle {

bool HybridDenseLayer(const ModelConfig& m, const SparseConfig& c, int64_t layer) {
  // (With sparse prefill the first dense_layers attend sparsely past the trained length:
  // SparseAttention::DenseLayer. Their keys then live in host memory like any sparse layer's.)
  return (layer < c.dense_layers && !c.sparse_prefill) ||
         m.sliding_window[static_cast<size_t>(layer)] > 0;
}

KVCacheShape HybridHostShape(const ModelConfig& m, const SparseConfig& c, int64_t ctx,
                             DType kv_type) {
  return KVCacheShape(m.num_layers, m.num_kv_heads, m.head_dim, ctx, c.block_size, kv_type);
}

KVCacheShape HybridStagingShape(const ModelConfig& m, const SparseConfig& c, int64_t ctx,
                                DType kv_type) {
  const int64_t extra =
      c.sparse_prefill ? ChunkExtraSlots(c.init_end(), c.topk, c.block_size) * c.block_size : 0;
  const int64_t blocks = (ctx + c.block_size - 1) / c.block_size;
  return KVCacheShape(1, m.num_kv_heads, m.head_dim, blocks * c.block_size + extra, c.block_size,
                      kv_type);
}

KVCacheShape HybridDeviceShape(const ModelConfig& m, const SparseConfig& c, int64_t ctx,
                               DType kv_type, bool device_kv) {
  KVCacheShape s(m.num_layers, m.num_kv_heads, m.head_dim, ctx, c.block_size, kv_type);
  s.ring_layer.resize(static_cast<size_t>(m.num_layers));
  for (int64_t l = 0; l < m.num_layers; ++l) s.ring_layer[l] = HybridDenseLayer(m, c, l) ? 0 : 1;
  s.pinned_blocks = c.init_end() / c.block_size;
  // The Local region [LocalBegin(p), p] spans at most ceil(local_window / B) + 1 blocks.
  s.ring_blocks = (c.local_window + c.block_size - 1) / c.block_size + 1;
  s.extra_blocks = c.GpuContextSlots();  // the GPU's part of the Context blocks
  if (device_kv) {                       // a ring that never wraps; every selected block on the GPU
    s.ring_blocks = (ctx + c.block_size - 1) / c.block_size + 1;
    s.extra_blocks = c.topk;
  }
  return s;
}

std::string HybridGpuMemory::Describe() const {
  std::ostringstream os;
  os << "weights " << FormatBytes(weights) << ", dense-layer KV " << FormatBytes(dense_kv)
     << (device_kv ? ", sparse-layer KV (every block) "
                   : ", Initial + Local + gathered Context KV ")
     << FormatBytes(window_kv) << ", prompt staging " << FormatBytes(staging_kv)
     << ", representatives " << FormatBytes(reps) << ", activations " << FormatBytes(activations)
     << ", scratch " << FormatBytes(scratch) << ": total " << FormatBytes(total());
  return os.str();
}

namespace {
// RepresentativeStore's bytes for every layer (its storage: f32 for an f32 cache, else bf16).
size_t RepsBytes(const ModelConfig& m, const SparseConfig& c, int64_t ctx, DType kv) {
  const int64_t blocks = (ctx + c.block_size - 1) / c.block_size;
  const int64_t rows = c.repr == ReprType::kQuest ? 2 : 1;
  return static_cast<size_t>(m.num_layers * blocks * m.num_kv_heads * rows * m.head_dim) *
         (kv == DType::kF32 ? 4 : 2);
}
}  // namespace

HybridGpuMemory HybridGpuNeeds(const ModelConfig& m, const SparseConfig& c, int64_t ctx,
                               DType kv_type, size_t weight_bytes, int64_t ubatch,
                               bool residual_on_gpu, bool device_kv) {
  HybridGpuMemory g;
  g.weights = weight_bytes;
  g.device_kv = device_kv;
  const KVCacheShape s = HybridDeviceShape(m, c, ctx, kv_type, device_kv);
  for (int64_t l = 0; l < s.layers; ++l)
    (s.IsRing(l) ? g.window_kv : g.dense_kv) +=
        s.SlotBytes() * static_cast<size_t>(s.LayerSlots(l));
  g.staging_kv = HybridStagingShape(m, c, ctx, kv_type).TotalBytes();
  g.reps = RepsBytes(m, c, ctx, kv_type);
  // Model::Buffers of a micro-batch (x, h, q, k, v, att, gate, up) and the logits row, in f32.
  const int64_t U = std::min(ubatch, ctx);
  const size_t per_token = static_cast<size_t>(2 * m.hidden_size + 2 * m.q_dim() + 2 * m.kv_dim() +
                                               2 * m.intermediate_size);
  g.activations = (per_token * static_cast<size_t>(U) + static_cast<size_t>(m.vocab_size)) * 4;
  // The prompt's residual stream, or the two micro-batch slots it moves through from host memory
  // (Backend::HostResidual).
  g.activations += static_cast<size_t>((residual_on_gpu ? ctx : 2 * U) * m.hidden_size) * 4;
  // Attention split partials (up to 2 per multiprocessor, generous), the merge's inputs, tables,
  // cuBLAS workspace.
  // Host placement: the device plan's block-to-slot map (hybrid_host_plan.cc), every layer and
  // KV head, a block of the context each.
  g.scratch = static_cast<size_t>(264 * m.num_heads * (m.head_dim + 2)) * 4 * 2 +
              static_cast<size_t>(s.num_blocks()) * 4 + (size_t{64} << 20) +
              (device_kv ? size_t{0}
                         : static_cast<size_t>(m.num_layers * m.num_kv_heads *
                                               HostPlanMapBlocks(ctx, c.block_size)) *
                               4);
  return g;
}

int64_t HybridAutoCacheBlocks(const ModelConfig& m, const SparseConfig& c, int64_t ctx,
                              DType kv_type, size_t weight_bytes, int64_t ubatch,
                              bool residual_on_gpu, size_t budget, int64_t shares) {
  if (c.gpu_cache_blocks != 0) return c.gpu_cache_blocks;
  SparseConfig x = c;
  const int64_t least = c.GpuContextSlots();
  const auto bytes = [&](int64_t slots) {
    x.gpu_cache_blocks = slots;
    return HybridGpuNeeds(m, x, ctx, kv_type, weight_bytes, ubatch, residual_on_gpu).total();
  };
  const size_t base = bytes(least), per_slot = bytes(least + 1) - base;
  if (least == 0 || base >= budget || per_slot == 0) return least;
  const auto room = static_cast<int64_t>((budget - base) / per_slot);
  return least + std::min(room, (std::max<int64_t>(shares, 1) - 1) * least);
}

bool HybridHostPlanSwitch() { return EnvSwitch("NEEDLE_HYBRID_DEVICE_PLAN", 1) != 0; }

int64_t HybridAutoCacheShares(DType kv_type) {
  // (The GPU plans with the TMA decode kernel: bf16 or f16 caches; HostPlanAttentionOk.)
  const bool gpu_plans =
      HybridHostPlanSwitch() && (kv_type == DType::kBF16 || kv_type == DType::kF16);
  return gpu_plans ? SparseConfig::kAutoGpuCacheSharesHostPlan : SparseConfig::kAutoGpuCacheShares;
}

void CheckHybridBudget(const HybridGpuMemory& need, size_t budget, const std::string& name) {
  if (need.total() > budget)
    Fail("the hybrid engine needs ", FormatBytes(need.total()), " of GPU memory (", need.Describe(),
         ") but ", name, " is ", FormatBytes(budget),
         ": use a shorter context, a smaller --local-window, fewer --dense-layers or a larger "
         "--gpu-memory");
}

}  // namespace needle
