// Page-locked host memory for the hybrid engine's copies between GPU and host.
//   PinnedFloats  scratch allocated pinned (q, partials, scores, lse): copies go by DMA at once
//                 instead of through the driver's staging buffer.
//   ArenaPinning  an existing arena (the host KV cache) registered with CUDA chunk by chunk as
//                 it comes into use: copies to and from it are asynchronous DMA, and the GPU can
//                 read it (mapped; the host pointer is the device pointer where the GPU says so).
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace needle::cuda {

class PinnedFloats {
 public:
  PinnedFloats() = default;
  PinnedFloats(const PinnedFloats&) = delete;
  PinnedFloats& operator=(const PinnedFloats&) = delete;
  ~PinnedFloats();
  // At least n floats; contents are dropped when it grows. A copy into or out of it must be
  // waited for before it is reused.
  float* Get(size_t n);

 private:
  float* p_ = nullptr;
  size_t n_ = 0;
};

class ArenaPinning {
 public:
  static constexpr size_t kChunk = size_t{32} << 20;  // registered at a time

  ArenaPinning() = default;
  ArenaPinning(const ArenaPinning&) = delete;
  ArenaPinning& operator=(const ArenaPinning&) = delete;
  ~ArenaPinning();  // unregisters every chunk (before the arena is unmapped)

  // The arena [base, base + bytes): page-aligned base (an mmap), nothing registered yet.
  void Reset(uint8_t* base, size_t bytes);
  // Registers every chunk [p, p + n) touches that is not yet registered. False once CUDA has
  // refused a registration (a locked-memory limit): the caller falls back to what needs none.
  // Threads may call it at once (one registers while the others wait).
  bool Pin(const uint8_t* p, size_t n);
  bool failed() const { return failed_; }
  // Bytes from p to the end of its chunk (SIZE_MAX when p is not in the arena). One copy must not
  // cross registrations (CUDA refuses it), so copies of the arena are cut there.
  size_t ToChunkEnd(const uint8_t* p) const;
  size_t pinned_bytes() const { return pinned_; }

 private:
  uint8_t* base_ = nullptr;
  size_t bytes_ = 0, pinned_ = 0;
  std::vector<uint8_t> done_;  // [chunk]
  bool failed_ = false;
  std::mutex mu_;
};

// Whether kernels on the current GPU can read registered host memory through the host pointer.
bool HostPointersUsableOnGpu();

}  // namespace needle::cuda
