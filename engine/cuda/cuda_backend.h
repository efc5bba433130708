// The CUDA backend: the Backend interface (engine/backend/backend.h) on one GPU. Weights are
// copied to device memory in their own type (bf16/f16/f32); activations are f32 device buffers.
// Prompts: every projection, the MLP and the LM head go through cuBLAS (bf16/f16 inputs, f32
// accumulate and output). Decode (one token, or a batch of up to kGemvMaxTokens sequences' rows,
// each row's bits those it gets alone): 16-bit weights go through the GEMV of gemv.h with
// the neighbouring operators folded in (the fused operators of Backend), and the step is
// recorded once as a CUDA graph and replayed (Record; docs/ARCHITECTURE.md has the step in
// order). The rest are our kernels (kernels.h, attention.h). The KV cache lives in device
// memory in the block layout of kvcache/ (kv_memory()).
#pragma once

#include <memory>
#include <string>

#include <cuda_runtime.h>

#include "engine/backend/backend.h"

namespace needle {

// Whether a usable CUDA device exists; otherwise *why says why not (no driver, no device, the
// build has no CUDA).
bool CudaAvailable(std::string* why);
// Throws Error when CUDA is unavailable (with the reason) or `device` does not exist.
std::unique_ptr<Backend> MakeCudaBackend(int device);
// The stream a CUDA backend (from MakeCudaBackend) issues all its work on: a non-blocking stream,
// so events for timing must be recorded on it, not on the legacy default stream.
cudaStream_t CudaBackendStream(Backend& b);
// Turns the decode fast path (one-token GEMV with fused epilogues, the fused rotary embedding and
// cache write, and with them the recorded CUDA-graph step) on or off; off runs the operators one
// by one through cuBLAS. On unless NEEDLE_CUDA_FUSED=0. For comparisons and tests.
void SetCudaFused(Backend& b, bool on);
// Decode steps recorded as CUDA graphs and replays of them so far (tests, benchmarks).
struct CudaRecordStats {
  int64_t recordings = 0, replays = 0;
};
CudaRecordStats GetCudaRecordStats(Backend& b);

}  // namespace needle
