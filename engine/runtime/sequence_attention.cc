#include "engine/runtime/sequence_attention.h"

#include "engine/base/error.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/hybrid.h"
#endif

namespace needle {

void CheckSequenceFits(Backend& backend, const ModelConfig& m, const ModelWeights& w,
                       const SparseConfig* sparse, const SequenceOptions& o) {
  if (sparse == nullptr || backend.kv_memory() == nullptr) return;
#ifdef NEEDLE_HAVE_CUDA
  const size_t weights = w.TotalBytes();
  const size_t budget = o.gpu_memory != 0 ? o.gpu_memory : backend.kv_memory()->AvailableBytes();
  // The residual stream of a prompt may live in host memory: the smaller need is the one checked.
  CheckHybridBudget(HybridGpuNeeds(m, *sparse, o.ctx, o.kv_type, weights, o.ubatch, false), budget,
                    o.gpu_memory != 0 ? "--gpu-memory" : "the GPU's free memory");
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
  const size_t budget =
      o.gpu_memory != 0 ? o.gpu_memory : b.kv_memory()->AvailableBytes() + weights;
  const std::string name = o.gpu_memory != 0 ? "--gpu-memory" : "the GPU's free memory";
  // The prompt's residual stream stays on the GPU when it fits, else it goes through host memory.
  HybridGpuMemory need = HybridGpuNeeds(m, *sparse, o.ctx, o.kv_type, weights, o.ubatch, true);
  const bool residual_on_gpu = need.total() <= budget;
  if (!residual_on_gpu)
    need = HybridGpuNeeds(m, *sparse, o.ctx, o.kv_type, weights, o.ubatch, false);
  CheckHybridBudget(need, budget, name);
  s.gpu_memory = need.Describe() + " (budget " + FormatBytes(budget) + ", " + name + ")";
  s.cache =
      std::make_unique<KVCache>(HybridDeviceShape(m, *sparse, o.ctx, o.kv_type), 0, b.kv_memory());
  auto p = std::make_unique<HybridAttention>(m, *sparse, b, tc, o.ctx, o.kv_type, o.kv_memory,
                                             residual_on_gpu);
  s.planner = &p->planner();
  s.policy = std::move(p);
  s.hybrid = true;
  return s;
#else
  Fail("sparse attention on a GPU: this needle was built without CUDA");
#endif
}

}  // namespace needle
