// The run directory's predictions.jsonl, read to resume a run (eval/data_files.h ReadResults;
// it cuts a torn last line off the file, here the harness's own copy).
#include <cstddef>
#include <cstdint>

#include "engine/base/error.h"
#include "eval/data_files.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    needle::eval::ReadResults(needle::fuzz::AsFile(data, size, "-predictions.jsonl"));
  } catch (const needle::Error&) {
  }
  return 0;
}
