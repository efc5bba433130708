// A run directory's files, read when a run resumes or shards merge: predictions.jsonl
// (eval/data_files.h ReadResults; it cuts a torn last line off the file, here the harness's own
// copy) and shard.json (eval/shard.h ReadShardFile), each given the same bytes.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

#include "engine/base/error.h"
#include "eval/data_files.h"
#include "eval/shard.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    needle::eval::ReadResults(needle::fuzz::AsFile(data, size, "-predictions.jsonl"));
  } catch (const needle::Error&) {
  }
  static const std::string dir = [] {
    const char* t = std::getenv("TMPDIR");
    const std::string d =
        std::string(t != nullptr ? t : "/tmp") + "/needle-fuzz-run-" + std::to_string(::getpid());
    std::filesystem::create_directories(d);
    return d;
  }();
  FILE* f = std::fopen((dir + "/shard.json").c_str(), "wb");
  if (f == nullptr) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  try {
    bool found = false;
    needle::eval::ReadShardFile(dir, &found);
  } catch (const needle::Error&) {
  }
  return 0;
}
