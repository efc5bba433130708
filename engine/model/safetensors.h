// Reader for the safetensors format: an 8-byte little-endian header length, a JSON header that
// maps tensor names to {dtype, shape, data_offsets}, then the raw data. The file is memory-mapped
// and validated completely before any tensor is handed out: header bounds, known dtypes, sizes
// that agree with shapes, offsets inside the data section, no two tensors overlapping.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/base/dtype.h"
#include "engine/base/mapped_file.h"

namespace needle {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // inside the mapping
  size_t nbytes = 0;
  const std::string* file = nullptr;  // the path of the file holding it

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  std::string ShapeString() const;
};

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // throws Error naming path and tensor

  const std::string& path() const { return file_->path(); }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(const std::string& name) const;

 private:
  std::unique_ptr<MappedFile> file_;
  std::map<std::string, TensorInfo> tensors_;
};

}  // namespace needle
