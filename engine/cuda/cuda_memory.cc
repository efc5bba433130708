// CudaMemory: cuda_memory.h.
#include "engine/cuda/cuda_memory.h"

#include <cuda_runtime.h>

#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_buffer.h"

namespace needle::cuda {
namespace {

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
  void CopyToHost(void* dst, const void* src, size_t bytes) override {
    NEEDLE_CUDA_CHECK(cudaDeviceSynchronize());  // (the backend's stream does not block this one)
    NEEDLE_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
  }
  ~CudaMemory() override {
    if (copies_ != nullptr) cudaStreamDestroy(copies_);
  }
  // A swap's copies on a stream of their own, after everything queued so far (one wait at the
  // first), waited for once: into and out of pinned buffers they go by DMA, back to back.
  void QueueToHost(void* dst, const void* src, size_t bytes) override {
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, CopyStream()));
  }
  void QueueFromHost(void* dst, const void* src, size_t bytes) override {
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, CopyStream()));
  }
  void FinishCopies() override {
    if (!queued_) return;
    queued_ = false;
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(copies_));
  }
  void* AllocateHost(size_t bytes, HostFree* free_fn) override {
    void* p = nullptr;
    if (cudaHostAlloc(&p, bytes, cudaHostAllocDefault) != cudaSuccess) {
      (void)cudaGetLastError();  // (a locked-memory limit: pageable memory, slower copies)
      return KVMemory::AllocateHost(bytes, free_fn);
    }
    *free_fn = [](void* q) { cudaFreeHost(q); };
    return p;
  }

 private:
  cudaStream_t CopyStream() {
    if (copies_ == nullptr)
      NEEDLE_CUDA_CHECK(cudaStreamCreateWithFlags(&copies_, cudaStreamNonBlocking));
    if (!queued_) NEEDLE_CUDA_CHECK(cudaDeviceSynchronize());
    queued_ = true;
    return copies_;
  }

  std::string name_;
  cudaStream_t copies_ = nullptr;
  bool queued_ = false;
};

}  // namespace

std::unique_ptr<KVMemory> MakeCudaMemory(std::string name) {
  return std::make_unique<CudaMemory>(std::move(name));
}

}  // namespace needle::cuda
