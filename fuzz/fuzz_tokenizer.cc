// tokenizer.json loading (engine/tokenizer/tokenizer.h), then encoding and decoding with the
// loaded tokenizer. The input is a tokenizer.json, optionally followed by a NUL byte and a text
// to encode; the ids are decoded back (with and without special tokens).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/base/error.h"
#include "engine/tokenizer/tokenizer.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  const size_t nul = in.find('\0');
  const std::string json = in.substr(0, nul);
  const std::string text =
      nul == std::string::npos ? "Hello, world! 123 \xc3\xa9" : in.substr(nul + 1);
  std::unique_ptr<needle::Tokenizer> tok;
  try {
    tok = needle::Tokenizer::Load(needle::fuzz::AsFile(
        reinterpret_cast<const uint8_t*>(json.data()), json.size(), "-tokenizer.json"));
  } catch (const needle::Error&) {
    return 0;
  }
  try {
    const std::vector<int32_t> ids = tok->Encode(text, true);
    (void)tok->Decode(ids, false);
    (void)tok->Decode(ids, true);
  } catch (const needle::Error&) {
  }
  return 0;
}
