// fast::WarmBlockFold and fast::FoldWarmUp (ops.h): a block of zeros folded as AttendBlocks would
// fold a bf16 cache of Qwen2.5-7B's heads on this CPU.
#include "engine/attention/partial.h"
#include "engine/base/switches.h"
#include "engine/cpu/amx.h"
#include "engine/cpu/bf16dot.h"
#include "engine/cpu/ops.h"

namespace needle::fast {

void WarmBlockFold() {
  constexpr int64_t G = 7, D = 128, n = 128;
  const bool tiles = amx::Use(G, D);
  if (!tiles && !bf16dot::UseBlocks(G, D)) return;
  alignas(64) static const uint16_t zeros[n * D] = {};
  static const float zq[G * D] = {};
  float out[G * D], stats[2 * G];
  PartialAttention p[G];
  for (int64_t g = 0; g < G; ++g) p[g] = PartialAttention(out + g * D, D);
  if (tiles) {
    thread_local amx::Query q;
    amx::PrepareQuery(zq, G, D, 1.0f, &q);
    amx::Folder& f = amx::ThreadFolder();
    f.Begin();
    f.Fold(q, zeros, zeros, n, p, stats);
    f.End();
    return;
  }
  thread_local bf16dot::Query q;
  bf16dot::PrepareQuery(zq, G, D, 1.0f, &q);
  bf16dot::ThreadBlockFolder().Fold(q, zeros, zeros, n, p, stats);
}

void (*FoldWarmUp())() {
  static void (*const warm)() = EnvSwitch("NEEDLE_FOLD_WARM", 0) != 0 ? WarmBlockFold : nullptr;
  return warm;
}

}  // namespace needle::fast
