// The CUDA backend: the Backend interface (engine/backend/backend.h) on one GPU. Weights are
// copied to device memory in their own type (bf16/f16/f32); activations are f32 device buffers;
// every projection, the MLP and the LM head go through cuBLAS (bf16/f16 inputs, f32 accumulate
// and output); the rest are our kernels (kernels.h, attention.h). The KV cache lives in device
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

}  // namespace needle
