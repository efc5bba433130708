// Matrix-vector products for decode (one token): the projections, the MLP and the LM head read
// every weight once per step, so a decode step is bound by streaming the weights from HBM. cuBLAS
// picks GEMM tilings for M = 1 that reach ~0.6-0.8 of the bandwidth and needs the input
// converted to 16 bits by a separate kernel; these kernels read the f32 input as it is and fuse
// what follows the product (bias, residual add, SiLU gate), so one launch replaces three to six.
//
// Each block of 128 threads owns two weight rows: every thread streams its share of the 16-byte
// chunks (8 elements) of both rows, all of its loads in flight at once for K up to 4096, and
// multiplies them with the f32 input (read through L1: every block reads the same vector); a
// shuffle and shared-memory reduction ends the rows. A block per row pair, not a warp, keeps the
// loads of a short row (K = 3584: 3.5 per thread) in one round trip to memory and spreads a
// long one (K = 18944) over thousands of blocks. The products are those of the CPU's matmul
// (f32 x times the weight widened to f32, f32 accumulation); only the order of the additions
// differs.
//
// The RMSNorm that precedes a projection folds in: W (x * r * g) = r * W (x * g) with the
// scalar r = rsqrt(mean(x^2) + eps), and every block reads all of x anyway, so it sums the
// squares as it goes and scales its dot products by r at the end (no launch, no pass over x).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/base/dtype.h"

namespace needle::cuda {

// One output of a product with the shared input x[K]: y[rows] = W[rows, K] x + bias[rows].
struct GemvOut {
  const void* w = nullptr;     // [rows, K] bf16 or f16 (the call's wtype), row-major, device
  const void* bias = nullptr;  // [rows] of bias_type, or nullptr
  DType bias_type = DType::kF32;
  float* y = nullptr;  // [rows] f32, device
  int64_t rows = 0;
};

// RMSNorm of the input before the product (GemvNorm::g == nullptr: none).
struct GemvNorm {
  const void* g = nullptr;  // [K] of g_type, device
  DType g_type = DType::kF32;
  float eps = 0.f;
};

enum class GemvEpilogue {
  kStore,    // each of the n (<= 3) outputs: y = W x + b  (q, k, v of one input)
  kAdd,      // one output: y += W x + b  (the residual add after o_proj and down_proj)
  kSiluMul,  // outs[0] gate, outs[1] up, rows equal: outs[0].y = silu(Wg x + bg) * (Wu x + bu)
  kRopeKV,   // outs q, k, v (whole heads): as kStore, then q and k rotated (GemvRope) and the
             // rotated k and v written to the cache at the position
};

// The rotary embedding and the KV-cache write that kRopeKV folds into the q/k/v projection: a
// block owns pairs of rows (j, j + D/2) of a head, so it can rotate them. As RopeKVWrite
// (kernels.h) does, bit for bit.
struct GemvRope {
  const float* inv_freq = nullptr;  // [head_dim / 2], device
  float scaling = 1.f;
  int64_t pos0 = 0;               // the token's position, or
  const int64_t* dpos = nullptr;  // (device, read when the kernel runs) a recorded step's
  int64_t head_dim = 0;
  // The layer's cache: arenas [slot][kv_head][block_size][head_dim] of kv_dtype, block table.
  const int32_t* table = nullptr;
  void* k_arena = nullptr;
  void* v_arena = nullptr;
  DType kv_dtype = DType::kBF16;
  int64_t block_size = 0, kv_heads = 0;
};

constexpr int kMaxGemvOuts = 3;
// The most tokens (rows of x) one Gemv takes. Each group of up to 8 tokens reads the weights
// again (through L2 when the groups run together); past this, cuBLAS's GEMM reads them once.
constexpr int64_t kGemvMaxTokens = 64;

// Whether Gemv serves a product of T tokens with weights of wtype, K columns, at w (16-byte
// aligned rows: K % 8 == 0 and w 16-byte aligned); otherwise the caller uses cuBLAS.
bool GemvSupported(int64_t T, DType wtype, int64_t K, const void* w);

// How a launch cuts the work: weight rows per block of 128 threads, and 16-byte loads per row
// each thread keeps in flight. kGemvTilings lists the compiled ones; DefaultGemvTiling picks by
// the shape (bench_cuda's gemv sweep measures them all: bench/RESULTS.md).
struct GemvTiling {
  int rows, unroll;
};
extern const GemvTiling kGemvTilings[5];
GemvTiling DefaultGemvTiling(int64_t rows, int64_t K);
// Whether kRopeKV serves outputs of these rows (whole heads of an even head_dim).
bool GemvRopeSupported(int64_t head_dim, int64_t q_rows, int64_t k_rows, int64_t v_rows);

// x: [T, K] f32 device, row-major (each row normalised by `norm` first, when given); outs[n] as
// above with y [T, rows] row-major, every w of type wtype and GemvSupported. Launches one kernel
// on `stream`, cut as `tiling` says (nullptr: the default for the shape; T > 1 has tilings of
// its own). rope: kRopeKV's (required there, T = 1 only; ignored otherwise). Each token's
// outputs are bit for bit those of a call with that token alone (of the same kernel).
// tensor_cores (bf16 weights; kStore, kAdd, kSiluMul): the tensor-core kernel (gemv_tc.cu),
// which reads the weights once for up to 64 tokens: on the H200, 1.4x slower than the CUDA-core
// kernel for one token, 1.25x-1.6x faster for 8-64 (bench/RESULTS.md). Its sums differ from the
// CUDA-core kernel's in rounding (x split into bf16 hi + lo; ~2^-17 relative per product).
void Gemv(const float* x, int64_t T, int64_t K, const GemvNorm& norm, DType wtype,
          const GemvOut* outs, int n, GemvEpilogue e, cudaStream_t stream,
          const GemvTiling* tiling = nullptr, const GemvRope* rope = nullptr,
          bool tensor_cores = false);

}  // namespace needle::cuda
