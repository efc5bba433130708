// CudaBackend; see cuda_backend.h.
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/host_residual.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/base/error.h"
#include "engine/cuda/attention.h"
#include "engine/cuda/attention_decode_tma.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/cuda_memory.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/device_util.cuh"
#include "engine/cuda/gemv.h"
#include "engine/cuda/kernels.h"

namespace needle {
namespace {

using cuda::DeviceAlloc;

// A recorded decode step: an instantiated CUDA graph, stale once a GrowBuffer it may hold the
// address of has been reallocated.
class CudaRecording final : public Backend::Recording {
 public:
  CudaRecording(cudaGraphExec_t exec, cudaStream_t stream, uint64_t generation,
                CudaRecordStats& stats)
      : exec_(exec), stream_(stream), generation_(generation), stats_(stats) {}
  ~CudaRecording() override { cudaGraphExecDestroy(exec_); }
  bool Replay() override {
    if (cuda::GrowBuffer::Reallocations().load() != generation_) return false;
    NEEDLE_CUDA_CHECK(cudaGraphLaunch(exec_, stream_));
    ++stats_.replays;
    return true;
  }

 private:
  cudaGraphExec_t exec_;
  cudaStream_t stream_;
  uint64_t generation_;
  CudaRecordStats& stats_;
};

// What a recorded step reads on the device: written by SetStepInputs before each replay.
struct StepInputs {
  int64_t pos;
  int32_t id;
};

// A norm the GEMV can fold in: none, or an f32/bf16/f16 weight vector (one token).
bool NormFuses(const Backend::InputNorm& n, int64_t T) {
  return T >= 1 && T <= cuda::kGemvMaxTokens &&
         (n.w == nullptr || n.w->dtype == DType::kF32 || n.w->dtype == DType::kBF16 ||
          n.w->dtype == DType::kF16);
}
cuda::GemvNorm GemvNormOf(const Backend::InputNorm& n) {
  cuda::GemvNorm g;
  if (n.w != nullptr) {
    g.g = n.w->data;
    g.g_type = n.w->dtype;
    g.eps = n.eps;
  }
  return g;
}

cuda::GemvOut GemvOutOf(const Weight& w, const Weight* bias, float* y) {
  cuda::GemvOut o;
  o.w = w.data;
  o.rows = w.rows;
  o.y = y;
  if (bias != nullptr && bias->present()) {
    o.bias = bias->data;
    o.bias_type = bias->dtype;
  }
  return o;
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) {
    NEEDLE_CUDA_CHECK(cudaSetDevice(device));
    // How a host thread waits for the GPU (a comparison switch, NEEDLE_CUDA_SYNC): unset, the
    // runtime's choice (with one context and more cores than that: it spins); "blocking": it
    // sleeps until the GPU's interrupt; "yield"; "spin".
    if (const char* w = std::getenv("NEEDLE_CUDA_SYNC")) {
      const std::string how = w;
      if (how != "blocking" && how != "yield" && how != "spin")
        Fail("NEEDLE_CUDA_SYNC: '", how, "' is none of blocking, yield, spin");
      NEEDLE_CUDA_CHECK(cudaSetDeviceFlags(how == "blocking" ? cudaDeviceScheduleBlockingSync
                                           : how == "yield"  ? cudaDeviceScheduleYield
                                                             : cudaDeviceScheduleSpin));
    }
    cudaDeviceProp prop{};
    NEEDLE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    sm_count_ = prop.multiProcessorCount;
    memory_ = cuda::MakeCudaMemory("GPU " + std::to_string(device) + " (" + prop.name + ") memory");
    NEEDLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    NEEDLE_CUBLAS_CHECK(cuda::Cublas().Create(&blas_));
    NEEDLE_CUBLAS_CHECK(cuda::Cublas().SetStream(blas_, stream_));
    NEEDLE_CUDA_CHECK(cudaMallocHost(&step_host_, sizeof(StepInputs)));
    step_dev_ = static_cast<StepInputs*>(cuda::DeviceAlloc(sizeof(StepInputs), "step inputs"));
    NEEDLE_CUDA_CHECK(cudaEventCreateWithFlags(&step_copied_, cudaEventDisableTiming));
    const char* f = std::getenv("NEEDLE_CUDA_FUSED");
    fused_ = f == nullptr || std::strcmp(f, "0") != 0;
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    cudaEventDestroy(step_copied_);
    cudaFree(step_dev_);
    cudaFreeHost(step_host_);
    for (auto& [size, list] : pool_)
      for (float* p : list) cudaFree(p);
    for (void* p : weights_) cudaFree(p);
    cuda::Cublas().Destroy(blas_);
    cudaStreamDestroy(stream_);
  }

  const char* Name() const override { return "cuda"; }
  KVMemory* kv_memory() override { return memory_.get(); }

  void PrepareWeights(ModelWeights& w) override {
    std::unordered_map<const void*, void*> uploaded;  // tied embeddings upload once
    auto up = [&](Weight& x) {
      if (!x.present()) return;
      auto it = uploaded.find(x.data);
      if (it == uploaded.end()) {
        void* d = DeviceAlloc(x.nbytes(), "weight " + x.name);
        weights_.push_back(d);
        NEEDLE_CUDA_CHECK(cudaMemcpy(d, x.data, x.nbytes(), cudaMemcpyHostToDevice));
        it = uploaded.emplace(x.data, d).first;
      }
      x.data = it->second;
    };
    up(w.embed);
    up(w.final_norm);
    up(w.lm_head);
    for (LayerWeights& L : w.layers)
      for (Weight* x :
           {&L.attn_norm, &L.wq, &L.wk, &L.wv, &L.wo, &L.bq, &L.bk, &L.bv, &L.bo, &L.q_norm,
            &L.k_norm, &L.mlp_norm, &L.w_gate, &L.w_up, &L.w_down, &L.b_gate, &L.b_up, &L.b_down})
        up(*x);
  }

  // Activation buffers are reused by size: the graph asks for the same few sizes every step,
  // and cudaMalloc/cudaFree would synchronise the device each time.
  float* Alloc(size_t n) override {
    auto& list = pool_[n];
    if (!list.empty()) {
      float* p = list.back();
      list.pop_back();
      return p;
    }
    float* p = static_cast<float*>(DeviceAlloc(n * sizeof(float), "activations"));
    sizes_[p] = n;  // Free is not told the size
    return p;
  }
  // Buffers of 256 MiB and more (a long prompt's residual stream, its activations) are given
  // back at once: kept by size, prompts of many lengths would hold them all.
  void Free(float* p) override {
    const size_t n = sizes_.at(p);
    if (n * sizeof(float) >= (size_t{256} << 20)) {
      NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      NEEDLE_CUDA_CHECK(cudaFree(p));
      sizes_.erase(p);
      return;
    }
    pool_[n].push_back(p);
  }
  // Pinned: copies to and from it run at the bus's speed and asynchronously.
  float* AllocHost(size_t n) override {
    void* p = nullptr;
    const cudaError_t e = cudaMallocHost(&p, std::max<size_t>(n, 1) * sizeof(float));
    if (e != cudaSuccess) {
      cudaGetLastError();
      Fail("cannot pin ", FormatBytes(n * sizeof(float)),
           " of host memory: ", cudaGetErrorString(e));
    }
    return static_cast<float*>(p);
  }
  void FreeHost(float* p) override { NEEDLE_CUDA_CHECK(cudaFreeHost(p)); }
  std::unique_ptr<HostResidual> MakeHostResidual(int64_t rows, int64_t cols,
                                                 int64_t max_rows) override {
    return cuda::MakeHostResidual(*this, stream_, rows, cols, max_rows);
  }
  void ToHost(const float* src, size_t n, float* host_dst) override {
    NEEDLE_CUDA_CHECK(
        cudaMemcpyAsync(host_dst, src, n * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void FromHost(const float* host_src, size_t n, float* dst) override {
    NEEDLE_CUDA_CHECK(
        cudaMemcpyAsync(dst, host_src, n * sizeof(float), cudaMemcpyHostToDevice, stream_));
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // Only the k candidates come back to the host (8 bytes each) instead of V logits.
  void TopK(const float* logits, int64_t V, int64_t k, float* host_vals,
            int32_t* host_ids) override {
    k = std::min(k, V);
    int32_t* ids = topk_ids_.Get<int32_t>(static_cast<size_t>(k));
    float* vals = topk_vals_.Get<float>(static_cast<size_t>(k));
    cuda::TopK(logits, V, k, vals, ids, stream_);
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(host_ids, ids, static_cast<size_t>(k) * 4,
                                      cudaMemcpyDeviceToHost, stream_));
    if (host_vals != nullptr)
      NEEDLE_CUDA_CHECK(cudaMemcpyAsync(host_vals, vals, static_cast<size_t>(k) * 4,
                                        cudaMemcpyDeviceToHost, stream_));
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void Embed(const Weight& table, const int32_t* ids, int64_t T, float* out) override {
    if (step_mode_) {  // a recorded step: the id is in the step inputs
      cuda::Embed(table.data, table.dtype, &step_dev_->id, T, table.cols, out, stream_);
      return;
    }
    int32_t* d_ids = token_ids_.Get<int32_t>(static_cast<size_t>(T));
    NEEDLE_CUDA_CHECK(
        cudaMemcpyAsync(d_ids, ids, static_cast<size_t>(T) * 4, cudaMemcpyHostToDevice, stream_));
    cuda::Embed(table.data, table.dtype, d_ids, T, table.cols, out, stream_);
  }

  // y[T, N] = x[T, K] W[N, K]^T: in cuBLAS's column-major terms Y^T[N, T] = W^T' X^T with W read
  // transposed (lda = K). bf16/f16 weights take x converted to the same type; f32 accumulate.
  void MatMul(const float* x, int64_t T, const Weight& w, const Weight* bias, float* y) override {
    if (Gemv1(T, w)) {
      const cuda::GemvOut o = GemvOutOf(w, bias, y);
      cuda::Gemv(x, T, w.cols, {}, w.dtype, &o, 1, cuda::GemvEpilogue::kStore, stream_, nullptr,
                 nullptr, gemv_tc_);
      return;
    }
    const int64_t N = w.rows, K = w.cols;
    const float one = 1.f, zero = 0.f;
    if (w.dtype == DType::kF32) {
      NEEDLE_CUBLAS_CHECK(cuda::Cublas().Sgemm(
          blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(T),
          static_cast<int>(K), &one, static_cast<const float*>(w.data), static_cast<int>(K), x,
          static_cast<int>(K), &zero, y, static_cast<int>(N)));
    } else {
      const cudaDataType_t t = w.dtype == DType::kBF16 ? CUDA_R_16BF : CUDA_R_16F;
      void* xh = x16_.Get<uint16_t>(static_cast<size_t>(T * K));
      cuda::ConvertF32(x, T * K, xh, w.dtype, stream_);
      NEEDLE_CUBLAS_CHECK(cuda::Cublas().GemmEx(
          blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(T),
          static_cast<int>(K), &one, w.data, t, static_cast<int>(K), xh, t, static_cast<int>(K),
          &zero, y, CUDA_R_32F, static_cast<int>(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    if (bias != nullptr && bias->present())
      cuda::AddBias(y, T, N, bias->data, bias->dtype, stream_);
  }

  // Decode: one GEMV launch for the projections of one input when they share the weight type
  // and K; otherwise the operators in sequence (Backend's default).
  void Project(const float* x, int64_t T, const InputNorm& norm, const Projection* p,
               int n) override {
    bool fused = n >= 1 && n <= cuda::kMaxGemvOuts && NormFuses(norm, T);
    for (int i = 0; i < n && fused; ++i)
      fused = Gemv1(T, *p[i].w) && p[i].w->dtype == p[0].w->dtype && p[i].w->cols == p[0].w->cols;
    if (!fused) return Backend::Project(x, T, norm, p, n);
    cuda::GemvOut o[cuda::kMaxGemvOuts];
    for (int i = 0; i < n; ++i) o[i] = GemvOutOf(*p[i].w, p[i].bias, p[i].y);
    cuda::Gemv(x, T, p[0].w->cols, GemvNormOf(norm), p[0].w->dtype, o, n,
               cuda::GemvEpilogue::kStore, stream_, nullptr, nullptr, gemv_tc_);
  }
  void ProjectRopeKVWrite(const float* x, int64_t T, const InputNorm& norm, const Projection* qkv,
                          int64_t heads, KVCache& cache, int64_t layer, int64_t pos0,
                          const std::vector<float>& inv_freq, float scaling) override {
    // NEEDLE_CUDA_ROPE_FOLD=1: RoPE and the cache write folded into the q/k/v GEMV (one launch).
    // Not the default: on the H200 the projection and RopeKVWrite as two launches are 0.18 ms a
    // step faster (bench_cuda's "graph-rope-fold" mode compares them; bench/RESULTS.md).
    const char* fold = std::getenv("NEEDLE_CUDA_ROPE_FOLD");
    const KVCacheShape& s = cache.shape();
    bool fused =
        T == 1 && !gemv_tc_ && fold != nullptr && std::strcmp(fold, "1") == 0 &&
        NormFuses(norm, T) && !cache.on_host() && s.dtype != DType::kI8 &&
        cuda::GemvRopeSupported(s.head_dim, qkv[0].w->rows, qkv[1].w->rows, qkv[2].w->rows);
    for (int i = 0; i < 3 && fused; ++i)
      fused = Gemv1(T, *qkv[i].w) && qkv[i].w->dtype == qkv[0].w->dtype &&
              qkv[i].w->cols == qkv[0].w->cols;
    if (!fused)
      return Backend::ProjectRopeKVWrite(x, T, norm, qkv, heads, cache, layer, pos0, inv_freq,
                                         scaling);
    const KVLayerView view = WritableLayer(cache, layer, pos0, T);
    cuda::GemvRope rope;
    rope.inv_freq = Freqs(inv_freq);
    rope.scaling = scaling;
    rope.pos0 = pos0;
    rope.dpos = StepPos();
    rope.head_dim = view.head_dim;
    rope.table = view.table;
    rope.k_arena = const_cast<uint8_t*>(view.k);
    rope.v_arena = const_cast<uint8_t*>(view.v);
    rope.kv_dtype = view.dtype;
    rope.block_size = view.block_size;
    rope.kv_heads = view.kv_heads;
    cuda::GemvOut o[3];
    for (int i = 0; i < 3; ++i) o[i] = GemvOutOf(*qkv[i].w, qkv[i].bias, qkv[i].y);
    cuda::Gemv(x, 1, qkv[0].w->cols, GemvNormOf(norm), qkv[0].w->dtype, o, 3,
               cuda::GemvEpilogue::kRopeKV, stream_, nullptr, &rope);
  }
  void ProjectAdd(const float* x, int64_t T, const Weight& w, const Weight* bias, float* y,
                  float* scratch) override {
    if (!Gemv1(T, w)) return Backend::ProjectAdd(x, T, w, bias, y, scratch);
    const cuda::GemvOut o = GemvOutOf(w, bias, y);
    cuda::Gemv(x, T, w.cols, {}, w.dtype, &o, 1, cuda::GemvEpilogue::kAdd, stream_, nullptr,
               nullptr, gemv_tc_);
  }
  void GateUp(const float* x, int64_t T, const InputNorm& norm, const Weight& wg, const Weight* bg,
              const Weight& wu, const Weight* bu, float* out, float* scratch) override {
    if (!Gemv1(T, wg) || !Gemv1(T, wu) || wg.dtype != wu.dtype || wg.cols != wu.cols ||
        wg.rows != wu.rows || !NormFuses(norm, T))
      return Backend::GateUp(x, T, norm, wg, bg, wu, bu, out, scratch);
    const cuda::GemvOut o[2] = {GemvOutOf(wg, bg, out), GemvOutOf(wu, bu, nullptr)};
    cuda::Gemv(x, T, wg.cols, GemvNormOf(norm), wg.dtype, o, 2, cuda::GemvEpilogue::kSiluMul,
               stream_, nullptr, nullptr, gemv_tc_);
  }
  void RopeKVWrite(float* q, float* k, const float* v, int64_t T, int64_t heads, KVCache& cache,
                   int64_t layer, int64_t pos0, const std::vector<float>& inv_freq,
                   float scaling) override {
    const KVLayerView view = WritableLayer(cache, layer, pos0, T);
    if (!fused_)
      return Backend::RopeKVWrite(q, k, v, T, heads, cache, layer, pos0, inv_freq, scaling);
    cuda::RopeKVWrite(q, k, v, T, heads, view.kv_heads, view.head_dim, pos0, StepPos(),
                      Freqs(inv_freq), scaling, view.block_size, view.table,
                      const_cast<uint8_t*>(view.k), const_cast<uint8_t*>(view.v), view.dtype,
                      stream_);
  }

  bool DecodeRows(float* q, float* k, const float* v, int64_t n, KVCache* const* caches,
                  int64_t layer, const AttnArgs& a, const std::vector<float>& inv_freq,
                  float scaling, float* out) override {
    // NEEDLE_CUDA_DECODE_ROWS=0: the rows one at a time (comparisons; read once).
    static const bool off = [] {
      const char* e = std::getenv("NEEDLE_CUDA_DECODE_ROWS");
      return e != nullptr && std::strcmp(e, "0") == 0;
    }();
    if (!fused_ || step_mode_ || n < 1 || off) return false;
    for (int64_t i = 0; i < n; ++i)
      if (caches[i]->on_host() || &caches[i]->pool() != &caches[0]->pool()) return false;
    const int64_t H = a.heads, Hk = a.kv_heads, D = a.head_dim;
    const float* freq = Freqs(inv_freq);
    for (int64_t c0 = 0; c0 < n; c0 += cuda::kMaxTmaDecodeRows) {  // (launches of rows)
      const int64_t m = std::min<int64_t>(n - c0, cuda::kMaxTmaDecodeRows);
      cuda::RowTargets targets{};
      cuda::TmaDecodeRow rows[cuda::kMaxTmaDecodeRows];
      KVLayerView view{};
      for (int64_t i = 0; i < m; ++i) {
        KVCache& cache = *caches[c0 + i];
        const int64_t pos = cache.size();
        view = WritableLayer(cache, layer, pos, 1);
        targets.r[i] = {view.table, pos};
        rows[i] = {q + (c0 + i) * H * D, view.table, pos, out + (c0 + i) * H * D};
      }
      cuda::RopeKVWriteRows(q + c0 * H * D, k + c0 * Hk * D, v + c0 * Hk * D, m, H, Hk, D, targets,
                            freq, scaling, view.block_size, const_cast<uint8_t*>(view.k),
                            const_cast<uint8_t*>(view.v), view.dtype, stream_);
      if (cuda::AttentionRows(rows, m, view, a, sm_count_, attn_ws_, stream_)) continue;
      for (int64_t i = 0; i < m; ++i) {  // (no batched kernel for these rows: one at a time)
        AttnArgs ai = a;
        ai.pos0 = rows[i].pos0;
        Attention(rows[i].q, caches[c0 + i]->Layer(layer), ai, nullptr, rows[i].out, nullptr);
      }
    }
    return true;
  }
  void ArgmaxRows(const float* logits, int64_t n, int64_t V, int32_t* host_ids) override {
    int32_t* ids = topk_ids_.Get<int32_t>(static_cast<size_t>(n));
    float* vals = topk_vals_.Get<float>(static_cast<size_t>(n));
    cuda::TopKRows(logits, n, V, 1, vals, ids, stream_);
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(host_ids, ids, static_cast<size_t>(n) * 4,
                                      cudaMemcpyDeviceToHost, stream_));
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // Recording: a CUDA graph of the step, captured after one eager run of it (which grows every
  // buffer the step needs, so that the capture allocates nothing). NEEDLE_CUDA_GRAPH=0 turns it
  // off (comparisons); the graph needs the TMA decode kernel (compute capability 9.0), the only
  // attention kernel that reads a replayed step's position.
  bool CanRecord() const override {
#ifndef NDEBUG
    return false;  // debug builds synchronise after every launch, which a capture forbids
#endif
    const char* e = std::getenv("NEEDLE_CUDA_GRAPH");
    return (e == nullptr || std::strcmp(e, "0") != 0) && cuda::ComputeCapability() >= 90;
  }
  void SetStepInputs(const int32_t* ids, int64_t T, int64_t pos0,
                     const std::vector<float>& inv_freq) override {
    if (T != 1) Fail("CUDA backend: a recorded step has one token, not ", T);
    NEEDLE_CUDA_CHECK(cudaEventSynchronize(step_copied_));  // the last copy read step_host_
    step_host_->pos = pos0;
    step_host_->id = ids[0];
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(step_dev_, step_host_, sizeof(StepInputs),
                                      cudaMemcpyHostToDevice, stream_));
    NEEDLE_CUDA_CHECK(cudaEventRecord(step_copied_, stream_));
    Freqs(inv_freq);
  }
  std::unique_ptr<Recording> Record(const std::function<void()>& body) override {
    struct Mode {  // step mode for the scope, also when body throws
      explicit Mode(bool& m) : m_(m) { m_ = true; }
      ~Mode() { m_ = false; }
      bool& m_;
    } mode(step_mode_);
    recordable_ = true;
    body();
    if (!recordable_) return nullptr;
    const uint64_t generation = cuda::GrowBuffer::Reallocations().load();
    NEEDLE_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
    cudaGraph_t graph = nullptr;
    try {
      body();
    } catch (...) {
      cudaStreamEndCapture(stream_, &graph);
      if (graph != nullptr) cudaGraphDestroy(graph);
      throw;
    }
    NEEDLE_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    if (!recordable_ || cuda::GrowBuffer::Reallocations().load() != generation) {
      cudaGraphDestroy(graph);
      return nullptr;
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    NEEDLE_CUDA_CHECK(e);
    ++stats_.recordings;
    return std::make_unique<CudaRecording>(exec, stream_, generation, stats_);
  }

  void RmsNorm(const float* x, int64_t rows, int64_t D, const Weight& w, float eps,
               float* y) override {
    cuda::RmsNorm(x, rows, D, w.data, w.dtype, eps, y, stream_);
  }
  void Rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t pos0,
            const std::vector<float>& inv_freq, float scaling) override {
    if (step_mode_) recordable_ = false;  // takes pos0 by value
    cuda::Rope(x, T, heads, D, pos0, Freqs(inv_freq), scaling, stream_);
  }
  void SiluMul(const float* gate, const float* up, int64_t n, float* out) override {
    cuda::SiluMul(gate, up, n, out, stream_);
  }
  void Add(float* x, const float* y, int64_t n) override { cuda::Add(x, y, n, stream_); }

  void KVWrite(KVCache& cache, int64_t layer, int64_t pos0, int64_t T, const float* k,
               const float* v) override {
    if (step_mode_) recordable_ = false;  // takes pos0 by value
    const KVLayerView view = WritableLayer(cache, layer, pos0, T);
    cuda::KVWrite(k, v, T, view.kv_heads, view.head_dim, pos0, view.block_size, view.table,
                  const_cast<uint8_t*>(view.k), const_cast<uint8_t*>(view.v), view.dtype, stream_);
  }
  void Attention(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans,
                 float* out, float* lse) override {
    if (spans != nullptr)
      Fail(
          "CUDA backend: sparse attention runs on the CPU (use --device cpu with --attention "
          "sparse)");
    const bool replayable =
        cuda::Attention(q, kv, a, out, lse, sm_count_, attn_ws_, stream_, StepPos());
    if (step_mode_ && !replayable) recordable_ = false;
  }

 public:
  cudaStream_t stream() const { return stream_; }
  void set_fused(bool on) { fused_ = on; }
  void PreferBatchKernels(bool on) override { gemv_tc_ = on; }
  const CudaRecordStats& stats() const { return stats_; }

 private:
  // Whether a weight (and the others of its call) goes through the decode GEMV (gemv.h).
  bool Gemv1(int64_t T, const Weight& w) const {
    return fused_ && cuda::GemvSupported(T, w.dtype, w.cols, w.data);
  }
  // The view of `layer` for writing positions [pos0, pos0 + T), their blocks assigned.
  static KVLayerView WritableLayer(KVCache& cache, int64_t layer, int64_t pos0, int64_t T) {
    if (cache.on_host())
      Fail(
          "CUDA backend: the KV cache is in host memory; create it with the backend's "
          "kv_memory()");
    cache.AssignBlocks(layer, pos0, T);
    const KVLayerView view = cache.Layer(layer);
    if (view.dtype == DType::kI8)
      Fail("CUDA backend: int8 KV cache is CPU-only (use --kv-type bf16, f16 or f32)");
    return view;
  }
  // The rotary frequencies on the device: the same every layer, uploaded when they change. (A
  // copy from pageable memory is staged before cudaMemcpyAsync returns, so inv_freq may change
  // afterwards.)
  const float* Freqs(const std::vector<float>& inv_freq) {
    float* d_freq = freq_.Get<float>(inv_freq.size());
    if (inv_freq != freq_host_) {
      NEEDLE_CUDA_CHECK(cudaMemcpyAsync(d_freq, inv_freq.data(), inv_freq.size() * 4,
                                        cudaMemcpyHostToDevice, stream_));
      freq_host_ = inv_freq;
    }
    return d_freq;
  }
  // The position a recorded step reads (device), or nullptr outside Record.
  const int64_t* StepPos() const { return step_mode_ ? &step_dev_->pos : nullptr; }

  int sm_count_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  bool gemv_tc_ = false;  // PreferBatchKernels: the tensor-core GEMV for every decode step
  std::unique_ptr<KVMemory> memory_;
  std::vector<void*> weights_;
  std::map<size_t, std::vector<float*>> pool_;
  std::unordered_map<const float*, size_t> sizes_;
  // Grown on demand: token ids in, top-k out, rope frequencies, bf16/f16 matmul inputs, and
  // the partial results of split attention.
  cuda::GrowBuffer token_ids_{"token ids"}, topk_ids_{"top-k ids"}, topk_vals_{"top-k values"};
  cuda::GrowBuffer freq_{"rope frequencies"}, x16_{"matmul input"};
  cuda::AttnWorkspace attn_ws_;
  std::vector<float> freq_host_;
  // Recording (Record): the step inputs in pinned and device memory, the event after their last
  // copy, whether operators read them (step mode) and whether every launch so far can replay.
  StepInputs* step_host_ = nullptr;
  StepInputs* step_dev_ = nullptr;
  cudaEvent_t step_copied_ = nullptr;
  bool step_mode_ = false, recordable_ = false;
  // The decode fast path (GEMV, fused kernels); NEEDLE_CUDA_FUSED=0 or set_fused(false) runs the
  // operators one by one through cuBLAS, as before it existed (comparisons).
  bool fused_ = true;
  CudaRecordStats stats_;
};

}  // namespace

bool CudaAvailable(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    // Without a GPU the runtime says "CUDA driver version is insufficient for CUDA runtime
    // version" (no driver at all) or "no CUDA-capable device is detected": say that first.
    if (why != nullptr)
      *why = std::string(e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice
                             ? "no GPU found"
                             : "no usable CUDA device") +
             " (CUDA: " + cudaGetErrorString(e) + ")";
    cudaGetLastError();
    return false;
  }
  if (n == 0) {
    if (why != nullptr) *why = "no CUDA device";
    return false;
  }
  return true;
}

cudaStream_t CudaBackendStream(Backend& b) {
  auto* c = dynamic_cast<CudaBackend*>(&b);
  if (c == nullptr) Fail("CudaBackendStream: not a CUDA backend");
  return c->stream();
}

CudaRecordStats GetCudaRecordStats(Backend& b) {
  auto* c = dynamic_cast<CudaBackend*>(&b);
  if (c == nullptr) Fail("GetCudaRecordStats: not a CUDA backend");
  return c->stats();
}

void SetCudaFused(Backend& b, bool on) {
  auto* c = dynamic_cast<CudaBackend*>(&b);
  if (c == nullptr) Fail("SetCudaFused: not a CUDA backend");
  c->set_fused(on);
}

std::unique_ptr<Backend> MakeCudaBackend(int device) {
  std::string why;
  if (!CudaAvailable(&why)) Fail("--device cuda: ", why);
  int n = 0;
  NEEDLE_CUDA_CHECK(cudaGetDeviceCount(&n));
  if (device < 0 || device >= n) Fail("--device cuda:", device, ": only ", n, " CUDA device(s)");
  return std::make_unique<CudaBackend>(device);
}

}  // namespace needle
