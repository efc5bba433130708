// The hybrid engine (--device cuda --attention sparse): the model runs on the GPU, the keys and
// values of every sparse layer live in host DRAM, and each decode query attends its Initial and
// Local keys on the GPU and its selected Context blocks on the CPU; the two results merge by
// log-sum-exp on the GPU. docs/ARCHITECTURE.md has the picture and one decode step in order.
//
// With --kv-placement device (when every layer's KV fits in GPU memory, issue 18's setting) each
// sparse layer's ring holds the whole context and the GPU attends every selected block there
// (gathered from its own cache into the extra slots, as --gpu-share 100 gathers them from the
// host); the host cache stays the planner's copy (representatives, votes), and nothing of the
// plan changes.
// Memory (the block layout of kvcache/ everywhere):
//   GPU  the model's cache (HybridDeviceShape): dense layers (the first dense_layers and
//        sliding-window ones) whole; each sparse layer as a ring of its Initial blocks plus
//        enough blocks for the Local window. A staging layer of the whole context, where a
//        prompt's sparse layer is computed (the prompt runs layer by layer, so one is enough).
//   host every sparse layer's keys and values for the whole context: the ground truth of the
//        Context blocks, what the planner (sparse_attn/) reads; page-locked as it fills.
// With --gpu-share P (SparseConfig::gpu_share), the GPU attends P% of each KV head's selected
// Context blocks itself, reading them from the host cache over PCIe into extra ring slots while
// the CPU attends the rest (context_gather.h); the blocks stay there (--gpu-cache-blocks slots,
// the least recently attended making way), and a block selected again at a later step is not
// read again (resident_blocks.h); the blocks the CPU attended are copied there in the background,
// and the GPU attends more than its share where it holds more of a step's selection.
// The planner is the CPU path's SparseAttention, unchanged: this class is its executor
// (PlanExecutor), so --dump-plan is the same wherever the keys lie.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "engine/cpu/ops.h"
#include "engine/model/model.h"
#include "sparse_attn/sparse_attention.h"

namespace needle {

// Whether `layer` attends every key at every step (so the hybrid keeps it whole on the GPU).
bool HybridDenseLayer(const ModelConfig& m, const SparseConfig& c, int64_t layer);
// The hybrid engine's GPU cache of a `ctx`-token context. device_kv (--kv-placement device): the
// sparse layers' rings hold the whole context, and extra slots for every selected block.
KVCacheShape HybridDeviceShape(const ModelConfig& m, const SparseConfig& c, int64_t ctx,
                               DType kv_type, bool device_kv = false);

// The host cache: every layer's shape, but only the sparse layers are written (the dense layers'
// blocks are never touched, and an anonymous mapping commits no memory for them).
KVCacheShape HybridHostShape(const ModelConfig& m, const SparseConfig& c, int64_t ctx,
                             DType kv_type);
// The GPU's staging layer, where a prompt's sparse layer is computed: one layer of the whole
// context and, with --prefill sparse, extra slots after it for a chunk's gathered and rotated
// blocks (chunk_layout.h), from slot num_blocks(ctx) on.
KVCacheShape HybridStagingShape(const ModelConfig& m, const SparseConfig& c, int64_t ctx,
                                DType kv_type);

// What the hybrid engine puts on the GPU, by item (bytes), and the check against a budget.
struct HybridGpuMemory {
  size_t weights = 0;
  size_t dense_kv = 0;     // dense layers, whole
  size_t window_kv = 0;    // the sparse layers' rings (Initial + Local + gathered Context)
  size_t staging_kv = 0;   // one layer of the whole context (prompts)
  size_t activations = 0;  // a micro-batch's activations, the prompt's residual stream if kept
  size_t reps = 0;         // the representatives of every block (scored on the GPU)
  size_t scratch = 0;      // attention workspaces, tables, the merge's inputs
  bool device_kv = false;  // window_kv holds the sparse layers' whole KV (--kv-placement device)
  size_t total() const {
    return weights + dense_kv + window_kv + staging_kv + reps + activations + scratch;
  }
  std::string Describe() const;  // one line, every item
};
// weight_bytes: the model's weights on the GPU; ubatch: tokens per micro-batch.
HybridGpuMemory HybridGpuNeeds(const ModelConfig& m, const SparseConfig& c, int64_t ctx,
                               DType kv_type, size_t weight_bytes, int64_t ubatch,
                               bool residual_on_gpu, bool device_kv = false);
// Throws Error naming every item, the total and the budget when they do not fit.
void CheckHybridBudget(const HybridGpuMemory& need, size_t budget, const std::string& budget_name);
// SparseConfig::gpu_cache_blocks for gpu_cache_blocks 0 (host placement, c's as given otherwise):
// the least (one step's share) plus as many slots as `budget` has room for beside the needs
// (HybridGpuNeeds' arguments), up to `shares` shares in all (HybridAutoCacheShares).
int64_t HybridAutoCacheBlocks(const ModelConfig& m, const SparseConfig& c, int64_t ctx,
                              DType kv_type, size_t weight_bytes, int64_t ubatch,
                              bool residual_on_gpu, size_t budget,
                              int64_t shares = SparseConfig::kAutoGpuCacheShares);
// Whether host placement's decode steps are planned on the GPU (hybrid_host_plan.cc) where they
// can be: on unless NEEDLE_HYBRID_DEVICE_PLAN=0 (read at each call: a sequence's). Qwen2.5-7B
// 1M on an H100 host, 24G, alternated in one lease: 81.9 / 84.1 tok/s against the host's own
// plans' 74.8 / 74.5 (bench/RESULTS.md).
bool HybridHostPlanSwitch();
// The block-to-slot map's entries a layer and KV head where the GPU plans host placement: every
// block of a context of `tokens`, and one past it.
inline int64_t HostPlanMapBlocks(int64_t tokens, int64_t block_size) {
  return (tokens + block_size - 1) / block_size + 1;
}
// The shares HybridAutoCacheBlocks may give a sequence of host placement with KV type kv_type:
// more where the GPU plans its steps (the host's work does not grow with the slots).
int64_t HybridAutoCacheShares(DType kv_type);

// Where a decode step's time went, summed over steps (host clock, seconds).
struct HybridStats {
  int64_t steps = 0;         // decode steps
  double plan = 0;           // the planner: representatives, scoring, top-k, retention
  double cpu_attend = 0;     // the CPU's Context blocks (what is left once the GPU's are queued)
  double copies = 0;         // q, new K/V rows and partials between GPU and host
  double gpu_wait = 0;       // waiting for the GPU: the layer's q and shortlist, its own partial
  double gpu_wait_part = 0;  // of gpu_wait: for its partial, after the CPU's blocks were done
  // GPU-planned host placement: cpu_attend, copies (the fills' bookkeeping and launches) and
  // gpu_wait (for the layer's selection) are the host worker's, beside the model's thread;
  // host_wait is the model's thread waiting (asleep) for the worker.
  double host_wait = 0;
  // The worker's CPU attention (cpu_attend) by phase: the items and queries, the threads' start,
  // the fold, the merge.
  fast::FoldTimes fold;
  // The GPU's side of the handshake with the worker (cuda::HandshakeSums, Post on): the GPU
  // waiting in JoinHost; from the selection's flag to the end of that wait; of that, the worker's
  // own time from seeing the selection to its flag, and the rest (join_span less join_host): the
  // two flags' crossings.
  double join_idle = 0, join_span = 0, join_host = 0, handshake = 0;
  // Each crossing alone (the clocks' offset in both, with opposite signs): summed over
  // handshakes, and each one's least, seconds (cuda::HandshakeSums).
  double to_host = 0, to_gpu = 0, to_host_least = 0, to_gpu_least = 0;
  int64_t handshakes = 0;
  // Of plan: the executor's host work before the CPU's blocks: placing the GPU's share and
  // queuing its copies (ResidentBlocks, PlaceContext, QueueGather), then queuing the GPU's
  // attention (the window's block table, the kernels, the lse copy).
  double gather = 0, launch = 0;
  // Decode: host time from the step's start until the last layer's work is queued (the model's
  // too). Near the step's time, the GPU waits for the host to queue its work; far below it, the
  // host waits for the GPU.
  double enqueue = 0;
  // Context blocks (one KV head's each) attended by the GPU (read from host memory over PCIe,
  // SparseConfig::gpu_share) and by the CPU, summed over layers and steps.
  int64_t gpu_blocks = 0, cpu_blocks = 0;
  // Of gpu_blocks, those already in GPU memory from an earlier step (not read over PCIe).
  int64_t gpu_reused = 0;
  // Blocks (one KV head's each) the CPU attended, copied into the GPU's slots in the background
  // for later steps (HybridAttention's fills, NEEDLE_HYBRID_FILL).
  int64_t gpu_filled = 0;
  // Prompts' sparse layers, summed over micro-batches and layers (host clock, seconds): page-
  // locking the host cache as it fills, waiting for the GPU before planning (the layer's
  // projections and everything queued before), and the planner (queuing its chunks included).
  double prompt_pin = 0, prompt_wait = 0, prompt_plan = 0;
  // Decode steps the GPU planned (device placement), GPU time per phase (seconds, summed over
  // layers and steps; CUDA events between the phases, only with NEEDLE_HYBRID_PROFILE=1): the
  // model's own work between sparse layers' attention, the new row's copy to the host, the
  // planner's host work until it queues the scoring (the GPU idle if it waits for the host), the
  // representatives' upload, scoring, top-k, the selection (with the attention's per-head block
  // tables), the attention, the selected blocks' softmax sums, retention's masses and choice,
  // and (host placement) the CPU's partial's copy and the merge, from the end of the GPU's
  // attention: the GPU idle while the CPU attends its blocks.
  static constexpr int kPhases = 11;
  static const char* PhaseName(int i) {
    static const char* const names[kPhases] = {"model", "row",    "plan",   "upload",
                                               "score", "topk",   "select", "attend",
                                               "sums",  "retain", "merge"};
    return names[i];
  }
  double gpu_phase[kPhases] = {};
  // The representatives' copies to the GPU (cuda::GpuBlockScorer::UploadCounts): full stamp
  // checks, blocks copied, host seconds.
  int64_t rep_checks = 0, rep_blocks = 0;
  double rep_host = 0;
};

class HybridAttention final : public AttentionPolicy {
 public:
  // gpu: the CUDA backend the model runs on; max_tokens: the context; host_limit: the host
  // cache's budget (--kv-memory; 0: available memory); residual_on_gpu: whether a prompt keeps
  // its residual stream on the GPU (else in host memory); device_kv: --kv-placement device (the
  // model's cache is HybridDeviceShape's with device_kv).
  HybridAttention(const ModelConfig& m, const SparseConfig& c, Backend& gpu, ThreadingContext& tc,
                  int64_t max_tokens, DType kv_type, size_t host_limit, bool residual_on_gpu,
                  bool device_kv = false);
  ~HybridAttention() override;

  SparseAttention& planner();
  // Benchmarks (bench_hybrid's synthetic contexts, for lengths whose prefill would not fit the
  // device time): the caller wrote tokens [0, P) of every sparse layer into host_cache() and of
  // every dense layer into `model_cache`; this indexes their representatives (Quest, Max or
  // Mean), copies the Initial and Local blocks to the rings and marks both caches P long, as a
  // prefill would leave them (no retention seed, no observation window).
  KVCache& host_cache();
  void AdoptContext(KVCache& model_cache, int64_t P);
  const HybridStats& stats() const;
  // The extra GPU slots of a sparse layer that hold Context blocks (SparseConfig::GpuContextSlots
  // of the configuration it was made with).
  int64_t gpu_slots() const;
  // Brings stats() up to date with every step so far (the last step's rows, profile marks and
  // uploads are otherwise read when the next step begins); waits for the GPU.
  void SyncStats();
  void Reset();  // a new sequence (the caller clears the model's cache)
  // AttentionPolicy::Rewind: the host cache and the model's cache (dense layers, rings) truncated,
  // the planner rewound (SparseAttention::Rewind). The prompt that goes on brings the sparse
  // layers' earlier keys back to the staging layer and refills the rings, as any prompt that
  // continues a sequence does.
  void Rewind(KVCache& model_cache, int64_t tokens) override;
  bool AttendsBackendMemory() const override { return true; }

  void BeginStep(const StepInfo& s) override;
  void StepQueued() override;
  void Attend(int64_t layer, const float* q, const AttnArgs& a, KVCache& cache,
              float* out) override;
  KVTarget Target(int64_t layer, KVCache& cache) override;
  Prefill PrefillOrder(int64_t T) const override;
  void EndPrefill() override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace needle
