// What one sequence's run needs besides the model: the model's KV cache and the attention policy,
// placed where the backend and the settings say. One factory for every command (generate, eval,
// benchmarks), so that each picks the same placement for the same settings:
//   dense                 the backend's cache (host DRAM or the GPU), dense attention;
//   sparse, CPU backend   a host cache, SparseAttention running its plan on the CPU;
//   sparse, CUDA backend  the hybrid engine (engine/cuda/hybrid.h): a GPU cache of dense layers
//                         and Initial + Local rings, the sparse layers in host DRAM
//                         (--kv-placement host); or every layer's KV in GPU memory, the GPU
//                         attending all selected blocks there (device); auto: device when it fits
//                         the GPU budget.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "engine/base/threading.h"
#include "engine/model/model.h"
#include "sparse_attn/sparse_attention.h"

namespace needle {

// Where a sparse sequence's KV cache lives on a GPU (--kv-placement).
enum class KVPlacement { kAuto, kHost, kDevice };
// "auto", "host" or "device"; else Error naming `what` and the value.
KVPlacement ParseKVPlacement(const std::string& s, const std::string& what);
const char* KVPlacementName(KVPlacement p);

struct SequenceAttention {
  std::unique_ptr<KVCache> cache;           // the model's cache
  std::unique_ptr<AttentionPolicy> policy;  // null: dense
  SparseAttention* planner = nullptr;       // the sparse planner in policy (null: dense)
  bool hybrid = false;
  std::string gpu_memory;  // hybrid: what it puts on the GPU, by item (one line)
  std::string placement;   // hybrid: the placement chosen and why (one line)
  bool device_kv = false;  // hybrid: --kv-placement device (chosen or asked for)
  size_t gpu_bytes = 0;    // hybrid: the GPU memory of its caches and buffers (not the weights)
};

struct SequenceOptions {
  int64_t ctx = 0;  // tokens the cache holds
  DType kv_type = DType::kBF16;
  size_t kv_memory = 0;   // the host KV cache's budget (0: available memory)
  size_t gpu_memory = 0;  // the hybrid's GPU budget (0: the GPU's free memory + the weights)
  size_t gpu_taken = 0;   // of gpu_memory, what other sequences' caches already take there
  int64_t ubatch = 512;
  KVPlacement placement = KVPlacement::kAuto;  // sparse on a GPU
  // Sequences that share gpu_memory (SlotCaches' slots): with more than one, the hybrid's GPU
  // block cache (SparseConfig::gpu_cache_blocks 0) keeps one step's share, the least, so that
  // the first sequence does not take what the later ones need.
  int64_t sequences = 1;
};

// Before the weights go to the GPU: throws Error naming every number when the hybrid engine (a
// GPU backend with sparse attention) cannot fit a `o.ctx`-token context, weights included, in
// o.gpu_memory (0: the GPU's free memory now). Nothing for other placements.
void CheckSequenceFits(Backend& backend, const ModelConfig& m, const ModelWeights& w,
                       const SparseConfig* sparse, const SequenceOptions& o);

// sparse: null for dense attention. Throws Error naming the numbers when the context does not
// fit the memory budgets (before allocating the caches).
SequenceAttention MakeSequenceAttention(Model& model, const SparseConfig* sparse,
                                        ThreadingContext& tc, const SequenceOptions& o);

// The maker of `slots` sequences' caches under shared budgets (the Engine's slots:
// EngineOptions::own_caches): each of ctx tokens, with 1/slots of base.kv_memory (0: of the
// host's available memory now), and of base.gpu_memory what the slots made before it left
// (gpu_taken). said (may be empty): called with each one made (to print its placement).
// model, sparse and tc must outlive it.
std::function<SequenceAttention(int64_t ctx, size_t gpu_taken)> SlotCaches(
    Model& model, const SparseConfig& sparse, ThreadingContext& tc, SequenceOptions base,
    int64_t slots, std::function<void(const SequenceAttention&)> said);

}  // namespace needle
