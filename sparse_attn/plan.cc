#include "sparse_attn/plan.h"

#include <sstream>

namespace needle {

void LayerPlan::ToSpans(int64_t kv_heads, AttnSpans* out) const {
  out->offsets.assign(1, 0);
  out->spans.clear();
  for (int64_t h = 0; h < kv_heads; ++h) {
    auto add = [&](int64_t b, int64_t e) {
      if (b >= e) return;
      // Adjacent ranges merge, so the kernel walks fewer, longer spans.
      if (static_cast<int64_t>(out->spans.size()) > out->offsets.back() &&
          out->spans.back().end == b)
        out->spans.back().end = e;
      else
        out->spans.push_back({b, e});
    };
    if (dense) {
      add(0, pos + 1);
    } else {
      add(0, init_end);
      for (int32_t b : blocks[h]) add(b * block_size, (b + 1) * block_size);
      add(local_begin, pos + 1);
    }
    out->offsets.push_back(static_cast<int64_t>(out->spans.size()));
  }
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
