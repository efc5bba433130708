// The safetensors header and tensor table (engine/model/safetensors.h).
#include <cstddef>
#include <cstdint>

#include "engine/base/error.h"
#include "engine/model/safetensors.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    needle::SafetensorsFile f(needle::fuzz::AsFile(data, size, ".safetensors"));
    for (const auto& [name, t] : f.tensors()) {
      // Touch the first and last byte each tensor claims: they must lie inside the file.
      if (t.nbytes > 0) {
        volatile uint8_t a = static_cast<const uint8_t*>(t.data)[0];
        volatile uint8_t b = static_cast<const uint8_t*>(t.data)[t.nbytes - 1];
        (void)a;
        (void)b;
      }
    }
  } catch (const needle::Error&) {
  }
  return 0;
}
