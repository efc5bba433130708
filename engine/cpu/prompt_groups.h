// A prompt's attention by groups of consecutive tokens (fast::Attention with T > 1, key ranges
// unsplit): R consecutive tokens of one KV head fold the keys they all attend alike once for all
// their R x G query rows (each span while they begin it together with the same rotation, up to
// the shortest, cut back to the folder's piece grid), then each token folds the rest of its own
// (the causal tail, for one). A row's result depends on its own pieces only, and these are the
// same whatever tokens share its group: a token's attention is the same alone, in a longer or
// shorter call, or in a batch (where the calls' token ranges differ). A piece
// of keys is then read and converted once for R x G rows instead of G: the fold becomes a small
// matrix product, compute-bound where a row at a time is bound by loads and reductions.
// Two folders carry it out: the Highway row tile (engine/cpu/prompt_fold.cc) and the AMX tiles
// (engine/cpu/amx_prompt.cc).
#pragma once

#include <cstdint>
#include <vector>

#include "engine/attention/partial.h"
#include "engine/cpu/ops.h"

namespace needle {

// One thread's fold of n query rows (R tokens x G heads, token-major) over key ranges of one KV
// head. Per group: Load, then SetQueries and Fold as the spans require, then Store.
class RowFolder {
 public:
  virtual ~RowFolder() = default;
  virtual void Begin() {}  // before this thread's first group of a call
  virtual void End() {}    // after its last
  // The rows' partials, parts[0 .. n) (the outputs they point to are read and written).
  virtual void Load(const PartialAttention* parts, int64_t n) = 0;
  // The rows' queries [n, D] f32, row-major (already rotated where a span says), unscaled.
  virtual void SetQueries(const float* rows, int64_t n, int64_t D, float scale) = 0;
  // Folds keys [k0, k1) of KV head h (any block layout, any storage type the folder takes), in
  // pieces that end at multiples of Grid(kv) (and at k1).
  virtual void Fold(const KVLayerView& kv, int64_t h, int64_t k0, int64_t k1) = 0;
  virtual int64_t Grid(const KVLayerView& kv) const = 0;
  // Writes the rows' partials back: m, l, n and the outputs.
  virtual void Store(PartialAttention* parts, int64_t n) = 0;
};

// The softmax state of a group's rows held in vector lanes, as the row tiles hold it
// (prompt_fold.cc, bf16_prompt.cc): rows padded to a whole number of vectors of `lanes`.
struct LaneRows {
  int64_t n = 0, D = 0, M = 0;    // rows, head_dim, rows padded
  std::vector<float> m, l, corr;  // [M]: max, sum, and the factor of the piece being folded
  std::vector<int64_t> count;     // [M]: keys folded per row
  std::vector<float> ot;          // O^T [D][M]
  // From parts[0 .. n) (padding rows: empty).
  void Load(const PartialAttention* parts, int64_t rows, int64_t lanes);
  void Store(PartialAttention* parts, int64_t rows) const;  // back to parts[0 .. n)
};

// The caller's partials parts [T * kv_heads][G] (item t * kv_heads + h), initialised, folded
// over every item's spans (ItemSpans) by groups of R tokens; folder() gives the calling thread's
// folder.
void FoldPromptGroups(int64_t R, RowFolder& (*folder)(), const float* q, const KVLayerView& kv,
                      const AttnArgs& a, const AttnSpans* spans, PartialAttention* parts,
                      ThreadingContext& tc);

namespace fast {
// The Highway row tile's prompt fold (engine/cpu/prompt_fold.cc): groups of about four vectors
// of rows, every storage type of the cache.
void FoldPromptRows(const float* q, const KVLayerView& kv, const AttnArgs& a,
                    const AttnSpans* spans, PartialAttention* parts, ThreadingContext& tc);
}  // namespace fast

}  // namespace needle
