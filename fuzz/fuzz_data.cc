// needle eval --data JSONL (eval/data_files.h: InfiniteBench, RULER and needle data records).
#include <cstddef>
#include <cstdint>

#include "engine/base/error.h"
#include "eval/data_files.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    needle::eval::ReadSamples(needle::fuzz::AsFile(data, size, "-data.jsonl"));
  } catch (const needle::Error&) {
  }
  return 0;
}
