#include "engine/cuda/resident_blocks.h"

#include <algorithm>

#include "engine/base/error.h"

namespace needle {

ResidentBlocks::ResidentBlocks(int64_t layers, int64_t kv_heads, int64_t slots)
    : kv_heads_(kv_heads),
      slots_(slots),
      held_(static_cast<size_t>(std::max<int64_t>(0, layers * kv_heads * slots)), -1) {}

void ResidentBlocks::Clear() { std::fill(held_.begin(), held_.end(), -1); }

void ResidentBlocks::ClearLayer(int64_t layer) {
  const auto per = static_cast<size_t>(kv_heads_ * slots_);
  std::fill_n(held_.begin() + static_cast<std::ptrdiff_t>(per * static_cast<size_t>(layer)), per,
              -1);
}

void ResidentBlocks::Place(int64_t layer, const std::vector<std::vector<int32_t>>& blocks,
                           const std::vector<std::vector<int32_t>>& retained, int64_t n_g,
                           std::vector<Copy>* copies) {
  copies->clear();
  NEEDLE_CHECK(n_g >= 0 && n_g <= slots_ && static_cast<int64_t>(blocks.size()) == kv_heads_);
  if (n_g == 0) return;
  std::vector<char> placed;
  std::vector<int32_t> free_slots;
  for (int64_t h = 0; h < kv_heads_; ++h) {
    const std::vector<int32_t>& sel = blocks[h];
    NEEDLE_CHECK(static_cast<int64_t>(sel.size()) >= n_g);
    int32_t* held = held_.data() + (layer * kv_heads_ + h) * slots_;
    placed.assign(sel.size(), 0);
    const auto index_of = [&](int32_t b) {  // in sel, or -1
      const auto it = std::find(sel.begin(), sel.end(), b);
      return it == sel.end() ? int64_t{-1} : static_cast<int64_t>(it - sel.begin());
    };
    // Selected blocks already in [0, n_g) stay; the other slots there are free.
    free_slots.clear();
    for (int64_t j = 0; j < n_g; ++j) {
      const int64_t i = held[j] >= 0 ? index_of(held[j]) : -1;
      if (i >= 0 && placed[i] == 0)
        placed[i] = 1;
      else
        free_slots.push_back(static_cast<int32_t>(j));
    }
    size_t f = 0;
    // Selected blocks in later slots move in (read from there: no copy writes beyond n_g).
    for (int64_t j = n_g; j < slots_ && f < free_slots.size(); ++j) {
      const int64_t i = held[j] >= 0 ? index_of(held[j]) : -1;
      if (i < 0 || placed[i] != 0) continue;
      placed[i] = 1;
      const int32_t to = free_slots[f++];
      copies->push_back({held[j], static_cast<int32_t>(h), static_cast<int32_t>(j), to});
      held[to] = held[j];
      held[j] = -1;  // (its bytes stay, but one slot per block is enough)
    }
    // Blocks new to the GPU, from the host: retained ones first.
    const auto from_host = [&](int64_t i) {
      if (f >= free_slots.size() || placed[i] != 0) return;
      placed[i] = 1;
      const int32_t to = free_slots[f++];
      copies->push_back({sel[i], static_cast<int32_t>(h), -1, to});
      held[to] = sel[i];
    };
    if (h < static_cast<int64_t>(retained.size()))
      for (int32_t b : retained[h]) {
        const int64_t i = index_of(b);
        if (i >= 0) from_host(i);
      }
    for (size_t i = 0; i < sel.size(); ++i) from_host(static_cast<int64_t>(i));
  }
}

}  // namespace needle
