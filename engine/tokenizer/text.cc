#include "engine/tokenizer/text.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <cstdlib>
#include <cstring>

#include "engine/base/error.h"

namespace needle::text {

namespace {
// Decodes one code point at s[i]; returns its length, or 0 when the sequence is invalid.
int DecodeOne(std::string_view s, size_t i, int32_t* cp) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data()) + i;
  const size_t left = s.size() - i;
  utf8proc_int32_t c;
  const utf8proc_ssize_t n =
      utf8proc_iterate(p, static_cast<utf8proc_ssize_t>(left < 4 ? left : 4), &c);
  if (n <= 0) return 0;
  *cp = c;
  return static_cast<int>(n);
}
}  // namespace

std::string SanitizeUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    int32_t cp;
    const int n = DecodeOne(s, i, &cp);
    if (n > 0) {
      out.append(s.substr(i, static_cast<size_t>(n)));
      i += static_cast<size_t>(n);
      continue;
    }
    out.append("\xEF\xBF\xBD");  // U+FFFD for the maximal invalid prefix (WHATWG: one per bad byte
    // run of a truncated sequence): skip the lead byte and any continuation bytes it allowed.
    const auto lead = static_cast<uint8_t>(s[i]);
    size_t j = i + 1;
    const int want = Utf8Len(lead);
    if (want > 1) {
      // A truncated but otherwise well-formed prefix counts as one error.
      uint8_t lo = 0x80, hi = 0xBF;
      if (lead == 0xE0) lo = 0xA0;
      if (lead == 0xED) hi = 0x9F;
      if (lead == 0xF0) lo = 0x90;
      if (lead == 0xF4) hi = 0x8F;
      if (lead >= 0xC2 && lead <= 0xF4) {
        for (int k = 1; k < want && j < s.size(); ++k, ++j) {
          const auto c = static_cast<uint8_t>(s[j]);
          if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xBF)) break;
        }
      }
    }
    i = j;
  }
  return out;
}

size_t IncompleteUtf8Tail(std::string_view s) {
  for (size_t back = 1; back <= 3 && back <= s.size(); ++back) {
    const auto c = static_cast<uint8_t>(s[s.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back
    const int need = Utf8Len(c);
    return need > static_cast<int>(back) ? back : 0;
  }
  return 0;
}

std::string Normalize(std::string_view s, NormalForm f) {
  int opts = UTF8PROC_STABLE;
  switch (f) {
    case NormalForm::kNFC:
      opts |= UTF8PROC_COMPOSE;
      break;
    case NormalForm::kNFD:
      opts |= UTF8PROC_DECOMPOSE;
      break;
    case NormalForm::kNFKC:
      opts |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
      break;
    case NormalForm::kNFKD:
      opts |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
      break;
  }
  utf8proc_uint8_t* out = nullptr;
  const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                          static_cast<utf8proc_ssize_t>(s.size()), &out,
                                          static_cast<utf8proc_option_t>(opts));
  if (n < 0) return std::string(s);  // input is sanitised before, so this does not happen
  std::string r(reinterpret_cast<char*>(out), static_cast<size_t>(n));
  std::free(out);
  return r;
}

namespace {
struct ByteTable {
  std::string to_unicode[256];
  int from_cp[324];  // code points used are < 324
  ByteTable() {
    for (int& x : from_cp) x = -1;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const int cp = printable ? b : 256 + n++;
      utf8proc_uint8_t buf[4];
      const auto len = utf8proc_encode_char(cp, buf);
      to_unicode[b].assign(reinterpret_cast<char*>(buf), static_cast<size_t>(len));
      from_cp[cp] = b;
    }
  }
};
const ByteTable& Table() {
  static const ByteTable t;
  return t;
}
}  // namespace

const std::string& ByteToUnicode(uint8_t b) { return Table().to_unicode[b]; }

int UnicodeToByte(std::string_view s, int* len) {
  int32_t cp = 0;
  const int n = DecodeOne(s, 0, &cp);
  *len = n > 0 ? n : 1;
  if (n <= 0 || cp < 0 || cp >= 324) return -1;
  return Table().from_cp[cp];
}

Regex::Regex(const std::string& pattern) {
  int err = 0;
  PCRE2_SIZE off = 0;
  pcre2_code* c = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &off, nullptr);
  if (c == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    Fail("tokenizer: cannot compile regex '", pattern, "' at offset ", off, ": ",
         reinterpret_cast<char*>(msg));
  }
  pcre2_jit_compile(c,
                    PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is unavailable
  code_ = c;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

std::vector<std::pair<size_t, size_t>> Regex::FindAll(std::string_view s) const {
  std::vector<std::pair<size_t, size_t>> out;
  auto* code = static_cast<pcre2_code*>(code_);
  // One match block per thread, freed when the thread ends (the server's HTTP workers tokenize
  // and come and go).
  struct MatchData {
    pcre2_match_data* p = pcre2_match_data_create(4, nullptr);
    ~MatchData() { pcre2_match_data_free(p); }
  };
  thread_local MatchData holder;
  pcre2_match_data* md = holder.p;
  if (md == nullptr) Fail("tokenizer: out of memory for a regex match");
  size_t at = 0;
  while (at <= s.size()) {
    const int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), at,
                               PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc < 0) break;
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t b = ov[0], e = ov[1];
    if (e == b) {  // empty match: step one code point to make progress
      at = b + (b < s.size() ? static_cast<size_t>(Utf8Len(static_cast<uint8_t>(s[b]))) : 1);
      continue;
    }
    out.emplace_back(b, e);
    at = e;
  }
  return out;
}

}  // namespace needle::text
