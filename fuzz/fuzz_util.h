// Shared by the libFuzzer harnesses (fuzz/README.md): the input as a file for the readers that
// take a path, and the rule every harness enforces: a parser either succeeds or throws
// needle::Error; anything else (another exception, a sanitizer report, a crash) is a finding.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

namespace needle::fuzz {

// $TMPDIR (or /tmp)/needle-fuzz-<pid><suffix>: a path of this process's own.
inline std::string ProcessPath(const char* suffix) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/needle-fuzz-" + std::to_string(::getpid()) +
         suffix;
}

// Replaces the file at path with data (a harness's input).
inline void WriteInput(const std::string& path, const uint8_t* data, size_t size) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
}

// Writes data to one file per process and returns its path (the first call's suffix names it).
inline const std::string& AsFile(const uint8_t* data, size_t size, const char* suffix) {
  static const std::string path = ProcessPath(suffix);
  WriteInput(path, data, size);
  return path;
}

}  // namespace needle::fuzz
