// Attention on the GPU over the block KV cache (the layout of kvcache/kv_cache.h, in device
// memory): one tiled online-softmax kernel for prefill and decode. A thread block takes a tile of
// query positions times the query heads of one KV head (GQA without repeating K/V: the tile is
// loaded once for the whole group) and a range of keys; when there are too few such tiles to fill
// the GPU (decode, short prompts over long contexts) the keys are split across blocks
// (flash-decoding) and the partial results merged by a second kernel, with the same algebra as
// engine/attention/partial.h. Two fast paths for 16-bit caches: prompts take the tensor-core
// kernel (attention_tc.h); single-token decode with head_dim 64/128 and G <= 8 takes the
// flash-decoding kernel of attention_decode.h, which merges its own splits.
#pragma once

#include <cuda_runtime.h>

#include "engine/cpu/ops.h"
#include "engine/cuda/attention_decode.h"
#include "engine/cuda/attention_decode_tma.h"
#include "engine/cuda/device_buffer.h"
#include "kvcache/kv_cache.h"

namespace needle::cuda {

// out[T, heads, D] = softmax(scale * q k^T) v over every visible key (causal, optional sliding
// window). q: device [T, heads, D] f32; kv: a device cache view (table in device memory);
// lse (optional, device): [T, heads]. Supports head_dim <= 256 and f32/f16/bf16 caches.
// sm_count: the device's multiprocessors (to choose the key split); ws: the split partials and
// counters, reused from call to call (calls on one stream). dpos (device, optional): a recorded
// decode step's position, read when the call runs (AttnParams::dpos); returns whether the kernel
// launched reads it (false: it used a.pos0, and the launch cannot be replayed at other positions).
bool Attention(const float* q, const KVLayerView& kv, const AttnArgs& a, float* out, float* lse,
               int sm_count, AttnWorkspace& ws, cudaStream_t stream, const int64_t* dpos = nullptr);

// One decode token of each of n sequences whose caches share one arena (the Engine's batched
// step), in one launch: rows[i] (attention_decode_tma.h) is its q [heads, D], its keys
// [0, pos0] through its table (device), its out [heads, D], no lse; kv: the arena and
// shape (any row's view); a: what the rows share (heads, scale, window; a.pos0 unused). A row's
// keys are cut into splits by its own length only (TmaDecodeRowSplitOf: longer splits than
// Attention's), so it gets the same bits in any batch, a batch of one included. Returns false,
// launching nothing, where Attention would not take the TMA decode kernel for them (or n is over
// its rows per launch).
bool AttentionRows(const TmaDecodeRow* rows, int64_t n, const KVLayerView& kv, const AttnArgs& a,
                   int sm_count, AttnWorkspace& ws, cudaStream_t stream);

// One decode token (a.T == 1) as Attention computes it, and with it the softmax sums of every
// 32-key tile of the keys [key0, key_end) (multiples of 32): stats [kv_heads][(key_end - key0) /
// 32][G][2] = {m, l} (device), m a reference maximum (natural log, scale applied) and l the sum of
// exp(scale q.k - m) over the tile's keys (a block's mass is the sum of its tiles':
// plan_rules.h). Only the TMA decode kernel writes them: where it cannot take the
// call (attention_decode_tma.h), returns false and launches nothing.
bool AttentionTileStats(const float* q, const KVLayerView& kv, const AttnArgs& a, float* out,
                        float* lse, int sm_count, AttnWorkspace& ws, cudaStream_t stream,
                        int64_t key0, int64_t key_end, float* stats);

}  // namespace needle::cuda
