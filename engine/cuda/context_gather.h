// The GPU's share of the hybrid engine's Context blocks (SparseConfig::gpu_share): the blocks are
// read from the host cache (pinned and mapped, engine/cuda/pinned_host.h) over PCIe into extra
// slots of the layer's ring (KVCacheShape::extra_blocks), where the GPU attends them with the
// Initial and Local keys; BlockStats gives retention their softmax sums, as the CPU's
// AttendBlocks does for its own blocks.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "engine/base/dtype.h"

namespace needle::cuda {

// Copies n head blocks (one KV head's [block_size][head_dim] rows, head_block_bytes each, a
// multiple of 16) of K and V: item i to k_dst + dst[i] * head_block_bytes (v_dst alike), from
// k_src + src[i] * head_block_bytes (v_src alike): host memory the GPU can read (page-locked and
// mapped: the host pointer, on a GPU with cudaDevAttrCanUseHostPointerForRegisteredMem), over
// PCIe; or device memory (--kv-placement device: the layer's own ring). src and dst [n]: host
// memory the GPU can read, read when the kernel runs; k_dst, v_dst: device memory. (The copy
// engines were tried, one cudaMemcpyBatchAsync a layer: the call alone took 40-130 us of host time
// a layer, bench/RESULTS.md.)
//
// With `entries`, the same kernel also writes a block table's entries (the hybrid's per-head view
// of the ring: each KV head's Context entries, the extra slots that hold its blocks), so that a
// layer whose blocks are all held needs no copy of its own: entries.values [rows][width] (host
// memory the GPU can read, read when the kernel runs) to entries.table + r * entries.stride + i
// (device). It runs even where n is 0. max_blocks > 0: at most that many thread blocks for each
// of K and V, each taking every max_blocks-th item (a copy in the background, beside other
// kernels).
// With entries.at (host memory the GPU can read, [rows][width]): value x goes to entries.table +
// at[x] instead (scattered: the device plan of host placement's block-to-slot map, a fill's new
// blocks and the ones it evicts; stride unused).
struct TableEntries {
  const int32_t* values = nullptr;  // [rows][width], pinned
  int32_t* table = nullptr;         // device; row r at table + r * stride
  int64_t rows = 0, width = 0, stride = 0;
  const int32_t* at = nullptr;  // [rows][width], pinned, or null
};
void GatherBlocks(const uint8_t* k_src, const uint8_t* v_src, const int32_t* src,
                  const int32_t* dst, int64_t n, size_t head_block_bytes, uint8_t* k_dst,
                  uint8_t* v_dst, cudaStream_t stream, const TableEntries& entries = {},
                  int max_blocks = 0);
// Loads GatherBlocks' kernel now (CUDA loads a module's kernels at their first launch, and that
// load may wait for the whole GPU): for a thread whose first fill may come while a kernel on the
// GPU waits for that same thread (the host worker's, cuda::JoinHost).
void PreloadGatherBlocks();

// Copies the rows of up to kMaxRowCopies tokens of a device cache into dst, back to back: token
// i's K row, then its V row, each [heads][width bytes], from src[2i] and src[2i + 1] (device
// memory: a token's row of KV head 0; head h's is `pitch` bytes further).
constexpr int kMaxRowCopies = 64;
struct RowCopies {
  const uint8_t* src[2 * kMaxRowCopies];
  int n = 0;
};
void GatherRows(const RowCopies& c, size_t width, size_t pitch, int64_t heads, uint8_t* dst,
                cudaStream_t stream);

// Copies n head blocks ([block_size B][head_dim D] rows of one KV head, dtype t) within one device
// arena pair: item i from k/v + src[i] * B * D elements to k/v + dst[i] * B * D, the keys rotated
// on the way by row rot[i] of rot_table ([rows][D]: cos of the first D/2 angles, then their sin,
// as RotationRow writes them; rot[i] < 0: copied as they are), pairs (j, j + D/2) as RotateRows
// turns them. Position remapping moves keys cached at their true positions (sparse prefill on
// the GPU). No item may read a head block another writes. src, dst, rot, rot_table: device memory.
void GatherRotate(uint8_t* k, uint8_t* v, DType t, const int32_t* src, const int32_t* dst,
                  const int32_t* rot, const float* rot_table, int64_t n, int64_t B, int64_t D,
                  cudaStream_t stream);

// The softmax sums of n blocks per KV head, as AttendBlocks' stats: for block j of KV head h
// (keys k [n][kv_heads][B][D], dtype t, device; with `slots` (device), block j of head h is
// slot slots[h * slot_stride + j] of the arena k [slot][kv_heads][B][D]) and query head g of its
// group (q [kv_heads * G][D] f32, device), stats[((h * n + j) * G + g) * 2] = m (the block's
// largest scaled score) and [.. + 1] = l = sum over its keys of exp(scale * q.k - m).
void BlockStats(const float* q, const uint8_t* k, DType t, int64_t n, int64_t kv_heads, int64_t G,
                int64_t B, int64_t D, float scale, float* stats, cudaStream_t stream,
                const int32_t* slots = nullptr, int64_t slot_stride = 0);

}  // namespace needle::cuda
