// One checking macro for every CUDA runtime and cuBLAS call: a failure becomes an Error that
// names the statement, the file and line, and the library's own message. Kernel launches are
// checked with NEEDLE_CUDA_CHECK_LAUNCH(), which in debug builds (NDEBUG unset) also synchronises
// so that a faulting kernel is reported at its launch site rather than at the next copy.
#pragma once

#include <cublas_v2.h>

#include <cuda_runtime.h>
#include "engine/cuda/cublas_api.h"

#include "engine/base/error.h"

namespace needle::cuda {

[[noreturn]] inline void FailCuda(cudaError_t e, const char* stmt, const char* file, int line) {
  Fail("CUDA error ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ") in ", stmt, " at ", file,
       ":", line);
}

[[noreturn]] inline void FailCublas(cublasStatus_t s, const char* stmt, const char* file,
                                    int line) {
  Fail("cuBLAS error ", Cublas().GetStatusName(s), " (", Cublas().GetStatusString(s), ") in ", stmt,
       " at ", file, ":", line);
}

}  // namespace needle::cuda

#define NEEDLE_CUDA_CHECK(stmt)                                         \
  do {                                                                  \
    const cudaError_t needle_err_ = (stmt);                             \
    if (needle_err_ != cudaSuccess)                                     \
      ::needle::cuda::FailCuda(needle_err_, #stmt, __FILE__, __LINE__); \
  } while (0)

#define NEEDLE_CUBLAS_CHECK(stmt)                                        \
  do {                                                                   \
    const cublasStatus_t needle_st_ = (stmt);                            \
    if (needle_st_ != CUBLAS_STATUS_SUCCESS)                             \
      ::needle::cuda::FailCublas(needle_st_, #stmt, __FILE__, __LINE__); \
  } while (0)

#ifdef NDEBUG
#define NEEDLE_CUDA_CHECK_LAUNCH() NEEDLE_CUDA_CHECK(cudaGetLastError())
#else
#define NEEDLE_CUDA_CHECK_LAUNCH()              \
  do {                                          \
    NEEDLE_CUDA_CHECK(cudaGetLastError());      \
    NEEDLE_CUDA_CHECK(cudaDeviceSynchronize()); \
  } while (0)
#endif
