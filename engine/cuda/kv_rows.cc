#include "engine/cuda/kv_rows.h"

#include <algorithm>
#include <cstring>

#include "engine/base/error.h"
#include "engine/cuda/context_gather.h"
#include "engine/cuda/cuda_check.h"

namespace needle {

namespace {
// A token's row of one KV head: width bytes at offset off within the head's block, pitch bytes
// from one head's block to the next.
struct RowGeometry {
  size_t width, pitch, off, heads;
};
RowGeometry Geometry(const KVCacheShape& s, int64_t p) {
  const size_t es = DTypeSize(s.dtype), width = static_cast<size_t>(s.head_dim) * es;
  return {width, static_cast<size_t>(s.block_size) * width,
          static_cast<size_t>(p % s.block_size) * width, static_cast<size_t>(s.kv_heads)};
}
}  // namespace

size_t KVRowBytes(const KVCacheShape& s) {
  return 2 * static_cast<size_t>(s.kv_heads * s.head_dim) * DTypeSize(s.dtype);
}

void QueueRowToPinned(const KVCache& device, int64_t layer, int64_t p, uint8_t* pin,
                      cudaStream_t stream) {
  const RowGeometry g = Geometry(device.shape(), p);
  const int32_t slot = device.SlotOf(layer, p / device.shape().block_size);
  NEEDLE_CHECK(slot >= 0);
  for (int v : {0, 1})
    NEEDLE_CUDA_CHECK(cudaMemcpy2DAsync(pin + static_cast<size_t>(v) * g.heads * g.width, g.width,
                                        device.BlockData(layer, v != 0, slot) + g.off, g.pitch,
                                        g.width, g.heads, cudaMemcpyDeviceToHost, stream));
}

void QueueRowsToPinned(const KVCache& device, const std::vector<std::pair<int64_t, int64_t>>& rows,
                       uint8_t* staging, uint8_t* pin, cudaStream_t stream) {
  if (rows.empty()) return;
  const KVCacheShape& s = device.shape();
  const RowGeometry g = Geometry(s, 0);
  for (size_t i0 = 0; i0 < rows.size(); i0 += cuda::kMaxRowCopies) {
    cuda::RowCopies c;
    c.n = static_cast<int>(std::min<size_t>(cuda::kMaxRowCopies, rows.size() - i0));
    for (int i = 0; i < c.n; ++i) {
      const auto& [layer, p] = rows[i0 + static_cast<size_t>(i)];
      const int32_t slot = device.SlotOf(layer, p / s.block_size);
      NEEDLE_CHECK(slot >= 0);
      const size_t off = static_cast<size_t>(p % s.block_size) * g.width;
      c.src[2 * i] = device.BlockData(layer, false, slot) + off;
      c.src[2 * i + 1] = device.BlockData(layer, true, slot) + off;
    }
    cuda::GatherRows(c, g.width, g.pitch, static_cast<int64_t>(g.heads),
                     staging + i0 * KVRowBytes(s), stream);
  }
  NEEDLE_CUDA_CHECK(
      cudaMemcpyAsync(pin, staging, rows.size() * KVRowBytes(s), cudaMemcpyDeviceToHost, stream));
}

void RowFromPinned(const uint8_t* pin, KVCache& host, int64_t layer, int64_t p) {
  const RowGeometry g = Geometry(host.shape(), p);
  const int32_t slot = host.SlotOf(layer, p / host.shape().block_size);
  NEEDLE_CHECK(slot >= 0);
  for (int v : {0, 1})
    for (size_t h = 0; h < g.heads; ++h)
      std::memcpy(host.BlockData(layer, v != 0, slot) + g.off + h * g.pitch,
                  pin + (static_cast<size_t>(v) * g.heads + h) * g.width, g.width);
}

}  // namespace needle
