#include "sparse_attn/plan.h"

#include <algorithm>
#include <sstream>

namespace needle {

int64_t RemapBlockDelta(int64_t ie, int64_t k, int64_t B, int64_t lb, int64_t i, int64_t b0) {
  return (ie + k * B - lb) - (ie + i * B - b0);
}

int32_t SharedRotationRow(int64_t delta, const float* inv_freq, int64_t head_dim,
                          std::vector<float>* table, std::map<int64_t, int32_t>* rows) {
  const auto it = rows->find(delta);
  if (it != rows->end()) return it->second;
  const auto row = static_cast<int32_t>(table->size() / static_cast<size_t>(head_dim));
  table->resize(table->size() + static_cast<size_t>(head_dim));
  RotationRow(delta, inv_freq, head_dim, table->data() + row * head_dim);
  rows->emplace(delta, row);
  return row;
}

void AppendQuerySpans(int64_t ie, const std::vector<int32_t>& blocks, int64_t B, int64_t lb,
                      int64_t p, const float* inv_freq, int64_t head_dim, AttnSpans* out,
                      std::map<int64_t, int32_t>* rows, bool local) {
  const bool remap = inv_freq != nullptr;
  const int64_t first = static_cast<int64_t>(out->spans.size());
  const int64_t off = ie + static_cast<int64_t>(blocks.size()) * B - lb;  // p' - p
  auto add = [&](int64_t b, int64_t e, int64_t delta) {
    if (b >= e) return;
    const int32_t row = remap && delta != 0
                            ? SharedRotationRow(delta, inv_freq, head_dim, &out->rot_table, rows)
                            : -1;
    // Adjacent ranges with the same rotation merge, so the kernel walks fewer, longer spans.
    if (static_cast<int64_t>(out->spans.size()) > first && out->spans.back().end == b &&
        (!remap || out->rot.back() == row)) {
      out->spans.back().end = e;
      return;
    }
    out->spans.push_back({b, e});
    if (remap) out->rot.push_back(row);
  };
  add(0, std::min(ie, p + 1), off);  // (a query inside Initial sees part of it)
  for (size_t i = 0; i < blocks.size(); ++i) {
    const int64_t b = int64_t{blocks[i]} * B;
    add(b, b + B,
        RemapBlockDelta(ie, static_cast<int64_t>(blocks.size()), B, lb, static_cast<int64_t>(i),
                        b));
  }
  if (local) add(std::max(lb, ie), p + 1, 0);
  out->offsets.push_back(static_cast<int64_t>(out->spans.size()));
}

void LayerPlan::ToSpans(int64_t kv_heads, AttnSpans* out, const float* inv_freq, int64_t head_dim,
                        bool local) const {
  out->offsets.assign(1, 0);
  out->spans.clear();
  out->rot.clear();
  out->rot_table.clear();
  std::map<int64_t, int32_t> rows;
  const std::vector<int32_t> none;
  for (int64_t h = 0; h < kv_heads; ++h) {
    if (dense)
      AppendQuerySpans(pos + 1, none, block_size, pos + 1, pos, nullptr, 0, out, &rows);
    else
      AppendQuerySpans(init_end, blocks[h], block_size, local_begin, pos,
                       remap ? inv_freq : nullptr, head_dim, out, &rows, local);
  }
  if (remap && out->rot.empty()) out->rot_table.clear();
}

int64_t LayerPlan::AttendedTokens(int64_t h) const {
  if (dense) return pos + 1;
  return init_end + static_cast<int64_t>(blocks[h].size()) * block_size + (pos + 1 - local_begin);
}

namespace {
// [[a,b],[c]]: one JSON list per KV head.
void WriteLists(std::ostringstream& os, const std::vector<std::vector<int32_t>>& lists) {
  os << "[";
  for (size_t h = 0; h < lists.size(); ++h) {
    os << (h ? "," : "") << "[";
    for (size_t i = 0; i < lists[h].size(); ++i) os << (i ? "," : "") << lists[h][i];
    os << "]";
  }
  os << "]";
}
}  // namespace

std::string LayerPlan::ToJson() const {
  std::ostringstream os;
  os << "{\"step\":" << step << ",\"layer\":" << layer << ",\"pos\":" << pos
     << ",\"dense\":" << (dense ? "true" : "false");
  if (!dense) {
    if (remap) os << ",\"remap\":true";
    os << ",\"reused\":" << (reused ? "true" : "false") << ",\"initial\":[0," << init_end
       << "],\"local\":[" << local_begin << "," << pos + 1 << "],\"block_size\":" << block_size
       << ",\"candidates\":" << candidates << ",\"blocks\":";
    WriteLists(os, blocks);
    if (!retained.empty()) {
      os << ",\"retained\":";
      WriteLists(os, retained);
    }
  }
  os << "}";
  return os.str();
}

}  // namespace needle
