#include "sparse_attn/representatives.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>

#include "engine/base/error.h"
#include "engine/cpu/ops.h"

namespace needle {

RepresentativeStore::RepresentativeStore(int64_t layers, int64_t kv_heads, int64_t head_dim,
                                         int64_t max_blocks, ReprType type, DType storage)
    : kv_heads_(kv_heads),
      head_dim_(head_dim),
      max_blocks_(max_blocks),
      rows_(type == ReprType::kQuest ? 2 : 1),
      type_(type),
      storage_(storage) {
  NEEDLE_CHECK(storage == DType::kF32 || storage == DType::kBF16);
  const size_t per_block = static_cast<size_t>(kv_heads * rows_ * head_dim) * DTypeSize(storage);
  data_.assign(static_cast<size_t>(layers),
               std::vector<uint8_t>(per_block * static_cast<size_t>(max_blocks)));
  ready_.assign(static_cast<size_t>(layers),
                std::vector<uint8_t>(static_cast<size_t>(max_blocks), 0));
  stamp_.assign(static_cast<size_t>(layers),
                std::vector<uint32_t>(static_cast<size_t>(max_blocks), 0));
  version_ = std::make_unique<std::atomic<uint64_t>[]>(static_cast<size_t>(layers));
  for (int64_t l = 0; l < layers; ++l) version_[l].store(0);
}

void RepresentativeStore::Invalidate(int64_t layer, int64_t from_block) {
  for (int64_t b = from_block; b < max_blocks_; ++b) ready_[layer][b] = 0;
  version_[layer].fetch_add(1, std::memory_order_relaxed);
}

const void* RepresentativeStore::Block(int64_t layer, int64_t block) const {
  const size_t per_block = static_cast<size_t>(kv_heads_ * rows_ * head_dim_) * DTypeSize(storage_);
  return data_[layer].data() + per_block * static_cast<size_t>(block);
}

void RepresentativeStore::Store(int64_t layer, int64_t block, int64_t h, int64_t r,
                                const float* v) {
  void* dst = const_cast<void*>(Block(layer, block));
  const size_t base = static_cast<size_t>((h * rows_ + r) * head_dim_);
  for (int64_t d = 0; d < head_dim_; ++d) StoreFromF32(storage_, dst, base + d, v[d]);
}

void RepresentativeStore::ComputeFromKeys(int64_t layer, int64_t block, const KVLayerView& kv,
                                          const float* relative_freq) {
  NEEDLE_CHECK(type_ != ReprType::kDynamic);
  const int64_t B = kv.block_size, D = head_dim_;
  std::vector<float> rows(static_cast<size_t>(B * D)), a(D), b(D), back;
  if (relative_freq != nullptr) {
    back.resize(static_cast<size_t>(D));
    RotationRow(-block * B, relative_freq, D, back.data());
  }
  for (int64_t h = 0; h < kv_heads_; ++h) {
    fast::KVRowsToF32(kv, false, h, block * B, (block + 1) * B, rows.data());
    if (relative_freq != nullptr) RotateRows(rows.data(), B, D, back.data(), rows.data());
    switch (type_) {
      case ReprType::kMax:
      case ReprType::kQuest:
        std::fill(a.begin(), a.end(), -std::numeric_limits<float>::infinity());
        std::fill(b.begin(), b.end(), std::numeric_limits<float>::infinity());
        for (int64_t j = 0; j < B; ++j)
          for (int64_t d = 0; d < D; ++d) {
            a[d] = std::max(a[d], rows[j * D + d]);
            b[d] = std::min(b[d], rows[j * D + d]);
          }
        Store(layer, block, h, 0, a.data());
        if (type_ == ReprType::kQuest) Store(layer, block, h, 1, b.data());
        break;
      default:  // mean
        std::fill(a.begin(), a.end(), 0.0f);
        for (int64_t j = 0; j < B; ++j)
          for (int64_t d = 0; d < D; ++d) a[d] += rows[j * D + d];
        for (auto& x : a) x /= static_cast<float>(B);
        Store(layer, block, h, 0, a.data());
        break;
    }
  }
  ready_[layer][block] = 1;
  ++stamp_[layer][block];
  version_[layer].fetch_add(1, std::memory_order_relaxed);
}

void RepresentativeStore::CopyBlock(const RepresentativeStore& from, int64_t layer,
                                    int64_t from_block, int64_t block) {
  NEEDLE_CHECK(SameKind(from) && from.ready(layer, from_block) && block < max_blocks_);
  std::memcpy(const_cast<void*>(Block(layer, block)), from.Block(layer, from_block), BlockBytes());
  ready_[layer][block] = 1;
  ++stamp_[layer][block];
  version_[layer].fetch_add(1, std::memory_order_relaxed);
}

std::vector<uint8_t> RepresentativeStore::SaveBlocks(int64_t blocks) const {
  NEEDLE_CHECK(blocks >= 0 && blocks <= max_blocks_);
  const size_t bb = BlockBytes();
  std::vector<uint8_t> out;
  out.reserve(static_cast<size_t>(layers() * blocks) * (bb + 1));
  for (int64_t l = 0; l < layers(); ++l)
    for (int64_t b = 0; b < blocks; ++b) {
      out.push_back(ready_[l][b]);
      const auto* p = static_cast<const uint8_t*>(Block(l, b));
      out.insert(out.end(), p, p + bb);
    }
  return out;
}

void RepresentativeStore::LoadBlocks(const std::vector<uint8_t>& bytes, int64_t blocks,
                                     const std::string& what) {
  const size_t bb = BlockBytes();
  if (blocks < 0 || blocks > max_blocks_ ||
      bytes.size() != static_cast<size_t>(layers() * blocks) * (bb + 1))
    Fail(what, ": ", bytes.size(), " bytes of representatives; ", blocks, " blocks of ", layers(),
         " layers take ", static_cast<size_t>(layers() * blocks) * (bb + 1));
  const uint8_t* p = bytes.data();
  for (int64_t l = 0; l < layers(); ++l) {
    for (int64_t b = 0; b < blocks; ++b, p += bb + 1) {
      if (p[0] == 0) continue;
      std::memcpy(const_cast<void*>(Block(l, b)), p + 1, bb);
      ready_[l][b] = 1;
      ++stamp_[l][b];
    }
    version_[l].fetch_add(1, std::memory_order_relaxed);
  }
}

void RepresentativeStore::ComputeDynamic(int64_t layer, int64_t block, const KVLayerView& kv,
                                         const float* votes, int64_t repr_count) {
  NEEDLE_CHECK(type_ == ReprType::kDynamic);
  const int64_t B = kv.block_size, D = head_dim_;
  std::vector<float> rows(static_cast<size_t>(B * D)), sum(D);
  std::vector<int64_t> order(B);
  for (int64_t h = 0; h < kv_heads_; ++h) {
    fast::KVRowsToF32(kv, false, h, block * B, (block + 1) * B, rows.data());
    const float* vt = votes + h * B;
    std::iota(order.begin(), order.end(), 0);
    // Most-voted first; ties to the earlier token, so the result is deterministic.
    std::partial_sort(
        order.begin(), order.begin() + repr_count, order.end(),
        [&](int64_t x, int64_t y) { return vt[x] > vt[y] || (vt[x] == vt[y] && x < y); });
    std::fill(sum.begin(), sum.end(), 0.0f);
    for (int64_t i = 0; i < repr_count; ++i)
      for (int64_t d = 0; d < D; ++d) sum[d] += rows[order[i] * D + d];
    Store(layer, block, h, 0, sum.data());
  }
  ready_[layer][block] = 1;
  ++stamp_[layer][block];
  version_[layer].fetch_add(1, std::memory_order_relaxed);
}

}  // namespace needle
