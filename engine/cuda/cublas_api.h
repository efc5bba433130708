// cuBLAS, opened (dlopen) when the first CUDA backend is made rather than when needle starts:
// linked directly, libcublas and libcublasLt (about 200 MB resident) were loaded by every
// command, `needle --help` and CPU runs included. The CUDA runtime is linked statically and
// opens the driver only at the first CUDA call.
#pragma once

#include <cublas_v2.h>

namespace needle::cuda {

struct CublasApi {
  cublasStatus_t (*Create)(cublasHandle_t*);
  cublasStatus_t (*Destroy)(cublasHandle_t);
  cublasStatus_t (*SetStream)(cublasHandle_t, cudaStream_t);
  cublasStatus_t (*GemmEx)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                           const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                           int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                           cublasGemmAlgo_t);
  cublasStatus_t (*Sgemm)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                          const float*, const float*, int, const float*, int, const float*, float*,
                          int);
  const char* (*GetStatusName)(cublasStatus_t);
  const char* (*GetStatusString)(cublasStatus_t);
};

// The loaded library's entry points; throws Error naming the library (and dlerror) when it
// cannot be opened or lacks one of them.
const CublasApi& Cublas();

}  // namespace needle::cuda
