// A prompt's attention on the AMX tiles (amx.h, FoldPrompt): R = 16 / G consecutive tokens of
// one KV head share a tile's 16 query columns (prompt_groups.h groups them).
#include <algorithm>
#include <vector>

#include "engine/base/error.h"
#include "engine/cpu/amx.h"
#include "engine/cpu/ops.h"
#include "engine/cpu/prompt_groups.h"

namespace needle::amx {
namespace {

// The tile folder behind prompt_groups.h's interface: the rows' queries rounded into a Query,
// their partials folded where they are (the outputs in place, m, l and n in a copy).
class TileRows : public RowFolder {
 public:
  void Begin() override { folder_.Begin(); }
  void End() override { folder_.End(); }
  void Load(const PartialAttention* parts, int64_t n) override { rows_.assign(parts, parts + n); }
  void SetQueries(const float* rows, int64_t n, int64_t D, float scale) override {
    PrepareQuery(rows, n, D, scale, &q_);
  }
  void Fold(const KVLayerView& kv, int64_t h, int64_t k0, int64_t k1) override {
    while (k0 < k1) {  // block piece by block piece
      const int64_t n = std::min(k1, (k0 / kv.block_size + 1) * kv.block_size) - k0;
      folder_.Fold(q_, reinterpret_cast<const uint16_t*>(kv.KRow(h, k0)),
                   reinterpret_cast<const uint16_t*>(kv.VRow(h, k0)), n, rows_.data(), nullptr);
      k0 += n;
    }
  }
  int64_t Grid(const KVLayerView& kv) const override { return kv.block_size; }
  void Store(PartialAttention* parts, int64_t n) override { std::copy_n(rows_.begin(), n, parts); }

 private:
  Folder folder_;
  Query q_;
  std::vector<PartialAttention> rows_;
};

RowFolder& ThreadTileRows() {
  thread_local TileRows f;
  return f;
}

}  // namespace

void FoldPrompt(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans,
                PartialAttention* parts, ThreadingContext& tc) {
  const int64_t G = a.heads / a.kv_heads;
  NEEDLE_CHECK(Fits(G, a.head_dim));
  FoldPromptGroups(std::max<int64_t>(1, 16 / G), &ThreadTileRows, q, kv, a, spans, parts, tc);
}

}  // namespace needle::amx
