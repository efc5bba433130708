#include "engine/model/safetensors.h"

#include <algorithm>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "engine/base/error.h"
#include "engine/base/json_parse.h"

namespace needle {

using json = nlohmann::json;

std::string TensorInfo::ShapeString() const {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

const TensorInfo* SafetensorsFile::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

SafetensorsFile::SafetensorsFile(const std::string& path)
    : file_(std::make_unique<MappedFile>(path)) {
  const uint8_t* p = file_->data();
  const size_t size = file_->size();
  if (size < 8)
    Fail(path, ": truncated safetensors file: ", size, " bytes, the header length alone needs 8");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | p[i];
  if (header_len > size - 8)
    Fail(path, ": safetensors header length ", header_len, " exceeds the file (", size,
         " bytes): the file is truncated or not safetensors");
  json header;
  try {
    header = ParseJsonBounded(p + 8, p + 8 + header_len);
  } catch (const json::exception& e) {
    Fail(path, ": malformed safetensors JSON header: ", e.what());
  }
  if (!header.is_object()) Fail(path, ": safetensors header is not a JSON object");

  const uint8_t* data = p + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  struct Span {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Span> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") continue;
    const json& e = it.value();
    auto bad = [&](const std::string& why) { Fail(path, ": tensor '", name, "': ", why); };
    if (!e.is_object()) bad("header entry is not an object");
    if (!e.contains("dtype") || !e["dtype"].is_string()) bad("missing or non-string 'dtype'");
    if (!e.contains("shape") || !e["shape"].is_array()) bad("missing or non-list 'shape'");
    if (!e.contains("data_offsets") || !e["data_offsets"].is_array() ||
        e["data_offsets"].size() != 2)
      bad("'data_offsets' must be a list of two integers");
    TensorInfo t;
    t.name = name;
    std::string ds = e["dtype"].get<std::string>();
    if (!ParseSafetensorsDType(ds, &t.dtype)) bad("unknown dtype '" + ds + "'");
    // At most 2^56 elements (a bound far above any tensor, so that numel times the element size
    // cannot wrap: a [2^62, 2] bf16 shape once "needed" 0 bytes). The shape is not dumped into
    // the message: it may be nested deep enough to overflow the stack.
    constexpr uint64_t kMaxElements = uint64_t{1} << 56;
    uint64_t numel = 1;
    for (size_t i = 0; i < e["shape"].size(); ++i) {
      const json& d = e["shape"][i];
      if (!d.is_number_unsigned())
        bad(Concat("shape dimension ", i, " is not a non-negative integer"));
      const uint64_t v = d.get<uint64_t>();
      if (v > kMaxElements || (v != 0 && numel > kMaxElements / v))
        bad(Concat("shape dimension ", i, " (", v, ") makes the tensor larger than 2^56 elements"));
      numel *= v;
      t.shape.push_back(static_cast<int64_t>(v));
    }
    const auto& off = e["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      bad("'data_offsets' must be non-negative integers");
    uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    if (b > en) bad(Concat("data_offsets [", b, ", ", en, "] are reversed"));
    if (en > data_size)
      bad(Concat("data_offsets [", b, ", ", en, "] run past the data section (", data_size,
                 " bytes): the file is truncated or corrupt"));
    const uint64_t expect = numel * DTypeSize(t.dtype);
    if (en - b != expect)
      bad(Concat("data_offsets span ", en - b, " bytes but shape ", t.ShapeString(), " of ", ds,
                 " needs ", expect));
    t.data = data + b;
    t.nbytes = static_cast<size_t>(en - b);
    auto [pos, inserted] = tensors_.emplace(name, std::move(t));
    spans.push_back({b, en, &pos->first});
  }
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  // Track the furthest end seen so far, so a tensor nested inside an earlier large one is caught.
  const Span* furthest = nullptr;
  for (const Span& s : spans) {
    if (s.end == s.begin) continue;  // empty tensors occupy nothing
    if (furthest != nullptr && s.begin < furthest->end)
      Fail(path, ": tensors '", *furthest->name, "' and '", *s.name,
           "' overlap in the data section ([", furthest->begin, ", ", furthest->end, ") and [",
           s.begin, ", ", s.end, "))");
    if (furthest == nullptr || s.end > furthest->end) furthest = &s;
  }
  for (auto& [name, t] : tensors_) t.file = &file_->path();
}

}  // namespace needle
