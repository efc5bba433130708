// Device memory for the CUDA backend: allocation with out-of-memory errors that say how much was
// asked for and how much is free, and a scratch buffer that grows on demand.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>

#include "engine/base/error.h"
#include "engine/cuda/cuda_check.h"
#include "kvcache/kv_cache.h"  // FormatBytes

namespace needle::cuda {

inline void* DeviceAlloc(size_t bytes, const std::string& what) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear the error state of this failed call
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    Fail("GPU out of memory: ", what, " needs ", FormatBytes(bytes), " but only ",
         FormatBytes(free_b), " of ", FormatBytes(total_b), " is free");
  }
  NEEDLE_CUDA_CHECK(e);
  return p;
}

// A device buffer that is reallocated (contents dropped) when a larger one is asked for.
class GrowBuffer {
 public:
  explicit GrowBuffer(std::string what) : what_(std::move(what)) {}
  ~GrowBuffer() {
    if (p_ != nullptr) cudaFree(p_);
  }
  GrowBuffer(const GrowBuffer&) = delete;
  GrowBuffer& operator=(const GrowBuffer&) = delete;

  template <typename T>
  T* Get(size_t count) {
    const size_t bytes = count * sizeof(T);
    if (bytes > bytes_) {
      if (p_ != nullptr) NEEDLE_CUDA_CHECK(cudaFree(p_));
      p_ = nullptr;
      p_ = DeviceAlloc(bytes, what_);
      bytes_ = bytes;
      Reallocations().fetch_add(1, std::memory_order_relaxed);
    }
    return static_cast<T*>(p_);
  }

  // Reallocations of any GrowBuffer so far: recorded work (CUDA graphs) that holds the address
  // of a GrowBuffer is stale once this count has moved.
  static std::atomic<uint64_t>& Reallocations() {
    static std::atomic<uint64_t> n{0};
    return n;
  }

  // The same, zero-filled on `stream` whenever it is (re)allocated: for state the kernels keep
  // at zero between calls (split counters).
  template <typename T>
  T* GetZeroed(size_t count, cudaStream_t stream) {
    const size_t before = bytes_;  // grows exactly when reallocated (the address may repeat)
    T* p = Get<T>(count);
    if (bytes_ != before) NEEDLE_CUDA_CHECK(cudaMemsetAsync(p_, 0, bytes_, stream));
    return p;
  }

 private:
  std::string what_;
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace needle::cuda
