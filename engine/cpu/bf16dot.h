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
#include <vector>

#include "engine/attention/partial.h"
#include "engine/cpu/ops.h"

namespace needle::bf16dot {

// NEEDLE_CPU_BF16DOT=0: never; =1: wherever the CPU has AVX512-BF16 and the AMX tiles do not
// take the shape; unset (kAuto): only on CPUs without AMX, so that an AMX machine keeps the
// folds it was measured with (the tiles, and the Highway fold for decode groups under
// amx::kAutoMinGroup) until this one is measured there. SetMode: tests and benchmarks
// (kFromEnv: back to the variable).
enum class Mode { kFromEnv = -1, kOff = 0, kOn = 1, kAuto = 2 };
void SetMode(Mode m);
// Whether a prompt over a bf16 cache of head_dim D folds this way (D even, the CPU able, the
// mode on).
bool Use(int64_t D);

// fast::Attention's prompt fold (T > 1, key ranges unsplit) over a bf16 cache, the caller's
// partials parts [T * kv_heads][G] initialised (prompt_groups.h). bf16_prompt.cc.
void FoldPrompt(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans,
                PartialAttention* parts, ThreadingContext& tc);

// Decode: fast::AttendBlocks (the hybrid engine's Context blocks) over a bf16 cache, one KV
// head's G query heads a pass over each block (bf16_blocks.cc), where the CPU has no AMX:
//   s [G][n]   per key, each head's dot product over D / 32 vdpbf16ps of the key's row as
//              stored and the head's query pairs, the 16 lanes of 16 keys summed by a tree
//   o [G][D]  += pairs of keys: the block's values interleaved two rows at a time, each head's
//              probability pair broadcast
// The same bound as the prompt fold's (and the AMX fold's), the block sums {m, l} too.
// Whether a decode step's blocks (G heads per KV head, head_dim D) fold this way: D a multiple
// of 32 up to 256, the CPU able, the mode on.
bool UseBlocks(int64_t G, int64_t D);

// One KV head's G query heads, times `scale`, rounded to bf16 pairs of channels: [G][D / 2].
struct Query {
  std::vector<uint32_t> pairs;
  int64_t G = 0, D = 0;
};
// q: [G, D] f32, row-major.
void PrepareQuery(const float* q, int64_t G, int64_t D, float scale, Query* out);

// One thread's scratch for the decode fold.
class BlockFolder {
 public:
  // Folds rows [0, n) of k, v ([n, D] bf16 each, row-major) into part[0 .. G); stats
  // (optional, [G][2]): these rows' own {max, sum}, as the Highway fold writes them. next_k,
  // next_v (optional, next_bytes each): the piece folded next, fetched into the cache meanwhile.
  void Fold(const Query& q, const uint16_t* k, const uint16_t* v, int64_t n, PartialAttention* part,
            float* stats, const uint16_t* next_k = nullptr, const uint16_t* next_v = nullptr,
            int64_t next_bytes = 0);

 private:
  std::vector<float> s_;      // [G][np]: scores, then probabilities (np: n rounded up to 32)
  std::vector<uint16_t> p_;   // [G][np]: the probabilities rounded to bf16 (pairs of keys)
  std::vector<uint32_t> vp_;  // [np / 2][D]: the values as bf16 pairs of keys
};

// This thread's BlockFolder (AttendBlocks').
BlockFolder& ThreadBlockFolder();

}  // namespace needle::bf16dot
