// NEEDLE_REQUIRE_GPU(var): in a GPU test, skips with the reason when there is no usable GPU (or
// the build has no CUDA), else declares `var`, a CUDA backend on GPU 0.
#pragma once

#include <gtest/gtest.h>

#include <string>

#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/cuda_backend.h"
#define NEEDLE_REQUIRE_GPU(var)                                  \
  std::string why_;                                              \
  if (!CudaAvailable(&why_)) GTEST_SKIP() << "no GPU: " << why_; \
  auto var = MakeCudaBackend(0);
#else
#define NEEDLE_REQUIRE_GPU(var) \
  GTEST_SKIP() << "no GPU: this build has no CUDA (nvcc was not found at configure time)";
#endif
