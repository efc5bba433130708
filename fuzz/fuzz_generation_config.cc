// generation_config.json merged into a ModelConfig (engine/model/config.h).
#include <cstddef>
#include <cstdint>

#include "engine/base/error.h"
#include "engine/model/config.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  needle::ModelConfig cfg;
  cfg.vocab_size = 1000;
  try {
    needle::MergeGenerationConfig(needle::fuzz::AsFile(data, size, "-generation_config.json"),
                                  &cfg);
  } catch (const needle::Error&) {
  }
  return 0;
}
