#include "engine/runtime/sequence_attention.h"

#include <algorithm>

#include "engine/base/error.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/hybrid.h"
#endif

namespace needle {

KVPlacement ParseKVPlacement(const std::string& s, const std::string& what) {
  if (s == "auto") return KVPlacement::kAuto;
  if (s == "host") return KVPlacement::kHost;
  if (s == "device") return KVPlacement::kDevice;
  Fail(what, ": expected auto, host or device, got '", s, "'");
}

const char* KVPlacementName(KVPlacement p) {
  return p == KVPlacement::kHost ? "host" : p == KVPlacement::kDevice ? "device" : "auto";
}

void CheckSequenceFits(Backend& backend, const ModelConfig& m, const ModelWeights& w,
                       const SparseConfig* sparse, const SequenceOptions& o) {
  if (sparse == nullptr || backend.kv_memory() == nullptr) return;
#ifdef NEEDLE_HAVE_CUDA
  const size_t weights = w.TotalBytes();
  const size_t budget = o.gpu_memory != 0 ? o.gpu_memory : backend.kv_memory()->AvailableBytes();
  // The residual stream of a prompt may live in host memory: the smaller need is the one checked
  // (with auto, that of the host placement).
  CheckHybridBudget(HybridGpuNeeds(m, *sparse, o.ctx, o.kv_type, weights, o.ubatch, false,
                                   o.placement == KVPlacement::kDevice),
                    budget, o.gpu_memory != 0 ? "--gpu-memory" : "the GPU's free memory");
#else
  (void)m, (void)w, (void)o;
#endif
}

SequenceAttention MakeSequenceAttention(Model& model, const SparseConfig* sparse,
                                        ThreadingContext& tc, const SequenceOptions& o) {
  SequenceAttention s;
  Backend& b = model.backend();
  const int64_t block = sparse != nullptr ? sparse->block_size : 128;
  if (sparse == nullptr) {
    s.cache = std::make_unique<KVCache>(model.CacheShape(o.ctx, o.kv_type, block), o.kv_memory,
                                        b.kv_memory());
    return s;
  }
  if (b.kv_memory() == nullptr && o.placement == KVPlacement::kDevice)
    Fail(
        "--kv-placement device: the model runs on the CPU, whose KV cache is in host memory "
        "(device placement is for --device cuda)");
  if (b.kv_memory() == nullptr) {  // the CPU: everything in host DRAM
    s.cache =
        std::make_unique<KVCache>(model.CacheShape(o.ctx, o.kv_type, block), o.kv_memory, nullptr);
    auto p = std::make_unique<SparseAttention>(model.config(), *sparse, b, tc, o.ctx, o.kv_type);
    s.planner = p.get();
    s.policy = std::move(p);
    return s;
  }
#ifdef NEEDLE_HAVE_CUDA
  const ModelConfig& m = model.config();
  const size_t weights = model.weights().TotalBytes();
  // (The GPU's free memory already lacks what other sequences took; --gpu-memory does not.)
  const size_t taken = o.gpu_memory != 0 ? std::min(o.gpu_taken, o.gpu_memory) : 0;
  const size_t budget =
      o.gpu_memory != 0 ? o.gpu_memory - taken : b.kv_memory()->AvailableBytes() + weights;
  const std::string name = o.gpu_memory == 0 ? "the GPU's free memory"
                           : taken == 0      ? "--gpu-memory"
                                             : "--gpu-memory less the " + FormatBytes(taken) +
                                              " that other sequences' caches take";
  // Device placement (every layer's KV on the GPU) where asked, or with auto where it fits; the
  // prompt's residual stream stays on the GPU when it fits, else it goes through host memory.
  SparseConfig sc = *sparse;
  const auto needs = [&](bool device, bool residual) {
    return HybridGpuNeeds(m, sc, o.ctx, o.kv_type, weights, o.ubatch, residual, device);
  };
  bool device = o.placement == KVPlacement::kDevice;
  if (o.placement == KVPlacement::kAuto) {
    const size_t whole = needs(true, false).total();
    device = whole <= budget;
    s.placement =
        std::string("--kv-placement auto: ") +
        (device ? "device (every layer's KV fits in " : "host (the whole KV cache needs ") +
        FormatBytes(whole) + (device ? " of " : ", more than ") + FormatBytes(budget) + ")";
  } else {
    s.placement = std::string("--kv-placement ") + KVPlacementName(o.placement);
  }
  HybridGpuMemory need = needs(device, true);
  const bool residual_on_gpu = need.total() <= budget;
  if (!residual_on_gpu) need = needs(device, false);
  CheckHybridBudget(need, budget, name);
  if (!device && sc.gpu_cache_blocks == 0 && o.sequences == 1) {
    // The GPU block cache, sized here (--gpu-cache-blocks 0) from the room the budget has.
    sc.gpu_cache_blocks =
        HybridAutoCacheBlocks(m, sc, o.ctx, o.kv_type, weights, o.ubatch, residual_on_gpu, budget,
                              HybridAutoCacheShares(o.kv_type));
    need = needs(device, residual_on_gpu);
  }
  if (!device) s.gpu_memory = std::to_string(sc.GpuContextSlots()) + " GPU block cache slots; ";
  s.gpu_memory += need.Describe() + " (budget " + FormatBytes(budget) + ", " + name + ")";
  s.cache = std::make_unique<KVCache>(HybridDeviceShape(m, sc, o.ctx, o.kv_type, device), 0,
                                      b.kv_memory());
  auto p = std::make_unique<HybridAttention>(m, sc, b, tc, o.ctx, o.kv_type, o.kv_memory,
                                             residual_on_gpu, device);
  s.planner = &p->planner();
  s.policy = std::move(p);
  s.hybrid = true;
  s.device_kv = device;
  s.gpu_bytes = need.total() - need.weights;
  return s;
#else
  Fail("sparse attention on a GPU: this needle was built without CUDA");
#endif
}

std::function<SequenceAttention(int64_t ctx, size_t gpu_taken)> SlotCaches(
    Model& model, const SparseConfig& sparse, ThreadingContext& tc, SequenceOptions base,
    int64_t slots, std::function<void(const SequenceAttention&)> said) {
  base.kv_memory = (base.kv_memory != 0 ? base.kv_memory : AvailableMemoryBytes()) /
                   static_cast<size_t>(std::max<int64_t>(slots, 1));
  base.sequences = std::max<int64_t>(slots, 1);
  return [&model, &sparse, &tc, base, said](int64_t ctx, size_t gpu_taken) {
    SequenceOptions o = base;
    o.ctx = ctx, o.gpu_taken = gpu_taken;
    SequenceAttention a = MakeSequenceAttention(model, &sparse, tc, o);
    if (said) said(a);
    return a;
  };
}

}  // namespace needle
