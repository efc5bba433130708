// CudaBackend; see cuda_backend.h.
#include "engine/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <map>
#include <unordered_map>
#include <vector>

#include "engine/base/error.h"
#include "engine/cuda/attention.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/kernels.h"

namespace needle {
namespace {

using cuda::DeviceAlloc;

class CudaMemory final : public KVMemory {
 public:
  explicit CudaMemory(std::string name) : name_(std::move(name)) {}
  std::string Name() const override { return name_; }
  size_t AvailableBytes() const override {
    size_t free_b = 0, total_b = 0;
    NEEDLE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    return free_b;
  }
  void* Allocate(size_t bytes) override { return DeviceAlloc(bytes, "the KV cache"); }
  void Deallocate(void* p) override { cudaFree(p); }
  void CopyFromHost(void* dst, const void* src, size_t bytes) override {
    NEEDLE_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  }

 private:
  std::string name_;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) {
    NEEDLE_CUDA_CHECK(cudaSetDevice(device));
    cudaDeviceProp prop{};
    NEEDLE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    sm_count_ = prop.multiProcessorCount;
    memory_ = std::make_unique<CudaMemory>("GPU " + std::to_string(device) + " (" + prop.name +
                                           ") memory");
    NEEDLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    NEEDLE_CUBLAS_CHECK(cublasCreate(&blas_));
    NEEDLE_CUBLAS_CHECK(cublasSetStream(blas_, stream_));
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    for (auto& [size, list] : pool_)
      for (float* p : list) cudaFree(p);
    for (void* p : weights_) cudaFree(p);
    cublasDestroy(blas_);
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
  void Free(float* p) override { pool_[sizes_.at(p)].push_back(p); }
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
    int32_t* d_ids = token_ids_.Get<int32_t>(static_cast<size_t>(T));
    NEEDLE_CUDA_CHECK(
        cudaMemcpyAsync(d_ids, ids, static_cast<size_t>(T) * 4, cudaMemcpyHostToDevice, stream_));
    cuda::Embed(table.data, table.dtype, d_ids, T, table.cols, out, stream_);
  }

  // y[T, N] = x[T, K] W[N, K]^T: in cuBLAS's column-major terms Y^T[N, T] = W^T' X^T with W read
  // transposed (lda = K). bf16/f16 weights take x converted to the same type; f32 accumulate.
  void MatMul(const float* x, int64_t T, const Weight& w, const Weight* bias, float* y) override {
    const int64_t N = w.rows, K = w.cols;
    const float one = 1.f, zero = 0.f;
    if (w.dtype == DType::kF32) {
      NEEDLE_CUBLAS_CHECK(cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N),
                                      static_cast<int>(T), static_cast<int>(K), &one,
                                      static_cast<const float*>(w.data), static_cast<int>(K), x,
                                      static_cast<int>(K), &zero, y, static_cast<int>(N)));
    } else {
      const cudaDataType_t t = w.dtype == DType::kBF16 ? CUDA_R_16BF : CUDA_R_16F;
      void* xh = x16_.Get<uint16_t>(static_cast<size_t>(T * K));
      cuda::ConvertF32(x, T * K, xh, w.dtype, stream_);
      NEEDLE_CUBLAS_CHECK(cublasGemmEx(
          blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(T),
          static_cast<int>(K), &one, w.data, t, static_cast<int>(K), xh, t, static_cast<int>(K),
          &zero, y, CUDA_R_32F, static_cast<int>(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    if (bias != nullptr && bias->present())
      cuda::AddBias(y, T, N, bias->data, bias->dtype, stream_);
  }

  void RmsNorm(const float* x, int64_t rows, int64_t D, const Weight& w, float eps,
               float* y) override {
    cuda::RmsNorm(x, rows, D, w.data, w.dtype, eps, y, stream_);
  }
  void Rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t pos0,
            const std::vector<float>& inv_freq, float scaling) override {
    // The same frequencies every layer: upload them when they change. (A copy from pageable
    // memory is staged before cudaMemcpyAsync returns, so inv_freq may change afterwards.)
    float* d_freq = freq_.Get<float>(inv_freq.size());
    if (inv_freq != freq_host_) {
      NEEDLE_CUDA_CHECK(cudaMemcpyAsync(d_freq, inv_freq.data(), inv_freq.size() * 4,
                                        cudaMemcpyHostToDevice, stream_));
      freq_host_ = inv_freq;
    }
    cuda::Rope(x, T, heads, D, pos0, d_freq, scaling, stream_);
  }
  void SiluMul(const float* gate, const float* up, int64_t n, float* out) override {
    cuda::SiluMul(gate, up, n, out, stream_);
  }
  void Add(float* x, const float* y, int64_t n) override { cuda::Add(x, y, n, stream_); }

  void KVWrite(KVCache& cache, int64_t layer, int64_t pos0, int64_t T, const float* k,
               const float* v) override {
    if (cache.on_host())
      Fail(
          "CUDA backend: the KV cache is in host memory; create it with the backend's "
          "kv_memory()");
    cache.AssignBlocks(layer, pos0, T);
    const KVLayerView view = cache.Layer(layer);
    if (view.dtype == DType::kI8)
      Fail("CUDA backend: int8 KV cache is CPU-only (use --kv-type bf16, f16 or f32)");
    cuda::KVWrite(k, v, T, view.kv_heads, view.head_dim, pos0, view.block_size, view.table,
                  const_cast<uint8_t*>(view.k), const_cast<uint8_t*>(view.v), view.dtype, stream_);
  }
  void Attention(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans,
                 float* out, float* lse) override {
    if (spans != nullptr)
      Fail(
          "CUDA backend: sparse attention runs on the CPU (use --device cpu with --attention "
          "sparse)");
    cuda::Attention(q, kv, a, out, lse, sm_count_, attn_ws_, stream_);
  }

 public:
  cudaStream_t stream() const { return stream_; }

 private:
  int sm_count_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  std::unique_ptr<CudaMemory> memory_;
  std::vector<void*> weights_;
  std::map<size_t, std::vector<float*>> pool_;
  std::unordered_map<const float*, size_t> sizes_;
  // Grown on demand: token ids in, top-k out, rope frequencies, bf16/f16 matmul inputs, and
  // the partial results of split attention.
  cuda::GrowBuffer token_ids_{"token ids"}, topk_ids_{"top-k ids"}, topk_vals_{"top-k values"};
  cuda::GrowBuffer freq_{"rope frequencies"}, x16_{"matmul input"};
  cuda::AttnWorkspace attn_ws_;
  std::vector<float> freq_host_;
};

}  // namespace

bool CudaAvailable(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why != nullptr) *why = std::string("no CUDA device: ") + cudaGetErrorString(e);
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

std::unique_ptr<Backend> MakeCudaBackend(int device) {
  std::string why;
  if (!CudaAvailable(&why)) Fail("--device cuda: ", why);
  int n = 0;
  NEEDLE_CUDA_CHECK(cudaGetDeviceCount(&n));
  if (device < 0 || device >= n) Fail("--device cuda:", device, ": only ", n, " CUDA device(s)");
  return std::make_unique<CudaBackend>(device);
}

}  // namespace needle
