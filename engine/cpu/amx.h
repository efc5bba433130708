// The AMX block fold: one KV head's G query heads over a piece of bf16 key/value rows, with the
// CPU's tile unit (Intel AMX-BF16) for both products and AVX-512 for the online softmax. Used by
// fast::AttendBlocks (the hybrid engine's Context blocks of a decode step) and by the
// prompts of fast::Attention (dense or sparse prefill) when the cache is bf16, the CPU has AMX
// and Use() says so (Mode below); everything else takes the Highway fold.
//
// Per piece of n rows (n <= a block), padded to a multiple of 32 with zero rows:
//   S [n][16]  = K [n][D] x Qt [D][16]        tiles: K rows as A, the heads' queries as B
//   S^T [G][n] (AVX-512 16x16 transposes), the softmax per head, P [16][n] rounded to bf16
//   O [16][D]  = P [16][n] x V [n][D]         tiles: V's rows as they are stored as B, which the
//                tiles read as pairs of channels; P as A twice, as pairs (p, 0) for the even
//                channels and (0, p) for the odd ones (half the tile's work, no copy of V)
// The queries are scaled and rounded to bf16 once per call, the probabilities per piece; the
// products accumulate in f32. Error bound (tests/test_amx.cc checks it): with
// eps_s = 2^-9 * scale * sum_d |q_d k_d| the largest score error over the attended keys,
//   |out - exact| <= max_j |v_j| * (exp(2 eps_s + 2^-8) - 1),  |lse - exact| <= eps_s + 2^-9
// (the sum l adds the rounded probabilities, so the weights stay a convex combination).
#pragma once

#include <cstdint>
#include <vector>

#include "engine/attention/partial.h"
#include "engine/cpu/ops.h"

namespace needle::amx {

// Whether this CPU has AMX-BF16 and AVX512-BF16 and the kernel granted the tile state (asked
// once per process).
bool Supported();
// When a bf16 cache is folded with the tiles (NEEDLE_CPU_AMX=0 / 1 / unset):
//   kOff   never;  kOn  whenever Supported() and the shape Fits;
//   kAuto  (the default) as kOn for prompts; for decode (fast::AttendBlocks, blocks read once
//          from DRAM) only for groups of at least kAutoMinGroup query heads. The tile
//          work per block does not depend on G (the tiles are 16 heads wide), the Highway
//          fold's does. On the H200 machine's Xeon (bench/RESULTS.md) the tiles fold Qwen2.5-7B's
//          groups of 7 1.4-1.6x faster than Highway, Llama-3.1-8B's groups of 4 no faster, and
//          in the hybrid engine, whose threads sleep between layers, they lost about 10% on
//          Llama (the tiles pay more than AVX-512 to start again after a sleep).
enum class Mode { kFromEnv = -1, kOff = 0, kOn = 1, kAuto = 2 };
constexpr int64_t kAutoMinGroup = 6;
void SetMode(Mode m);  // tests and benchmarks; kFromEnv: back to NEEDLE_CPU_AMX
// Whether to fold a G-head group of head_dim D with the tiles. prefill: a prompt's queries
// (AttentionImpl, T > 1), which read each block many times from the caches: compute-bound,
// where the tiles fold groups of 4 twice as fast as Highway (kAuto takes every group then).
bool Use(int64_t G, int64_t D, bool prefill = false);
// The shapes the tiles take: G <= 16 query heads per KV head, head_dim a multiple of 32 up to 128.
bool Fits(int64_t G, int64_t D);

// One KV head's G query heads, times `scale`, rounded to bf16, in the B-operand layout of the
// score product: D/32 tiles of [16 channel pairs][16 heads][2] (heads >= G zero).
struct Query {
  alignas(64) uint16_t tiles[4][16 * 32];
  int64_t G = 0, D = 0;
};
// q: [G, D] f32, row-major.
void PrepareQuery(const float* q, int64_t G, int64_t D, float scale, Query* out);

// A prompt's attention (fast::Attention with T > 1, key ranges unsplit) on the tiles, the
// caller's partials parts [T * kv_heads][G] (item t * kv_heads + h) initialised: R = 16 / G
// consecutive tokens of one KV head share a tile's query columns over the keys they all attend
// alike (each span while they begin it together with the same rotation, up to the shortest),
// then each token folds the rest of its own (the causal tail, for one). engine/cpu/amx_prompt.cc.
void FoldPrompt(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans,
                PartialAttention* parts, ThreadingContext& tc);

class Folder;
// This thread's Folder (AttendBlocks').
Folder& ThreadFolder();

// One thread's tile state and scratch. Begin before the first Fold of a run on this thread, End
// after its last (releases the tiles).
class Folder {
 public:
  void Begin();
  void End();
  // Folds rows [0, n) of k, v ([n, D] bf16 each, row-major, rows D apart) into part[0 .. G);
  // stats (optional, [G][2]): these rows' own {max, sum}, as the Highway fold writes them.
  // next_k, next_v (optional): the piece folded next, next_bytes each, fetched into the cache
  // meanwhile (the fold would otherwise wait for DRAM at each new block).
  void Fold(const Query& q, const uint16_t* k, const uint16_t* v, int64_t n, PartialAttention* part,
            float* stats, const uint16_t* next_k = nullptr, const uint16_t* next_v = nullptr,
            int64_t next_bytes = 0);

 private:
  std::vector<uint16_t> ktail_, vtail_;  // the piece's last rows, padded to 32 with zeros
  std::vector<uint32_t> pe_, po_;        // P [16][np] as bf16 pairs (p, 0) and (0, p)
  std::vector<float> s_, st_, oe_, oo_;  // S [np][16], S^T [16][np], O's even / odd channels
};

}  // namespace needle::amx
