#include "engine/cuda/chunk_layout.h"

#include <algorithm>

#include "engine/base/error.h"
#include "sparse_attn/plan.h"

namespace needle {

void LayoutChunk(const PlanExecutor::Chunk& ch, int64_t c0, int64_t T, int64_t B, int64_t kv_heads,
                 int64_t head_dim, const std::function<int32_t(int64_t)>& slot_of, int64_t x0,
                 ChunkLayout* out) {
  const auto& sel = *ch.blocks;
  const int64_t ie = ch.init_end, lb = ch.local_begin, ib = ie / B, last = (c0 + T - 1) / B;
  const int64_t k = sel.empty() ? 0 : static_cast<int64_t>(sel[0].size());
  for (const auto& hb : sel)
    NEEDLE_CHECK(static_cast<int64_t>(hb.size()) == k);  // (RankCandidates: min(topk, n) each)
  NEEDLE_CHECK(ie % B == 0 && lb % B == 0 && lb >= ie && (c0 >= lb || (lb == ie && k == 0)));
  out->table.clear(), out->src.clear(), out->dst.clear(), out->rot.clear();
  out->rot_table.clear();
  std::map<int64_t, int32_t> rows;  // -delta -> rotation row
  // The keys turn the other way from the CPU's query: a span's delta is a rotation by -delta.
  const auto row_of = [&](int64_t delta) -> int32_t {
    if (ch.inv_freq == nullptr || delta == 0) return -1;
    return SharedRotationRow(-delta, ch.inv_freq, head_dim, &out->rot_table, &rows);
  };
  // Copies view block j's head blocks (srcs[h] -> extra slot x0 + j of head h), rotated by delta.
  const auto copy = [&](int64_t j, const std::vector<int32_t>& srcs, int64_t delta) {
    const int32_t r = row_of(delta), to = static_cast<int32_t>(x0 + j);
    for (int64_t h = 0; h < kv_heads; ++h) {
      out->src.push_back(srcs[h] * static_cast<int32_t>(kv_heads) + static_cast<int32_t>(h));
      out->dst.push_back(to * static_cast<int32_t>(kv_heads) + static_cast<int32_t>(h));
      out->rot.push_back(r);
    }
    out->table.push_back(to);
  };
  std::vector<int32_t> srcs(static_cast<size_t>(kv_heads));
  // Initial (a chunk inside it sees part of it): moved by the remap's offset p' - p.
  const int64_t off = ie + k * B - lb;
  for (int64_t j = 0; j < std::min(ib, last + 1); ++j) {
    const int32_t s = slot_of(j);
    NEEDLE_CHECK(s >= 0);
    if (row_of(off) < 0) {
      out->table.push_back(s);
      continue;
    }
    std::fill(srcs.begin(), srcs.end(), s);
    copy(static_cast<int64_t>(out->table.size()), srcs, off);
  }
  for (int64_t i = 0; i < k; ++i) {
    bool same = true;
    for (int64_t h = 0; h < kv_heads; ++h) {
      srcs[h] = slot_of(sel[h][i]);
      NEEDLE_CHECK(srcs[h] >= 0);
      same = same && sel[h][i] == sel[0][i];
    }
    const int64_t delta = RemapBlockDelta(ie, k, B, lb, i, int64_t{sel[0][i]} * B);
    if (same && row_of(delta) < 0) {
      out->table.push_back(srcs[0]);
      continue;
    }
    // (Heads that differ move by their own block's delta.)
    const int64_t j = static_cast<int64_t>(out->table.size());
    if (same) {
      copy(j, srcs, delta);
      continue;
    }
    const int32_t to = static_cast<int32_t>(x0 + j);
    for (int64_t h = 0; h < kv_heads; ++h) {
      out->src.push_back(srcs[h] * static_cast<int32_t>(kv_heads) + static_cast<int32_t>(h));
      out->dst.push_back(to * static_cast<int32_t>(kv_heads) + static_cast<int32_t>(h));
      out->rot.push_back(row_of(RemapBlockDelta(ie, k, B, lb, i, int64_t{sel[h][i]} * B)));
    }
    out->table.push_back(to);
  }
  // Local and the chunk, where they are (a query inside Initial: nothing more).
  for (int64_t b = std::max(lb, ie) / B; b <= last; ++b) {
    const int32_t s = slot_of(b);
    NEEDLE_CHECK(s >= 0);
    out->table.push_back(s);
  }
  out->pos0 = c0 - (lb - ie - k * B);
}

}  // namespace needle
