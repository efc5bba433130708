#include "engine/cuda/resident_blocks.h"

#include <algorithm>

#include "engine/base/error.h"

namespace needle {

ResidentBlocks::ResidentBlocks(int64_t layers, int64_t kv_heads, int64_t slots)
    : kv_heads_(kv_heads), slots_(slots) {
  const auto n = static_cast<size_t>(std::max<int64_t>(0, layers * kv_heads * slots));
  held_.assign(n, -1);
  used_.assign(n, 0);
  view_.assign(n, -1);
  calls_.assign(static_cast<size_t>(std::max<int64_t>(0, layers)), 0);
}

void ResidentBlocks::Clear() {
  std::fill(held_.begin(), held_.end(), -1);
  std::fill(used_.begin(), used_.end(), 0);
  std::fill(view_.begin(), view_.end(), -1);
}

void ResidentBlocks::Place(int64_t layer, const std::vector<std::vector<int32_t>>& blocks,
                           const std::vector<std::vector<int32_t>>& retained, int64_t n_g,
                           std::vector<Copy>* copies) {
  copies->clear();
  NEEDLE_CHECK(n_g >= 0 && n_g <= slots_ && static_cast<int64_t>(blocks.size()) == kv_heads_);
  if (n_g == 0) return;
  const int64_t now = ++calls_[static_cast<size_t>(layer)];
  for (int64_t h = 0; h < kv_heads_; ++h) {
    const std::vector<int32_t>& sel = blocks[h];
    NEEDLE_CHECK(static_cast<int64_t>(sel.size()) >= n_g);
    int32_t* held = held_.data() + Index(layer, h, 0);
    int64_t* used = used_.data() + Index(layer, h, 0);
    int32_t* view = view_.data() + Index(layer, h, 0);
    const auto selected = [&](int32_t b) {
      return std::find(sel.begin(), sel.end(), b) != sel.end();
    };
    // The order: the selected retained blocks, then the rest of the selection.
    order_.clear();
    if (h < static_cast<int64_t>(retained.size()))
      for (int32_t b : retained[h])
        if (selected(b)) order_.push_back(b);
    const size_t n_ret = order_.size();
    for (int32_t b : sel)
      if (std::find(order_.begin(), order_.begin() + static_cast<std::ptrdiff_t>(n_ret), b) ==
          order_.begin() + static_cast<std::ptrdiff_t>(n_ret))
        order_.push_back(b);
    // Each one's slot, -1 where the GPU does not hold it.
    slot_of_.assign(order_.size(), -1);
    for (int64_t s = 0; s < slots_; ++s) {
      if (held[s] < 0) continue;
      const auto it = std::find(order_.begin(), order_.end(), held[s]);
      if (it != order_.end())
        slot_of_[static_cast<size_t>(it - order_.begin())] = static_cast<int32_t>(s);
    }
    taken_.assign(static_cast<size_t>(slots_), 0);
    int64_t got = 0;
    for (size_t i = 0; i < order_.size() && got < n_g; ++i)  // held: attended where they lie
      if (slot_of_[i] >= 0) {
        view[got++] = slot_of_[i];
        taken_[static_cast<size_t>(slot_of_[i])] = 1;
      }
    for (size_t i = 0; i < order_.size() && got < n_g; ++i) {  // new: read from the host
      if (slot_of_[i] >= 0) continue;
      int64_t to = -1;
      for (int64_t s = 0; s < slots_; ++s) {
        if (taken_[static_cast<size_t>(s)] != 0) continue;
        if (held[s] < 0) {
          to = s;
          break;
        }
        if (to < 0 || used[s] < used[to]) to = s;
      }
      NEEDLE_CHECK(to >= 0);  // (n_g <= slots: a slot this step does not attend is left)
      held[to] = order_[i];
      taken_[static_cast<size_t>(to)] = 1;
      view[got++] = static_cast<int32_t>(to);
      copies->push_back({order_[i], static_cast<int32_t>(h), static_cast<int32_t>(to)});
    }
    for (int64_t j = 0; j < n_g; ++j) used[view[j]] = now;
  }
}

}  // namespace needle
