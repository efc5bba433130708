// Text utilities of the tokenizer: UTF-8 handling, Unicode normalisation (utf8proc), the GPT-2
// byte <-> unicode mapping of byte-level BPE, and a compiled Unicode regex (PCRE2, JIT).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace needle::text {

// Replaces every invalid UTF-8 sequence with U+FFFD, as a caller decoding the bytes into a
// string (Python errors="replace", JavaScript TextDecoder) would before tokenising.
std::string SanitizeUtf8(std::string_view s);
// Length of the UTF-8 sequence starting with byte c (1 for invalid lead bytes).
inline int Utf8Len(unsigned char c) {
  return c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
}
// Number of bytes at the end of s that form an incomplete UTF-8 sequence (0..3).
size_t IncompleteUtf8Tail(std::string_view s);

enum class NormalForm { kNFC, kNFD, kNFKC, kNFKD };
std::string Normalize(std::string_view s, NormalForm f);

// GPT-2's reversible map from bytes to printable code points (as UTF-8 strings), and back.
const std::string& ByteToUnicode(uint8_t b);
// -1 when the code point starting at s is not one of the 256 mapped ones; *len gets its length.
int UnicodeToByte(std::string_view s, int* len);

// A compiled regular expression over UTF-8 text with Unicode properties (\p{L}, \p{N}, ...).
class Regex {
 public:
  explicit Regex(const std::string& pattern);  // throws Error naming the pattern
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // Non-overlapping matches [begin, end) in byte offsets, leftmost first.
  std::vector<std::pair<size_t, size_t>> FindAll(std::string_view s) const;

 private:
  void* code_ = nullptr;  // pcre2_code*
};

}  // namespace needle::text
