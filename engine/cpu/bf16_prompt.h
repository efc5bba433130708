// A prompt's attention over a bf16 cache with AVX512-BF16 dot products (vdpbf16ps: 32 products
// of bf16 pairs summed into 16 f32 lanes per instruction, twice the work of an f32 multiply-add
// on the same port): the Highway row tile's layout (prompt_fold.cc, rows in vector lanes, groups
// of prompt_groups.h) with the queries and the probabilities rounded to bf16, the keys and values
// read as they are stored, every sum in f32. For CPUs with AVX512-BF16 and no AMX (AMD Zen 4 and
// later); where the CPU has AMX, its tiles fold the prompt (amx.h).
//   S^T [n][M]  += pairs of channels: a key's pair (k_2i, k_2i+1) broadcast, the rows' query pairs
//   O^T [D][M]  += pairs of keys: a value pair (v_j,d, v_j+1,d) broadcast (the piece's values
//                  interleaved two rows at a time once), the rows' probability pairs
// Error bound (tests/test_prompt_fold.cc checks it), that of the AMX fold: with eps_s = 2^-9 *
// scale * sum_d |q_d k_d| the largest score error over the attended keys,
//   |out - exact| <= max_j |v_j| * (exp(2 eps_s + 2^-8) - 1),  |lse - exact| <= eps_s + 2^-9
// (the sum l adds the rounded probabilities, so the weights stay a convex combination).
#pragma once

#include <cstdint>

#include "engine/attention/partial.h"
#include "engine/cpu/ops.h"

namespace needle::bf16dot {

// NEEDLE_CPU_BF16DOT=0: never; otherwise (the default) wherever the CPU has AVX512-BF16.
// SetMode: tests and benchmarks (kFromEnv: back to the variable).
enum class Mode { kFromEnv = -1, kOff = 0, kOn = 1 };
void SetMode(Mode m);
// Whether a prompt over a bf16 cache of head_dim D folds this way (D even, the CPU able, the
// mode on).
bool Use(int64_t D);

// fast::Attention's prompt fold (T > 1, key ranges unsplit) over a bf16 cache, the caller's
// partials parts [T * kv_heads][G] initialised (prompt_groups.h).
void FoldPrompt(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans,
                PartialAttention* parts, ThreadingContext& tc);

}  // namespace needle::bf16dot
