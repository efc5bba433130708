// Backend::HostResidual on a GPU: a layer-major prompt's residual stream in page-locked host
// memory, each micro-batch copied in on one copy stream and back on another, the next
// micro-batch's rows loaded into a second slot while the current one computes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "engine/backend/backend.h"

namespace needle::cuda {

// b: the CUDA backend (its AllocHost and Alloc); main: its stream, which the work runs on.
std::unique_ptr<Backend::HostResidual> MakeHostResidual(Backend& b, cudaStream_t main, int64_t rows,
                                                        int64_t cols, int64_t max_rows);

}  // namespace needle::cuda
