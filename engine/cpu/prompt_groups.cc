// FoldPromptGroups (prompt_groups.h): the grouping shared by the prompt folders.
#include "engine/cpu/prompt_groups.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/base/error.h"

namespace needle {
namespace {

// The keys of one token and one KV head: spans, each with its rotation (-1: none).
struct TokenKeys {
  std::vector<KeySpan> spans;
  std::vector<int32_t> rot;
};

// rows [n, D] of queries, rotated by rot_table row `rot` when rot >= 0, to the folder.
void SetQueries(RowFolder& f, const float* rows, int64_t n, int64_t D, float scale, int32_t rot,
                const AttnSpans* spans, std::vector<float>* tmp) {
  if (rot >= 0) {
    tmp->resize(static_cast<size_t>(n * D));
    RotateRows(rows, n, D, spans->rot_table.data() + int64_t{rot} * D, tmp->data());
    rows = tmp->data();
  }
  f.SetQueries(rows, n, D, scale);
}

}  // namespace

void LaneRows::Load(const PartialAttention* parts, int64_t rows, int64_t lanes) {
  NEEDLE_CHECK(rows >= 1 && lanes >= 1);
  n = rows, D = parts[0].dim, M = (rows + lanes - 1) / lanes * lanes;
  const size_t Mz = static_cast<size_t>(M);
  m.assign(Mz, -INFINITY), l.assign(Mz, 0.f), corr.assign(Mz, 0.f), count.assign(Mz, 0);
  ot.assign(static_cast<size_t>(D) * Mz, 0.f);
  for (int64_t r = 0; r < n; ++r) {
    const PartialAttention& p = parts[r];
    count[r] = p.n;
    if (p.empty()) continue;
    m[r] = p.m, l[r] = p.l;
    for (int64_t d = 0; d < D; ++d) ot[d * M + r] = p.out[d];
  }
}

void LaneRows::Store(PartialAttention* parts, int64_t rows) const {
  NEEDLE_CHECK(rows == n);
  for (int64_t r = 0; r < n; ++r) {
    PartialAttention& p = parts[r];
    p.n = count[r];
    p.m = m[r], p.l = l[r];
    for (int64_t d = 0; d < D; ++d) p.out[d] = ot[d * M + r];
  }
}

void FoldPromptGroups(int64_t R, RowFolder& (*folder)(), const float* q, const KVLayerView& kv,
                      const AttnArgs& a, const AttnSpans* spans, PartialAttention* parts,
                      ThreadingContext& tc) {
  const int64_t D = a.head_dim, Hk = a.kv_heads, G = a.heads / Hk;
  NEEDLE_CHECK(R >= 1);
  const int64_t groups = (a.T + R - 1) / R * Hk;
  tc.ParallelFor(static_cast<size_t>(groups), 1, [&](size_t b, size_t e) {
    RowFolder& f = folder();
    thread_local std::vector<TokenKeys> keys;
    thread_local std::vector<float> rows, tmp;
    thread_local std::vector<PartialAttention> joint;
    thread_local std::vector<int64_t> shared_end;  // [span]: the shared keys of span x end there
    if (keys.size() < static_cast<size_t>(R)) keys.resize(static_cast<size_t>(R));
    f.Begin();
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
      // up to the shortest; a span that ends unevenly is the last shared one, shared up to the
      // last multiple of the grid before its shortest end (so that each token's pieces are those
      // it would fold alone).
      const int64_t grid = f.Grid(kv);
      joint.resize(static_cast<size_t>(n * G));
      for (int64_t r = 0; r < n; ++r)
        for (int64_t g = 0; g < G; ++g) joint[r * G + g] = parts[((t0 + r) * Hk + h) * G + g];
      rows.resize(static_cast<size_t>(n * G * D));
      for (int64_t r = 0; r < n; ++r)
        std::copy_n(q + ((t0 + r) * a.heads + h * G) * D, G * D, rows.data() + r * G * D);
      shared_end.clear();
      f.Load(joint.data(), n * G);
      int32_t prepared = -2;  // the rotation the folder holds the group's queries in (-1: none)
      for (size_t x = 0;; ++x) {
        bool same = true;
        int64_t end = INT64_MAX;
        for (int64_t r = 0; r < n && same; ++r) {
          same = x < keys[r].spans.size() && keys[r].spans[x].begin == keys[0].spans[x].begin &&
                 keys[r].rot[x] == keys[0].rot[x];
          if (same) end = std::min(end, keys[r].spans[x].end);
        }
        if (!same) break;
        bool even = true;
        for (int64_t r = 0; r < n; ++r) even = even && keys[r].spans[x].end == end;
        const int64_t begin = keys[0].spans[x].begin;
        if (!even) end = std::max(begin, end / grid * grid);
        shared_end.push_back(end);
        if (end > begin) {
          if (keys[0].rot[x] != prepared) {
            SetQueries(f, rows.data(), n * G, D, a.scale, keys[0].rot[x], spans, &tmp);
            prepared = keys[0].rot[x];
          }
          f.Fold(kv, h, begin, end);
        }
        if (!even) break;
      }
      f.Store(joint.data(), n * G);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t g = 0; g < G; ++g) parts[((t0 + r) * Hk + h) * G + g] = joint[r * G + g];
      // Each token's own keys: the rest of its spans.
      for (int64_t r = 0; r < n; ++r) {
        const TokenKeys& k = keys[r];
        bool any = false;
        for (size_t x = 0; x < k.spans.size() && !any; ++x)
          any = (x < shared_end.size() ? shared_end[x] : k.spans[x].begin) < k.spans[x].end;
        if (!any) continue;
        PartialAttention* p = parts + ((t0 + r) * Hk + h) * G;
        f.Load(p, G);
        prepared = -2;  // (the folder now holds one token's queries)
        for (size_t x = 0; x < k.spans.size(); ++x) {
          const int64_t k0 = x < shared_end.size() ? shared_end[x] : k.spans[x].begin;
          if (k0 >= k.spans[x].end) continue;
          if (k.rot[x] != prepared) {
            SetQueries(f, rows.data() + r * G * D, G, D, a.scale, k.rot[x], spans, &tmp);
            prepared = k.rot[x];
          }
          f.Fold(kv, h, k0, k.spans[x].end);
        }
        f.Store(p, G);
      }
    }
    f.End();
  });
}

}  // namespace needle
