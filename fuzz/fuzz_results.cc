// A run directory's files, read when a run resumes or shards merge: predictions.jsonl
// (eval/data_files.h ReadResults; it cuts a torn last line off the file, here the harness's own
// copy), shard.json (eval/shard.h ReadShardFile) and tasks.json (eval/task_list.h ReadTaskList),
// each given the same bytes.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

#include "engine/base/error.h"
#include "eval/data_files.h"
#include "eval/shard.h"
#include "eval/task_list.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    needle::eval::ReadResults(needle::fuzz::AsFile(data, size, "-predictions.jsonl"));
  } catch (const needle::Error&) {
  }
  static const std::string dir = [] {
    const std::string d = needle::fuzz::ProcessPath("-run");
    std::filesystem::create_directories(d);
    return d;
  }();
  needle::fuzz::WriteInput(dir + "/shard.json", data, size);
  try {
    bool found = false;
    needle::eval::ReadShardFile(dir, &found);
  } catch (const needle::Error&) {
  }
  needle::fuzz::WriteInput(dir + "/tasks.json", data, size);
  try {
    bool found = false;
    needle::eval::ReadTaskList(dir, &found);
  } catch (const needle::Error&) {
  }
  return 0;
}
