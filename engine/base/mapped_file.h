// A read-only memory mapping of a whole file. Weights are used in place from the mapping, so
// loading a 15 GB model costs page-table set-up, not a copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace needle {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws Error naming the path
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Reads a whole (small) text file; throws Error naming the path.
std::string ReadTextFile(const std::string& path);

}  // namespace needle
