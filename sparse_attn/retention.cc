// Retention (SparseConfig::retain_blocks): after a decode step, the blocks of each head's
// selection that drew the most softmax mass, each with its successor, kept for the next step's
// selection (SparseAttention::Retain); the masses come from the attention's own block sums, a
// pass of their own, or the executor's late ones (FinishLateMass).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "engine/base/seconds.h"
#include "engine/cpu/ops.h"
#include "sparse_attn/block_mass.h"
#include "sparse_attn/plan_rules.h"
#include "sparse_attn/sparse_attention.h"

namespace needle {

namespace {
// Up to n blocks, by descending mass, each followed by its successor: a copying head reads on
// forward, into the next block when it crosses a boundary. Ascending; blocks that are no longer
// Context are dropped when the next selection is made.
std::vector<int32_t> KeepByMass(const std::vector<float>& mass, const std::vector<int32_t>& blocks,
                                int64_t n) {
  std::vector<int> order(blocks.size());
  std::iota(order.begin(), order.end(), 0);
  // By descending mass, equal masses in plan order: a total order, so std::sort gives what a
  // stable sort by mass alone would, without the stable sort's buffer (a NaN mass counts as the
  // least, which keeps the order total).
  const auto key = [&](int x) { return std::isnan(mass[x]) ? -INFINITY : mass[x]; };
  std::sort(order.begin(), order.end(), [&](int x, int y) {
    const float mx = key(x), my = key(y);
    return mx > my || (mx == my && x < y);
  });
  std::vector<int32_t> out(static_cast<size_t>(std::max<int64_t>(n, 0)));
  out.resize(static_cast<size_t>(plan_rules::KeepByMass(blocks.data(), order.data(),
                                                        static_cast<int>(blocks.size()),
                                                        static_cast<int>(n), out.data())));
  return out;
}
}  // namespace

// The previous step's retention at `layer`, whose masses the executor kept (TakesLateMass).
void SparseAttention::FinishLateMass(int64_t layer, const AttnArgs& a, const KVLayerView& kv) {
  const auto t = Clock::now();
  const std::vector<std::vector<int32_t>> blocks = std::move(late_blocks_[layer]);
  late_blocks_[layer].clear();
  std::vector<float> lse(static_cast<size_t>(a.heads));
  exec_->LateMass(layer, blocks, lse.data(), &mass_);
  Retain(layer, nullptr, lse.data(), a, kv, blocks, true, false);
  times_.retain += Since(t);
}

void SparseAttention::Retain(int64_t layer, const float* q, const float* lse, const AttnArgs& a,
                             const KVLayerView& kv, const std::vector<std::vector<int32_t>>& blocks,
                             bool have_mass, bool remapped) {
  if (!have_mass) {
    BlockMassArgs ma{q, lse, a.heads, a.kv_heads, a.head_dim, a.scale, &blocks};
    std::vector<float> qb;  // remapped: the group's queries as each block was scored
    if (remapped) {
      const int64_t B = cfg_.block_size, G = a.heads / a.kv_heads, D = a.head_dim;
      const int64_t lb = cfg_.LocalBegin(a.pos0);
      std::vector<float> row(static_cast<size_t>(D));
      for (int64_t h = 0; h < a.kv_heads; ++h) {
        const int64_t k = static_cast<int64_t>(blocks[h].size());
        for (int64_t i = 0; i < k; ++i) {
          RotationRow(RemapBlockDelta(cfg_.init_end(), k, B, lb, i, int64_t{blocks[h][i]} * B),
                      a.inv_freq, D, row.data());
          qb.resize(qb.size() + static_cast<size_t>(G * D));
          RotateRows(q + h * G * D, G, D, row.data(), qb.data() + qb.size() - G * D);
        }
      }
      ma.q_per_block = qb.data();
    }
    fast::BlockMass(kv, ma, &mass_, tc_);
  }
  auto& r = retained_[layer];
  r.assign(static_cast<size_t>(a.kv_heads), {});
  if (cfg_.select == SelectMode::kLayer) {  // the same blocks for every head: sum their mass
    for (int64_t h = 1; h < a.kv_heads; ++h)
      for (size_t i = 0; i < mass_[0].size(); ++i) mass_[0][i] += mass_[h][i];
    r[0] = KeepByMass(mass_[0], blocks[0], cfg_.retained());
    for (auto& hr : r) hr = r[0];
  } else {
    for (int64_t h = 0; h < a.kv_heads; ++h)
      r[h] = KeepByMass(mass_[h], blocks[h], cfg_.retained());
  }
}

}  // namespace needle
