// Flash-decoding for one query token over a 16-bit block KV cache (head_dim 64 or 128, at most 8
// query heads per KV head): the keys of each KV head are split across thread blocks, each block
// streams its keys straight from global memory into registers, and the last block of a KV head
// to finish merges the heads' partial results (no second launch). Called by Attention
// (attention.h) for T == 1. On compute capability 9.0 and later the TMA kernel
// (attention_decode_tma.h) takes the cases it supports; NEEDLE_CUDA_ATTN_DECODE=simt keeps
// this one.
#pragma once

#include <cuda_runtime.h>

#include "engine/cuda/attention_params.h"
#include "engine/cuda/device_buffer.h"

namespace needle::cuda {

// What split attention needs between calls: the partial results, and one arrival counter per KV
// head that the merging block returns to zero (so it is zeroed once, when it is allocated).
struct AttnWorkspace {
  GrowBuffer partials{"attention partials"};
  GrowBuffer counters{"attention split counters"};
};

// Sets p.splits and, with more than one split, points p.out / p.m / p.l at the partials in
// ws: [splits][T * heads][D], then m and l [splits][T * heads]. The layout every split kernel
// writes and every merge reads.
inline void UsePartials(AttnParams& p, int64_t splits, AttnWorkspace& ws) {
  p.splits = static_cast<int>(splits);
  if (splits == 1) return;
  const int64_t rows = p.T * p.heads;
  float* buf = ws.partials.Get<float>(static_cast<size_t>(splits * rows * (p.D + 2)));
  p.out = buf;
  p.m = buf + splits * rows * p.D;
  p.l = p.m + splits * rows;
}

// True when p (T == 1; p.out / p.m as MakeAttnParams set them: out [heads, D], lse [heads] or
// nullptr) is a case of the decode kernel, which then has been launched on `stream`. With
// p.dpos set only the TMA kernel (attention_decode_tma.h) qualifies.
// sm_count: the device's multiprocessors (the key split fills them).
bool DecodeAttention(AttnParams p, int sm_count, AttnWorkspace& ws, cudaStream_t stream);

// Whether the TMA decode kernel may take decode calls: false with NEEDLE_CUDA_ATTN_DECODE=simt
// (comparisons and tests; read per call, so that a test can switch it).
bool TmaDecodeChosen();

}  // namespace needle::cuda
