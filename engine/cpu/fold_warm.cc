// fast::WarmBlockFold (ops.h): a block of zeros folded as AttendBlocks would fold a bf16 cache.
#include "engine/attention/partial.h"
#include "engine/cpu/amx.h"
#include "engine/cpu/bf16dot.h"
#include "engine/cpu/ops.h"

namespace needle::fast {

void WarmBlockFold() {
  constexpr int64_t G = 7, D = 128, n = 128;
  if (amx::Use(G, D)) {
    amx::Warm();
    return;
  }
  if (!bf16dot::UseBlocks(G, D)) return;
  alignas(64) static const uint16_t zeros[n * D] = {};
  static const float zq[G * D] = {};
  thread_local bf16dot::Query q;
  bf16dot::PrepareQuery(zq, G, D, 1.0f, &q);
  float out[G * D], stats[2 * G];
  PartialAttention p[G];
  for (int64_t g = 0; g < G; ++g) p[g] = PartialAttention(out + g * D, D);
  bf16dot::ThreadBlockFolder().Fold(q, zeros, zeros, n, p, stats);
}

}  // namespace needle::fast
