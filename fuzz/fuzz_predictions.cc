// needle eval score's prediction files (eval/data_files.h).
#include <cstddef>
#include <cstdint>

#include "engine/base/error.h"
#include "eval/data_files.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    needle::eval::ReadPredictions(needle::fuzz::AsFile(data, size, "-preds.jsonl"));
  } catch (const needle::Error&) {
  }
  return 0;
}
