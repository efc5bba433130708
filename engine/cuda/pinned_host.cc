#include "engine/cuda/pinned_host.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "engine/cuda/cuda_check.h"

namespace needle::cuda {

PinnedFloats::~PinnedFloats() {
  if (p_ != nullptr) cudaFreeHost(p_);
}

float* PinnedFloats::Get(size_t n) {
  if (n > n_) {
    if (p_ != nullptr) NEEDLE_CUDA_CHECK(cudaFreeHost(p_));
    p_ = nullptr;
    void* p = nullptr;
    NEEDLE_CUDA_CHECK(cudaMallocHost(&p, std::max<size_t>(n, 1) * sizeof(float)));
    p_ = static_cast<float*>(p), n_ = n;
  }
  return p_;
}

ArenaPinning::~ArenaPinning() { Reset(nullptr, 0); }

void ArenaPinning::Reset(uint8_t* base, size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t c = 0; c < done_.size(); ++c)
    if (done_[c] != 0) cudaHostUnregister(base_ + c * kChunk);
  base_ = base, bytes_ = bytes, pinned_ = 0;
  done_.assign((bytes + kChunk - 1) / kChunk, 0);
}

bool ArenaPinning::Pin(const uint8_t* p, size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) return false;
  if (n == 0) return true;
  NEEDLE_CHECK(p >= base_ && p + n <= base_ + bytes_);
  const size_t c0 = static_cast<size_t>(p - base_) / kChunk,
               c1 = static_cast<size_t>(p + n - 1 - base_) / kChunk;
  const size_t page = 4096, end = (bytes_ + page - 1) / page * page;  // (the mapping's pages)
  for (size_t c = c0; c <= c1; ++c) {
    if (done_[c] != 0) continue;
    const size_t len = std::min(kChunk, end - c * kChunk);
    const cudaError_t e = cudaHostRegister(base_ + c * kChunk, len,
                                           cudaHostRegisterPortable | cudaHostRegisterMapped);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // (not sticky: clear it)
      std::fprintf(stderr,
                   "needle: warning: cannot page-lock the host KV cache (%s, after %zu MiB): "
                   "its copies go through the driver's staging buffer and the CPU attends every "
                   "Context block\n",
                   cudaGetErrorString(e), pinned_ >> 20);
      failed_ = true;
      return false;
    }
    done_[c] = 1, pinned_ += len;
  }
  return true;
}

size_t ArenaPinning::ToChunkEnd(const uint8_t* p) const {
  if (p < base_ || p >= base_ + bytes_) return SIZE_MAX;
  return kChunk - static_cast<size_t>(p - base_) % kChunk;
}

bool HostPointersUsableOnGpu() {
  int dev = 0, v = 0;
  NEEDLE_CUDA_CHECK(cudaGetDevice(&dev));
  NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrCanUseHostPointerForRegisteredMem, dev));
  return v != 0;
}

}  // namespace needle::cuda
