// A prompt's attention on the AMX tiles (amx.h, FoldPrompt): R = 16 / G consecutive tokens of
// one KV head share a tile's 16 query columns, over the keys all R attend alike.
#include <algorithm>
#include <vector>

#include "engine/base/error.h"
#include "engine/cpu/amx.h"
#include "engine/cpu/ops.h"

namespace needle::amx {
namespace {

// The keys of one token and one KV head: spans, each with its rotation (-1: none).
struct TokenKeys {
  std::vector<KeySpan> spans;
  std::vector<int32_t> rot;
};

// Folds keys [k0, k1) of KV head h, block piece by block piece, into part (prepared queries q).
void FoldKeys(Folder& f, const Query& q, const KVLayerView& kv, int64_t h, int64_t k0, int64_t k1,
              PartialAttention* part) {
  while (k0 < k1) {
    const int64_t n = std::min(k1, (k0 / kv.block_size + 1) * kv.block_size) - k0;
    f.Fold(q, reinterpret_cast<const uint16_t*>(kv.KRow(h, k0)),
           reinterpret_cast<const uint16_t*>(kv.VRow(h, k0)), n, part, nullptr);
    k0 += n;
  }
}

// rows [n, D] of queries, rotated by rot_table row `rot` when rot >= 0, into the tiles.
void Prepare(const float* rows, int64_t n, int64_t D, float scale, int32_t rot,
             const AttnSpans* spans, std::vector<float>* tmp, Query* out) {
  if (rot >= 0) {
    tmp->resize(static_cast<size_t>(n * D));
    RotateRows(rows, n, D, spans->rot_table.data() + int64_t{rot} * D, tmp->data());
    rows = tmp->data();
  }
  PrepareQuery(rows, n, D, scale, out);
}

}  // namespace

void FoldPrompt(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans,
                PartialAttention* parts, ThreadingContext& tc) {
  const int64_t D = a.head_dim, Hk = a.kv_heads, G = a.heads / Hk;
  NEEDLE_CHECK(Fits(G, D));
  const int64_t R = std::max<int64_t>(1, 16 / G), groups = (a.T + R - 1) / R * Hk;
  tc.ParallelFor(static_cast<size_t>(groups), 1, [&](size_t b, size_t e) {
    thread_local Folder folder;
    thread_local Query tq;
    thread_local std::vector<TokenKeys> keys;
    thread_local std::vector<float> rows, tmp;
    thread_local std::vector<PartialAttention> joint;
    thread_local std::vector<int64_t> shared_end;  // [span]: the shared keys of span x end there
    keys.resize(static_cast<size_t>(R));
    folder.Begin();
    for (size_t gi = b; gi < e; ++gi) {
      const int64_t h = static_cast<int64_t>(gi) % Hk, t0 = static_cast<int64_t>(gi) / Hk * R;
      const int64_t n = std::min(R, a.T - t0);  // tokens of this group
      for (int64_t r = 0; r < n; ++r) {
        TokenKeys& k = keys[r];
        ItemSpans(a, spans, t0 + r, h, &k.spans);
        k.rot.assign(k.spans.size(), -1);
        if (spans != nullptr && !spans->rot.empty())
          for (size_t x = 0; x < k.spans.size(); ++x)
            k.rot[x] = spans->rot[spans->offsets[(t0 + r) * Hk + h] + static_cast<int64_t>(x)];
      }
      // The shared keys: span by span while every token's begins there with the same rotation,
      // up to the shortest; a span that ends unevenly is the last shared one.
      joint.resize(static_cast<size_t>(n * G));
      for (int64_t r = 0; r < n; ++r)
        for (int64_t g = 0; g < G; ++g) joint[r * G + g] = parts[((t0 + r) * Hk + h) * G + g];
      rows.resize(static_cast<size_t>(n * G * D));
      for (int64_t r = 0; r < n; ++r)
        std::copy_n(q + ((t0 + r) * a.heads + h * G) * D, G * D, rows.data() + r * G * D);
      shared_end.clear();
      int32_t prepared = -2;  // the rotation tq holds the group's queries in (-1: none)
      for (size_t x = 0;; ++x) {
        bool same = true;
        int64_t end = INT64_MAX;
        for (int64_t r = 0; r < n && same; ++r) {
          same = x < keys[r].spans.size() && keys[r].spans[x].begin == keys[0].spans[x].begin &&
                 keys[r].rot[x] == keys[0].rot[x];
          if (same) end = std::min(end, keys[r].spans[x].end);
        }
        if (!same) break;
        shared_end.push_back(end);
        if (keys[0].rot[x] != prepared) {
          Prepare(rows.data(), n * G, D, a.scale, keys[0].rot[x], spans, &tmp, &tq);
          prepared = keys[0].rot[x];
        }
        FoldKeys(folder, tq, kv, h, keys[0].spans[x].begin, end, joint.data());
        bool even = true;
        for (int64_t r = 0; r < n; ++r) even = even && keys[r].spans[x].end == end;
        if (!even) break;
      }
      for (int64_t r = 0; r < n; ++r)
        for (int64_t g = 0; g < G; ++g) parts[((t0 + r) * Hk + h) * G + g] = joint[r * G + g];
      // Each token's own keys: the rest of its spans.
      for (int64_t r = 0; r < n; ++r) {
        const TokenKeys& k = keys[r];
        PartialAttention* p = parts + ((t0 + r) * Hk + h) * G;
        prepared = -2;  // (tq now holds one token's queries)
        for (size_t x = 0; x < k.spans.size(); ++x) {
          const int64_t k0 = x < shared_end.size() ? shared_end[x] : k.spans[x].begin;
          if (k0 >= k.spans[x].end) continue;
          if (k.rot[x] != prepared) {
            Prepare(rows.data() + r * G * D, G, D, a.scale, k.rot[x], spans, &tmp, &tq);
            prepared = k.rot[x];
          }
          FoldKeys(folder, tq, kv, h, k0, k.spans[x].end, p);
        }
      }
    }
    folder.End();
  });
}

}  // namespace needle::amx
