// The decode GEMV (engine/cuda/gemv.h) on the projections of Qwen2.5-7B and Llama-3.1-8B, every
// compiled tiling: one JSON line per (shape, tiling) with the time per call and the fraction of
// the copy bandwidth it streams the weights at. As in a decode step, the calls go to 28 copies
// of the weights in turn (a model's worth: nothing stays in L2) and are replayed from a CUDA
// graph. DefaultGemvTiling is chosen from these lines.
#include "bench/bench_gemv.h"

#include <cuda_bf16.h>

#include <cstdio>
#include <string>
#include <vector>

#include "bench/bench_floors.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/gemv.h"

namespace needle::bench {
namespace {

__global__ void FillBf16(__nv_bfloat16* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    p[i] = __float2bfloat16((h % 2001) / 1000.f - 1.f);
  }
}

struct Shape {
  const char* model;
  const char* name;
  int64_t rows[3];  // outputs (kStore: up to 3; kAdd: 1; kSiluMul: gate rows)
  int n;
  int64_t K;
  cuda::GemvEpilogue e;
  bool norm;
};

}  // namespace

void GemvSweep(cudaStream_t stream, double copy_gbs) {
  using E = cuda::GemvEpilogue;
  const Shape shapes[] = {
      {"qwen2.5-7b", "q/k/v + norm", {3584, 512, 512}, 3, 3584, E::kStore, true},
      {"qwen2.5-7b", "o + residual", {3584}, 1, 3584, E::kAdd, false},
      {"qwen2.5-7b", "gate/up + norm + silu", {18944, 18944}, 2, 3584, E::kSiluMul, true},
      {"qwen2.5-7b", "down + residual", {3584}, 1, 18944, E::kAdd, false},
      {"qwen2.5-7b", "lm_head + norm", {152064}, 1, 3584, E::kStore, true},
      {"llama-3.1-8b", "q/k/v + norm", {4096, 1024, 1024}, 3, 4096, E::kStore, true},
      {"llama-3.1-8b", "o + residual", {4096}, 1, 4096, E::kAdd, false},
      {"llama-3.1-8b", "gate/up + norm + silu", {14336, 14336}, 2, 4096, E::kSiluMul, true},
      {"llama-3.1-8b", "down + residual", {4096}, 1, 14336, E::kAdd, false},
      {"llama-3.1-8b", "lm_head + norm", {128256}, 1, 4096, E::kStore, true},
  };
  for (const Shape& s : shapes) {
    const int copies = s.rows[0] > 100000 ? 4 : 28;
    size_t per = 0, out_rows = 0;
    for (int i = 0; i < s.n; ++i) {
      per += static_cast<size_t>(s.rows[i] * s.K);
      out_rows += static_cast<size_t>(s.rows[i]);
    }
    std::vector<void*> bufs;
    auto alloc = [&](size_t bytes) {
      void* p = cuda::DeviceAlloc(bytes, "gemv sweep");
      bufs.push_back(p);
      return p;
    };
    auto* w = static_cast<__nv_bfloat16*>(alloc(per * copies * 2));
    FillBf16<<<1024, 256, 0, stream>>>(w, per * copies, 7);
    auto* g = static_cast<__nv_bfloat16*>(alloc(static_cast<size_t>(s.K) * 2));
    FillBf16<<<16, 256, 0, stream>>>(g, static_cast<size_t>(s.K), 9);
    auto* x = static_cast<float*>(alloc(static_cast<size_t>(s.K) * 4));
    NEEDLE_CUDA_CHECK(cudaMemsetAsync(x, 0x3c, static_cast<size_t>(s.K) * 4, stream));
    auto* y = static_cast<float*>(alloc(out_rows * 4));
    NEEDLE_CUDA_CHECK(cudaMemsetAsync(y, 0, out_rows * 4, stream));
    NEEDLE_CUDA_CHECK_LAUNCH();
    cuda::GemvNorm norm;
    if (s.norm) norm = {g, DType::kBF16, 1e-6f};
    for (const cuda::GemvTiling& t : cuda::kGemvTilings) {
      const double ms =
          GraphMedianMs(stream, 20,
                        [&] {
                          for (int c = 0; c < copies; ++c) {
                            cuda::GemvOut o[3];
                            size_t off = per * c, yo = 0;
                            for (int i = 0; i < s.n; ++i) {
                              o[i].w = w + off;
                              o[i].rows = s.rows[i];
                              o[i].y = y + yo;
                              off += static_cast<size_t>(s.rows[i] * s.K);
                              yo += static_cast<size_t>(s.rows[i]);
                            }
                            cuda::Gemv(x, 1, s.K, norm, DType::kBF16, o, s.n, s.e, stream, &t);
                          }
                        }) /
          copies;
      const double bytes = static_cast<double>(per) * 2;
      const bool chosen = [&] {
        const cuda::GemvTiling d = cuda::DefaultGemvTiling(
            s.e == cuda::GemvEpilogue::kSiluMul ? s.rows[0] : static_cast<int64_t>(out_rows), s.K);
        return d.rows == t.rows && d.unroll == t.unroll;
      }();
      std::printf(
          "{\"bench\":\"gemv\",\"model\":\"%s\",\"op\":\"%s\",\"K\":%lld,\"rows\":%zu,\"tiling\":"
          "\"%dx%d\",\"default\":%s,\"us\":%.2f,\"GB/s\":%.0f,\"of_bw\":%.3f}\n",
          s.model, s.name, static_cast<long long>(s.K), out_rows, t.rows, t.unroll,
          chosen ? "true" : "false", ms * 1e3, bytes / (ms * 1e-3) / 1e9,
          bytes / (ms * 1e-3) / 1e9 / copy_gbs);
      std::fflush(stdout);
    }
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (void* p : bufs) cudaFree(p);
  }
}

}  // namespace needle::bench
