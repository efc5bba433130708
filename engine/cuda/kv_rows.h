// One token's key and value rows between a KV cache on the GPU and page-locked host memory, in
// the block layout of kvcache/: the hybrid engine's decode step sends the new token's rows of a
// sparse layer from the GPU's ring to the host cache through pinned memory (a copy into the
// pageable cache itself would block the host until the GPU got there).
//   pin: [2][kv_heads][head_dim] elements of the caches' type, K rows then V rows.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "kvcache/kv_cache.h"

namespace needle {

// Bytes of `pin` for a cache of this shape.
size_t KVRowBytes(const KVCacheShape& s);
// Queues the copy of token p's rows of `layer` of the device cache into pin (its block must be
// assigned; the host reads the block table).
void QueueRowToPinned(const KVCache& device, int64_t layer, int64_t p, uint8_t* pin,
                      cudaStream_t stream);
// Queues the copy of several tokens' rows, rows [n] = (layer, position), of the device cache into
// pin [n][KVRowBytes] in order: one gather kernel into staging (device, as many bytes) and one
// copy (a step's rows of every layer; two copies a row cost ~5 us each of the GPU's time).
void QueueRowsToPinned(const KVCache& device, const std::vector<std::pair<int64_t, int64_t>>& rows,
                       uint8_t* staging, uint8_t* pin, cudaStream_t stream);
// Copies the rows from pin into token p of `layer` of the host cache (its block assigned), once
// the queued copy is waited for.
void RowFromPinned(const uint8_t* pin, KVCache& host, int64_t layer, int64_t p);

}  // namespace needle
