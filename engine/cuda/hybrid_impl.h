// The hybrid engine's implementation (hybrid.h), shared by its files: hybrid.cc (construction,
// prompts, the policy's calls), hybrid_decode.cc (a decode step's plan carried out: the GPU's
// window and gathered blocks, the CPU's blocks, the merge). Not part of the interface.
#pragma once

#include "engine/cuda/hybrid.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/base/error.h"
#include "engine/base/seconds.h"
#include "engine/cuda/attention.h"
#include "engine/cuda/chunk_prefill.h"
#include "engine/cuda/context_gather.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/hybrid_select.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/kv_rows.h"
#include "engine/cuda/pinned_host.h"
#include "engine/cuda/resident_blocks.h"

namespace needle {

namespace hybrid {
// The log-sum-exp of two partials, as cuda::MergeAttention computes it.
inline float MergeLse(float a, float b) {
  const float M = std::max(a, b);
  const float wa = a == -INFINITY ? 0.f : std::exp(a - M),
              wb = b == -INFINITY ? 0.f : std::exp(b - M);
  const float sum = wa + wb;
  return sum > 0.f ? M + std::log(sum) : -INFINITY;
}
}  // namespace hybrid

struct HybridAttention::Impl final : PlanExecutor {
  Impl(const ModelConfig& m_, const SparseConfig& c_, Backend& gpu_, ThreadingContext& tc_,
       int64_t max_tokens, DType kv, size_t host_limit, bool residual_on_gpu_, bool device_kv_);

  ~Impl() override;

  bool Dense(int64_t layer) const { return HybridDenseLayer(m, c, layer); }
  // Host time spent inside the executor (not the planner's own).
  double ExecutorTime() const {
    return stats.cpu_attend + stats.copies + stats.gpu_wait + stats.host_wait;
  }
  void Sync(double* into) {
    const auto t = Clock::now();
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (into != nullptr) *into += Since(t);
  }
  void D2H(void* dst, const void* src, size_t bytes) {
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
  }
  // n floats from the device into host memory, through pinned memory, waiting for them.
  void LseToHost(const float* dev, int64_t n, float* host_dst) {
    float* pin = lse_pin.Get(static_cast<size_t>(n));
    D2H(pin, dev, static_cast<size_t>(n) * 4);
    Sync(nullptr);
    std::copy_n(pin, n, host_dst);
  }
  void H2D(void* dst, const void* src, size_t bytes) {
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
  }
  // Copies blocks [b0, b1) of one layer between caches of the same shape per block (K and V;
  // consecutive slots on both sides go as one copy).
  void CopyBlocks(const KVCache& src, int64_t sl, KVCache& dst, int64_t dl, int64_t b0, int64_t b1,
                  cudaMemcpyKind kind);

  // Page-locks the host cache's blocks [b0, b1) of `layer` (K and V; slots are assigned in
  // order, so the range between the lowest and highest slot). False when CUDA refused.
  bool PinHost(int64_t layer, int64_t b0, int64_t b1);

  // --- prompts: layer by layer; a sparse layer's keys in the staging layer ----------------------
  // Page-locks the host cache's range of the prompt in the next sparse layer after `layer` on
  // another thread, while this layer computes (registering fresh memory costs about a third of a
  // second per GB: bench/RESULTS.md).
  // Host placement planned on the GPU: the block of the decode step's row, assigned and
  // page-locked in every sparse layer before the step's first job (BeginStep).
  void PinStepRows();
  void PinAhead(int64_t layer);
  void JoinPinAhead();

  void StartPromptLayer(int64_t layer);

  void PromptAttend(int64_t layer, const AttnArgs& a);

  // Sparse prefill (chunk_prefill.h): the chunks' scoring queries, then each chunk's attention.
  bool ChunkQueries(int64_t, const AttnArgs& a, float* qa, float* qb) override;
  bool ChunkTop(int64_t, const AttnArgs& a, std::vector<std::vector<Scored>>* top) override;
  bool PrefillChunk(int64_t, const float*, const AttnArgs& a, const KVLayerView&, const Chunk& ch,
                    float* out, float* lse) override;

  // --- decode ----------------------------------------------------------------------------------
  // The view of a sparse layer's ring as one causal sequence: Initial blocks, the n_g Context
  // blocks gathered into its extra slots (PlaceContext, QueueGather), then the Local blocks,
  // renumbered (the keys were rotated at their true positions when written, and a query's softmax
  // does not depend on their order). *a2: the query's arguments over it. init false: Local alone
  // (with position remapping the CPU attends the Initial keys, which move). per_head: a table
  // per KV head (KVLayerView::table_head_stride), whose n_g Context entries [Initial blocks,
  // + n_g) the caller writes on the stream after this call (the device plan's selection: each
  // head's selected blocks where they lie in the ring; the hybrid's share: QueueGather).
  // upload false: the table is left to the caller to write on the stream (table_host holds it,
  // [kv_head][n], the Context entries standing in).
  KVLayerView WindowView(int64_t layer, const AttnArgs& a, int64_t n_g, AttnArgs* a2,
                         bool init = true, bool per_head = false, bool upload = true);

  // How many of each KV head's selected blocks the GPU attends (SparseConfig::gpu_share of the
  // shortest list, at most the extra slots); 0: the CPU attends them all.
  int64_t GpuShare(const LayerPlan& plan) const;
  // Places the GPU's n_g blocks of every KV head in the layer's extra slots (ResidentBlocks: the
  // ones already there stay); `copies` lists the others, to copy from the host cache
  // (QueueGather queues them). Returns n_g, or 0 where CUDA refused to page-lock a block to read
  // (the CPU attends everything from then on).
  int64_t PlaceContext(int64_t layer, const LayerPlan& plan, int64_t n_g);
  // Queues those copies and, in the same kernel, the per-head table of the view v (WindowView's,
  // not uploaded): table_host with each KV head's n_g Context entries the extra slots that hold
  // the blocks it attends (ResidentBlocks::ViewSlot). Nothing where n_g is 0.
  void QueueGather(int64_t layer, const KVLayerView& v, int64_t n_g);
  // One GatherBlocks on stream s: `list`'s blocks from `from` (the host cache, or the model's
  // own for device placement) into the layer's extra slots, the kernel's source and destination
  // lists written to pin [2 * list.size()] (pinned, read when it runs); e, max_blocks as there.
  void QueueCopies(int64_t layer, KVCache& from, const std::vector<ResidentBlocks::Copy>& list,
                   int32_t* pin, cudaStream_t s, const cuda::TableEntries& e, int max_blocks);
  // Queues the background copy of `lists` ([kv_head] blocks the CPU attends at this step) that the
  // GPU does not hold into free or least recently used slots (ResidentBlocks::Fill). The stream
  // waits for a layer's fills before its next copies and attention there (QueueGather).
  void QueueFill(int64_t layer, const std::vector<std::vector<int32_t>>& lists);
  // Its first part, and QueueMapFill's: once the layer's last fill is done, `fills` the copies
  // ResidentBlocks::Fill chose, their host blocks page-locked; false (fills empty) where CUDA
  // refused to page-lock one.
  bool TakeFills(int64_t layer, const std::vector<std::vector<int32_t>>& lists);
  // Waits for every fill in flight, then forgets what the slots hold (a new sequence or prompt).
  void ClearResident();

  // The new token's K/V row of a sparse layer, from its ring to the host cache through pinned
  // memory (kv_rows.h): queued with the query, copied into the cache once the host has waited.
  // later: a step the executor plans (the host waits for no layer): the row stays in the device
  // cache until the next step begins; FlushRows then copies the step's rows of every layer at
  // once (kv_rows.h, QueueRowsToPinned).
  void RowToPinned(int64_t layer, int64_t p, bool later = false);
  void RowToCache(int64_t layer, int64_t p) { RowFromPinned(RowPin(), host, layer, p); }
  uint8_t* RowPin() {
    return reinterpret_cast<uint8_t*>(row_pin.Get((KVRowBytes(host.shape()) + 3) / 4));
  }
  void FlushRows();

  // --- executor plans (hybrid_device_plan.cc): device placement's steps planned on the GPU ----
  bool PlansDecode() const override;
  void PlanDecode(int64_t layer, const float*, const AttnArgs& a, const KVLayerView&,
                  const RepresentativeStore& reps, const ExecutorPlan& p, float*,
                  LayerPlan* plan) override;
  void TakeRetention(int64_t layer, std::vector<std::vector<int32_t>>* retained) override;
  // Host placement's steps planned on the GPU (hybrid_host_plan.cc; host_plan_on, the default):
  // PlanDecode's work where the KV cache is in host memory, the GPU attending the selected blocks
  // its cache holds, the CPU the rest.
  void PlanDecodeHost(int64_t layer, const AttnArgs& a, const RepresentativeStore& reps,
                      const ExecutorPlan& p, LayerPlan* plan);
  // The GPU block cache's map of `layer` ([kv_heads][map_blocks]: a Context block's extra slot
  // in the model's ring, -1 where it holds none), allocated (all -1) at the first call.
  int32_t* BlockMap(int64_t layer);
  void ResetBlockMap();  // every entry -1 (ClearResident)
  // The CPU's blocks of the step (cpu_blocks) into the GPU block cache (ResidentBlocks::Fill,
  // after Attend marked host_held's slots), with the map's entries, on the fill stream.
  void QueueMapFill(int64_t layer);
  // Whether the attention of PlanDecodeHost's view is the TMA kernel's (which masks holes).
  bool HostPlanAttentionOk() const;
  // The layer's retention on the GPU: [kv_heads][R] lists then [kv_heads] counts (-1: none).
  int32_t* DeviceRetention(int64_t layer, int64_t R);

  // --- PlanExecutor ----------------------------------------------------------------------------
  void Dense(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv, float* out,
             float* lse) override;

  bool Planned(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv,
               const LayerPlan& plan, float*, float* lse,
               std::vector<std::vector<float>>* mass) override;
  static bool CpuFirst();  // (Planned: the CPU's blocks started before the GPU's launches)

  // Device placement: a step whose every selected block the GPU attends leaves the retention's
  // masses to the next selection at the layer (PlanExecutor::TakesLateMass).
  bool TakesLateMass(int64_t, const LayerPlan& plan) override;
  void LateMass(int64_t layer, const std::vector<std::vector<int32_t>>& blocks, float* lse,
                std::vector<std::vector<float>>* mass) override;

  // The GPU slot of head h that holds block b among the n_g it attends, or -1.
  int64_t GpuSlotOf(int64_t layer, int64_t h, int64_t n_g, int32_t b) const;
  // Whether the GPU attends every selected block: each KV head's list is its n_g.
  bool AllOnGpu(const LayerPlan& plan, int64_t n_g) const;
  // Where each selected block's softmax sums are, in plan order: at[i] >= 0, at that offset of
  // the GPU's pinned copy ([lse: heads][sums]); -1, a block the CPU attends (its sums come in
  // order from AttendBlocks). n_g: each KV head's blocks on the GPU (PlaceContext, QueueGather).
  void StatsOffsets(int64_t layer, const std::vector<std::vector<int32_t>>& blocks, int64_t n_g,
                    int64_t heads, int64_t G, std::vector<int32_t>* at) const;
  // all_stats: every block's sums in plan order, from gpu + at[i], else the CPU's next (cpu).
  // The GPU's block sums as whole blocks ([heads floats][n][G][2], as pin lays out one sum a
  // block): pin itself (tiles 1), or its sums of `tiles` tiles a block combined into whole_stats.
  const float* WholeBlockStats(const float* pin, int64_t heads, int64_t n, int64_t G,
                               int64_t tiles);
  // The decode attention of q_dev over the view v (out, lse [heads]; device) and, with tiles > 1
  // where the TMA kernel takes the call, the softmax sums of every 32-key tile of the n_blocks
  // blocks at view keys [key0, key0 + n_blocks * block_size) into sums (device, [kv_heads]
  // [n_blocks][tiles][G][2]). Returns the tiles a block it summed; 1: none (the caller sums whole
  // blocks itself where it needs them, cuda::BlockStats).
  int64_t AttendTiled(const KVLayerView& v, const AttnArgs& a2, float* out, float* lse,
                      int64_t tiles, int64_t key0, int64_t n_blocks, float* sums);
  void PlanOrderStats(const float* gpu, const std::vector<int32_t>& at, const float* cpu,
                      int64_t G);

  // (With position remapping the planner scores a rotated query, ScoringQueries, which the GPU
  // does not have: it scores on the CPU.)
  bool Score(int64_t layer, const RepresentativeStore& reps, const ScoreArgs& a,
             float* scores) override;
  bool ScoreTop(int64_t layer, const RepresentativeStore& reps, const ScoreArgs& a, bool sum_heads,
                int64_t want, std::vector<std::vector<Scored>>* top) override;

  const ModelConfig& m;
  SparseConfig c;
  ThreadingContext& tc;
  cudaStream_t stream;
  std::unique_ptr<Backend> cpu;
  KVCache host, staging;
  SparseAttention planner;
  bool residual_on_gpu;
  bool device_kv;  // --kv-placement device: the rings hold every block, the GPU attends them all
  cuda::GpuBlockScorer scorer;  // the planner's scoring and top-k, on the GPU
  ChunkPrefill prefill;         // --prefill sparse on the GPU
  int sm = 1;
  StepInfo step;
  Clock::time_point step_begin;  // (HybridStats::enqueue)
  // The call in flight (Attend): the model's queries and output on the GPU and its cache.
  const float* q_dev = nullptr;
  float* out_dev = nullptr;
  KVCache* model_cache = nullptr;
  cuda::PinnedFloats q_pin, row_pin, part_pin, lse_pin, gl_pin;
  cuda::ArenaPinning pin_k, pin_v;  // the host cache's arenas (declared after it: freed first)
  std::thread pin_ahead;            // PinAhead's
  bool gather_on = false;           // the GPU attends its share of the Context blocks
  cuda::PinnedFloats src_pin;       // QueueGather's sources, destinations, view entries (int32)
  ResidentBlocks resident;          // the Context blocks in the extra slots, per layer and head
  std::vector<ResidentBlocks::Copy> copies;
  // The GPU block cache filled in the background (QueueFill): the CPU's blocks of a step copied
  // into slots the step does not attend, on a stream of their own, for later steps. Per layer:
  // the kernel's lists (pinned) and an event after its last fill. NEEDLE_HYBRID_FILL=0: off.
  bool fill_on = false;
  cudaStream_t fill_stream = nullptr;
  std::vector<cudaEvent_t> fill_done;
  std::vector<cuda::PinnedFloats> fill_pin;
  std::vector<ResidentBlocks::Copy> fills;
  std::vector<std::vector<int32_t>> cpu_blocks;  // [kv_head] the blocks the CPU attends
  std::vector<float> all_stats;                  // the GPU's and CPU's block sums, plan order
  std::vector<float> whole_stats;                // WholeBlockStats'
  std::vector<int32_t> stats_at;                 // StatsOffsets' of the step's plan
  std::vector<int32_t> table_host;
  int64_t prompt_pos0 = 0;  // the prompt micro-batch in flight: its first position (q_dev's row 0)
  int64_t table_lb = -1, table_pb = -1, table_ng = -1;
  cuda::GrowBuffer table_dev{"hybrid window table"}, lse_g{"hybrid lse"},
      gpu_part{"hybrid partials"};
  cuda::AttnWorkspace ws;
  std::vector<float> block_stats;  // AttendBlocks' per-block sums
  AttnSpans spans;                 // remapped decode: the CPU's keys
  std::vector<float> dense_lse;
  // decode: [layer] the GPU finished the layer before (Target; one a layer: the host worker waits
  // for a layer's while the model's thread queues later ones)
  std::vector<cudaEvent_t> layer_start;
  cudaEvent_t gpu_done = nullptr;  // decode: the GPU's partial's lse and block sums are here
  // TakesLateMass: the next Planned leaves the GPU's lse and block sums in late_pin[layer]
  // (late_at: each plan-order block's sums there, -1: the CPU's; late_tiles: 32-key tiles a
  // block, late_ng: the GPU's blocks a head), ready at late_done[layer], and the CPU's partial's
  // lse [heads] and block sums (plan order) in late_cpu_lse / late_cpu_stats (empty: the GPU
  // attended every block). Host placement's layers only with NEEDLE_HYBRID_LATE=1 (late_on):
  // measured slower on an H200 host, Qwen2.5-7B 1M, 85.7 / 87.5 tok/s against 88.0 / 90.1
  // (bench/RESULTS.md): the host's selection of the next layer waits for the GPU all the same.
  bool late_next = false, late_on = false;
  // Every selected block where each head misses at most this many (NEEDLE_HYBRID_TAKE_REST,
  // blocks a head; 0, the default: never): the CPU's few blocks would cost more than the GPU's
  // copies (ResidentBlocks::Place's take_rest). Read when the executor is made.
  int64_t take_rest = 0;
  std::vector<cuda::PinnedFloats> late_pin;
  std::vector<std::vector<int32_t>> late_at;
  std::vector<int64_t> late_tiles, late_ng;
  std::vector<std::vector<float>> late_cpu_lse, late_cpu_stats;
  std::vector<cudaEvent_t> late_done;
  // Executor plans: NEEDLE_DEVICE_PLAN=0 turns them off (the host plans every step, for
  // comparisons); rows waiting for FlushRows (layer, position), and their copies' staging on
  // the GPU and in pinned memory.
  bool device_plan_on = true;
  // PlanDecodeHost's: on (HybridHostPlanSwitch, with the fills), the map's blocks a head (the
  // longest sequence's), the map, the selection's and query's pinned copy (HostLayer::sel), the
  // CPU's block sums with their places in the retention's inputs, each head's blocks the GPU
  // attends.
  bool host_plan_on = false, map_ready = false;
  int cc_major = 0;  // (the GPU's compute capability)
  int64_t map_blocks = 0;
  cuda::GrowBuffer dp_map{"host plan block map"};
  std::vector<std::vector<int32_t>> host_held;
  // --- host placement planned on the GPU: the host's share of each layer on a thread of its own
  // (hybrid_host_worker.cc): the GPU waits for each layer's CPU partial on its stream
  // (cuda::JoinHost) instead of for the host to queue the merge after it. Per layer, pinned: the
  // query and the selection's lists (there once sel_flags says the step: cuda::Post; with
  // NEEDLE_HYBRID_POST=0 at sel_ready, an event after the copies), the CPU's partial ([heads *
  // head_dim] then lse [heads]) and its block sums
  // ([blocks][G][2], list order); all sized for topk once.
  struct HostLayer {
    cuda::PinnedFloats sel, part, sums;
    cudaEvent_t sel_ready = nullptr;
  };
  // HostLayer::sel's layout for a step of n_sel blocks a head: the query [heads * head_dim]
  // (floats), the selection [Hk][n_sel], then one copy of the scratch: kept [Hk][R], kcount
  // [Hk], the CPU's lists [Hk][n_sel] (places in the selection) and their counts [Hk].
  struct HostSel {
    HostSel(float* pin, int64_t HD, int64_t Hk, int64_t n_sel, int64_t R)
        : q(pin),
          sel(reinterpret_cast<int32_t*>(pin) + HD),
          kept(sel + Hk * n_sel),
          cpu(kept + Hk * (R + 1)) {}
    static int64_t Words(int64_t HD, int64_t Hk, int64_t n_sel, int64_t R) {
      return HD + Hk * n_sel + Hk * (R + 1 + n_sel + 1);
    }
    float* q;
    int32_t *sel, *kept, *cpu;
  };
  std::vector<HostLayer> host_layers;
  struct HostJob {
    int64_t layer = 0, n_sel = 0, R = 0;
    uint32_t seq = 0;
    AttnArgs a;
    bool retain = false, want_plan = false;
  };
  // The model's thread waits for each layer's flag before it goes on (--dump-plan waits for the
  // whole job, for the plans); NEEDLE_HYBRID_AHEAD=1: it queues the whole step ahead and waits at
  // the step's end (StepQueued). One run each on H100 hosts: slower at 128K (104.1 against 106.9
  // tok/s), faster at 1M (96.4 against 90.0-93.4; bench/RESULTS.md). Ahead, nothing on either
  // thread may wait for the GPU inside a step (a pinned or device buffer that grows frees the old
  // one, which waits): the GPU may be waiting for the worker.
  bool host_ahead = false;
  // Thread blocks of a fill's kernel (each of K and V), beside the model's kernels:
  // NEEDLE_HYBRID_FILL_CTAS, default 8 (as the host's own plans' fills, kFillBlocks).
  int fill_ctas = 8;
  // NEEDLE_HYBRID_LAG=k (not ahead): the model's thread waits for the flag of the k-th sparse
  // layer before the one it has just queued (0, the default: that layer's own), so that the GPU
  // finds the next layers' launches queued when the CPU's partial comes.
  int64_t host_lag = 0;
  std::thread host_worker;
  std::mutex job_mu;
  std::condition_variable job_cv, done_cv;
  std::deque<HostJob> jobs;         // (job_mu) pushed by the model's thread, taken by the worker
  int64_t jobs_pushed = 0;          // (the model's thread's)
  int64_t jobs_done = 0;            // (job_mu)
  int64_t jobs_attended = 0;        // (job_mu) jobs whose flag is written
  bool worker_stop = false;         // (job_mu)
  std::exception_ptr worker_error;  // (job_mu) the first error of the worker's jobs
  void KeepWorkerError();           // (in a catch) the current exception, if it is the first
  // The worker's phases, timed: the longest one over a second is named in the message of a
  // JoinHost that gave up (a worker stuck inside a step is a bug: it must never wait for the
  // whole GPU, which JoinHost may be holding for it).
  enum WorkerPhase { kWorkerIdle, kWorkerGpuWait, kWorkerSelection, kWorkerFold, kWorkerFill };
  void WorkerAt(int64_t layer, WorkerPhase p);  // (the worker's) entering p at layer
  std::string WorkerSlowest();                  // (job_mu) and forgets it
  int64_t worker_layer = 0;
  WorkerPhase worker_phase = kWorkerIdle;
  Clock::time_point worker_since{};
  double slowest_s = 0;  // (job_mu) the longest phase over a second, and where
  int64_t slowest_layer = 0;
  WorkerPhase slowest_phase = kWorkerIdle;
  uint32_t* host_flags = nullptr;  // pinned [layers]: each layer's step number, then timed_out
  // pinned [layers] (after host_flags): the step number, once the layer's selection is in its
  // pinned buffer (cuda::Post); NEEDLE_HYBRID_POST=0: copies and the event sel_ready instead.
  uint32_t* sel_flags = nullptr;
  // The handshake's timing (host_join.h): pinned [layers][HandshakeClock::kWords], the worker's
  // stamps; device [layers] Post's stamps, then JoinHost's sums [HandshakeSums::kWords].
  uint64_t* handshake = nullptr;
  cuda::GrowBuffer handshake_dev{"hybrid handshake timing"};
  static int64_t HostClockNs();  // CLOCK_REALTIME, the worker's stamps
  bool post_sel = true;
  uint32_t step_seq = 0;              // the decode step's number (JoinHost's want; BeginStep)
  bool fill_wait_due = false;         // the step's first PlanDecodeHost is still to come
  std::vector<LayerPlan> host_plans;  // [layer] the worker's copy where a job wants its plan
  HybridStats worker_stats;           // the worker's times and counts, added to stats by DrainHost
  // The layer's buffers, allocated at their largest (topk) at the first call.
  HostLayer& HostLayerBuffers(int64_t layer, int64_t R);
  void StartHostWorker();
  void StopHostWorker();
  void HostWorkerLoop();
  // A job's host work: the wait for its selection, the CPU's blocks, the partial and the flag,
  // then the fill of the GPU block cache (QueueMapFill).
  void RunHostJob(const HostJob& j);
  // Its wait and the CPU's blocks: q [heads * head_dim], sel_h, cpu_h the job's query and lists
  // (pinned), part and sums where the partial and the block sums go (pinned).
  void AttendHostJob(const HostJob& j, const HostSel& hs, float* part, float* sums);
  void WaitSelection(const HostJob& j);  // until the job's selection is in pinned memory
  void PushHostJob(const HostJob& j);
  // Waits (asleep) until the worker has done every job pushed, then adds its stats and rethrows
  // its error, if any. Every use of what the jobs touch outside a step begins with it.
  void DrainHost();
  // HybridAttention::SyncStats but for the handshake's sums (BeginStep's: it waits for no GPU).
  void SyncStats();
  // Waits (asleep) until the worker has written the flag of every job pushed but the last `lag`:
  // the GPU has those CPU partials; the worker may still be queueing the last one's fill.
  void WaitHostAttended(int64_t lag);
  std::vector<std::pair<int64_t, int64_t>> pending_rows;
  cuda::GrowBuffer rows_dev{"hybrid row staging"};
  cuda::PinnedFloats rows_pin;
  cuda::GrowBuffer dp_ret{"device plan retention"}, dp_scratch{"device plan scratch"};
  // A layer's retention left to its next step's top-k kernel (TopBlocksSelect runs it before
  // the selection that reads it; one launch fewer a layer), with its inputs in buffers of the
  // layer's own (LayerPlanBuffers): the step's selection in two halves, alternating (the kernel
  // that reads the last step's writes this step's), its blocks' sums and the lse. on: pending,
  // with its arguments in args; half: the last selection's half.
  // side: queued instead on retain_stream (high priority, 128-thread blocks that fit beside the
  // model's kernels) after the layer's attention, off the step's path: the 4 blocks of a fused
  // top-k with the retention kept the GPU about 25 us a layer at 1M (ncu); the layer's next step
  // waits for retain_done before anything reads or writes its retention. NEEDLE_RETAIN_STREAM=0:
  // no such stream, the pending path.
  struct PendingRetain {
    bool on = false, side = false;
    cuda::RetainArgs args;
    int half = 0;
  };
  std::vector<PendingRetain> dp_pending;
  cudaStream_t retain_stream = nullptr;
  std::vector<cudaEvent_t> retain_ready, retain_done;
  cuda::GrowBuffer dp_layers{"device plan per-layer selections"};
  // The layer's buffers: sel [2][kv_heads][topk], then (floats) sums [kv_heads][topk][tiles][G]
  // [2] and lse [heads].
  int32_t* LayerPlanBuffers(int64_t layer, int64_t tiles);
  // The scoring, top-k and selection sa of the layer's step (the selection fused with the top-k
  // where it fits, after pend's retention where one is pending), queued on the model's stream.
  void QueueSelection(int64_t layer, const RepresentativeStore& reps, const ExecutorPlan& p,
                      const cuda::SelectArgs& sa, PendingRetain* pend);
  // The planner's retention (ExecutorPlan::seed: the prompt's, or one of a step it planned) to
  // the GPU's ret ([kv_heads][R] then counts), replacing a pending one; nothing without one.
  void SeedRetention(const ExecutorPlan& p, int64_t Hk, int32_t* ret, PendingRetain* pend);
  // The retention for the layer's next step (RetainByMass of ra): on retain_stream where there
  // is one, else left to the next top-k kernel (FusedSelectOn), else on the model's stream.
  void QueueRetention(int64_t layer, const cuda::RetainArgs& ra, int64_t R, PendingRetain* pend);
  // Queues the layer's pending retention (RetainByMass) on its own, if any, or has the model's
  // stream wait for the one on retain_stream.
  void FlushRetention(int64_t layer);
  // FlushRetention of the next layer (in the order the step runs them) whose retention is on
  // retain_stream, queued after this layer's attention: there the model's stream waits between
  // two kernels that are launched as usual, not between RoPE and the scoring, which are launched
  // dependent (pdl.cuh; a wait between them makes the scoring's launch an ordinary one).
  void FlushNextRetention(int64_t layer);
  // NEEDLE_HYBRID_PROFILE=1: events at the end of each phase of a GPU-planned layer
  // (HybridStats::gpu_phase), read when the next step begins (CollectPhases).
  enum Phase {
    kModel,
    kRow,
    kPlan,
    kUpload,
    kScore,
    kTopk,
    kSelect,
    kAttend,
    kSums,
    kRetain,
    kMerge
  };
  bool profile = false;
  std::vector<cudaEvent_t> marks;
  std::vector<int> mark_phase;
  size_t marks_used = 0;
  void Mark(Phase ph);
  void CollectPhases();
  HybridStats stats;
};

}  // namespace needle
