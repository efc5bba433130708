// config.json -> ModelConfig (engine/model/config.h).
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/base/error.h"
#include "engine/model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    needle::ParseModelConfig(std::string(reinterpret_cast<const char*>(data), size),
                             "fuzz/config.json");
  } catch (const needle::Error&) {
  }
  return 0;
}
