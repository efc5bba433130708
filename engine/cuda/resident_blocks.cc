#include "engine/cuda/resident_blocks.h"

#include <algorithm>

#include "engine/base/error.h"

namespace needle {

ResidentBlocks::ResidentBlocks(int64_t layers, int64_t kv_heads, int64_t slots)
    : layers_(std::max<int64_t>(0, layers)), kv_heads_(kv_heads), slots_(slots) {
  NEEDLE_CHECK(slots < (int64_t{1} << 24));  // (Fill's ordering keys hold a slot in 24 bits)
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
  std::fill(where_.begin(), where_.end(), -1);
}

void ResidentBlocks::Hold(int64_t layer, int64_t head, int64_t slot, int32_t block) {
  NEEDLE_CHECK(block >= -1);
  if (block >= blocks_) {  // (rows of the new width, each row's entries copied)
    int64_t grown = std::max<int64_t>(64, blocks_);
    while (grown <= block) grown *= 2;
    std::vector<int32_t> w(static_cast<size_t>(layers_ * kv_heads_ * grown), -1);
    for (int64_t r = 0; r < layers_ * kv_heads_; ++r)
      std::copy_n(where_.begin() + r * blocks_, blocks_, w.begin() + r * grown);
    where_.swap(w);
    blocks_ = grown;
  }
  int32_t& at = held_[Index(layer, head, slot)];
  const size_t row = static_cast<size_t>((layer * kv_heads_ + head) * blocks_);
  if (at >= 0) where_[row + static_cast<size_t>(at)] = -1;
  at = block;
  if (block >= 0) where_[row + static_cast<size_t>(block)] = static_cast<int32_t>(slot);
}

int64_t ResidentBlocks::Place(int64_t layer, const std::vector<std::vector<int32_t>>& blocks,
                              const std::vector<std::vector<int32_t>>& retained, int64_t n_g,
                              std::vector<Copy>* copies, int64_t n_max, int64_t take_rest) {
  copies->clear();
  NEEDLE_CHECK(n_g >= 0 && n_g <= slots_ && static_cast<int64_t>(blocks.size()) == kv_heads_);
  if (n_g == 0) return 0;
  const int64_t now = ++calls_[static_cast<size_t>(layer)];
  n_max = std::min(std::max(n_max, n_g), slots_);
  order_.resize(static_cast<size_t>(kv_heads_));
  slot_of_.resize(static_cast<size_t>(kv_heads_));
  held_n_.assign(static_cast<size_t>(kv_heads_), 0);
  int64_t held_min = n_max;
  for (int64_t h = 0; h < kv_heads_; ++h) {
    const std::vector<int32_t>& sel = blocks[h];
    NEEDLE_CHECK(static_cast<int64_t>(sel.size()) >= n_g);
    n_max = std::min(n_max, static_cast<int64_t>(sel.size()));
    const auto selected = [&](int32_t b) {
      return std::find(sel.begin(), sel.end(), b) != sel.end();
    };
    // The order: the selected retained blocks, then the rest of the selection.
    std::vector<int32_t>& order = order_[static_cast<size_t>(h)];
    order.clear();
    if (h < static_cast<int64_t>(retained.size()))
      for (int32_t b : retained[h])
        if (selected(b)) order.push_back(b);
    const auto n_ret = static_cast<std::ptrdiff_t>(order.size());
    for (int32_t b : sel)
      if (std::find(order.begin(), order.begin() + n_ret, b) == order.begin() + n_ret)
        order.push_back(b);
    // Each one's slot, -1 where the GPU does not hold it.
    std::vector<int32_t>& slot_of = slot_of_[static_cast<size_t>(h)];
    slot_of.assign(order.size(), -1);
    for (size_t i = 0; i < order.size(); ++i) {
      slot_of[i] = SlotOf(layer, h, order[i]);
      if (slot_of[i] >= 0) ++held_n_[static_cast<size_t>(h)];
    }
    held_min = std::min(held_min, held_n_[static_cast<size_t>(h)]);
  }
  int64_t n = std::max(n_g, std::min(held_min, n_max));
  if (take_rest > 0 && n < n_max) {
    bool all = true;
    for (int64_t h = 0; h < kv_heads_ && all; ++h)
      all = static_cast<int64_t>(blocks[h].size()) == n_max &&
            n_max - held_n_[static_cast<size_t>(h)] <= take_rest;
    if (all) n = n_max;
  }
  for (int64_t h = 0; h < kv_heads_; ++h) {
    const std::vector<int32_t>& order = order_[static_cast<size_t>(h)];
    const std::vector<int32_t>& slot_of = slot_of_[static_cast<size_t>(h)];
    int32_t* held = held_.data() + Index(layer, h, 0);
    int64_t* used = used_.data() + Index(layer, h, 0);
    int32_t* view = view_.data() + Index(layer, h, 0);
    taken_.assign(static_cast<size_t>(slots_), 0);
    int64_t got = 0;
    for (size_t i = 0; i < order.size() && got < n; ++i)  // held: attended where they lie
      if (slot_of[i] >= 0) {
        view[got++] = slot_of[i];
        taken_[static_cast<size_t>(slot_of[i])] = 1;
      }
    for (size_t i = 0; i < order.size() && got < n; ++i) {  // new: read from the host
      if (slot_of[i] >= 0) continue;
      const int64_t to = SlotToTake(held, used);
      NEEDLE_CHECK(to >= 0);  // (n <= slots: a slot this step does not attend is left)
      const int32_t evicted = held[to];
      Hold(layer, h, to, order[i]);
      taken_[static_cast<size_t>(to)] = 1;
      view[got++] = static_cast<int32_t>(to);
      copies->push_back({order[i], static_cast<int32_t>(h), static_cast<int32_t>(to), evicted});
    }
    for (int64_t j = 0; j < n; ++j) used[view[j]] = now;
  }
  return n;
}

const std::vector<int64_t>& ResidentBlocks::Attend(
    int64_t layer, const std::vector<std::vector<int32_t>>& blocks) {
  NEEDLE_CHECK(static_cast<int64_t>(blocks.size()) == kv_heads_);
  const int64_t now = ++calls_[static_cast<size_t>(layer)];
  std::vector<int64_t>& n = attended_;
  n.assign(static_cast<size_t>(kv_heads_), 0);
  for (int64_t h = 0; h < kv_heads_; ++h) {
    int64_t* used = used_.data() + Index(layer, h, 0);
    int32_t* view = view_.data() + Index(layer, h, 0);
    int64_t& got = n[static_cast<size_t>(h)];
    for (int32_t b : blocks[h]) {
      const int32_t s = SlotOf(layer, h, b);
      if (s < 0) continue;
      used[s] = now;
      view[got++] = s;
    }
  }
  return n;
}

int64_t ResidentBlocks::SlotToTake(const int32_t* held, const int64_t* used) const {
  int64_t to = -1;
  for (int64_t s = 0; s < slots_; ++s) {
    if (taken_[static_cast<size_t>(s)] != 0) continue;
    if (held[s] < 0) return s;
    if (to < 0 || used[s] < used[to]) to = s;
  }
  return to;
}

void ResidentBlocks::Fill(int64_t layer, const std::vector<std::vector<int32_t>>& blocks,
                          int64_t most, std::vector<Copy>* copies) {
  copies->clear();
  const int64_t now = calls_[static_cast<size_t>(layer)];
  if (now == 0) return;  // (no step placed yet)
  for (size_t h = 0; h < blocks.size() && static_cast<int64_t>(h) < kv_heads_; ++h) {
    const auto hh = static_cast<int64_t>(h);
    const int32_t* held = held_.data() + Index(layer, hh, 0);
    int64_t* used = used_.data() + Index(layer, hh, 0);
    // Slots not to take: attended (or filled) at this step, or holding one of the blocks.
    taken_.assign(static_cast<size_t>(slots_), 0);
    for (int64_t s = 0; s < slots_; ++s) taken_[static_cast<size_t>(s)] = used[s] == now;
    int64_t need = 0;
    for (int32_t b : blocks[h]) {
      const int32_t s = SlotOf(layer, hh, b);
      if (s >= 0)
        taken_[static_cast<size_t>(s)] = 1;
      else
        ++need;
    }
    need = std::min(need, most);
    if (need <= 0) continue;
    // The slots SlotToTake would give one after another: the empty ones in slot order, then
    // the others attended least recently first (ties in slot order). As keys: slot | used << 24
    // | 1 << 63 for a held slot (used: a count of steps; slots < 2^24).
    cand_.clear();
    for (int64_t s = 0; s < slots_; ++s)
      if (taken_[static_cast<size_t>(s)] == 0)
        cand_.push_back(held[s] < 0 ? static_cast<uint64_t>(s)
                                    : static_cast<uint64_t>(s) |
                                          (static_cast<uint64_t>(used[s]) << 24) | (1ull << 63));
    const auto k = static_cast<std::ptrdiff_t>(std::min<size_t>(cand_.size(), need));
    std::partial_sort(cand_.begin(), cand_.begin() + k, cand_.end());
    int64_t n = 0;
    for (int32_t b : blocks[h]) {
      if (n >= k) break;
      if (SlotOf(layer, hh, b) >= 0) continue;
      const auto to = static_cast<int32_t>(cand_[static_cast<size_t>(n)] & 0xffffff);
      const int32_t evicted = held[to];
      Hold(layer, hh, to, b);
      used[to] = now;
      copies->push_back({b, static_cast<int32_t>(h), to, evicted});
      ++n;
    }
  }
}

}  // namespace needle
