#include "eval/scoring.h"

#include <utf8proc.h>

#include "engine/base/error.h"

namespace needle::eval {

namespace {

// Decodes the code point at s[i] (invalid bytes count as themselves, one byte).
int32_t NextCodePoint(std::string_view s, size_t i, int* len) {
  utf8proc_int32_t c;
  const auto n =
      utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data()) + i,
                       static_cast<utf8proc_ssize_t>(std::min<size_t>(4, s.size() - i)), &c);
  if (n <= 0) {
    *len = 1;
    return -1;
  }
  *len = static_cast<int>(n);
  return c;
}

// Python's str.isspace(): ASCII whitespace, \x1c-\x1f and the Unicode spaces.
bool IsPySpace(int32_t c) {
  if (c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f)) return true;
  if (c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a)) return true;
  return c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

std::string_view PyStrip(std::string_view s) {
  size_t b = 0;
  while (b < s.size()) {
    int len;
    const int32_t c = NextCodePoint(s, b, &len);
    if (!IsPySpace(c)) break;
    b += static_cast<size_t>(len);
  }
  size_t e = s.size();
  while (e > b) {
    size_t start = e - 1;
    while (start > b && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    int len;
    const int32_t c = NextCodePoint(s, start, &len);
    if (!IsPySpace(c)) break;
    e = start;
  }
  return s.substr(b, e - b);
}

}  // namespace

std::string FirstIntMatch(std::string_view p) {
  size_t i = 0;
  while (i < p.size() && !(p[i] >= '0' && p[i] <= '9')) ++i;
  size_t j = i;
  while (j < p.size() && p[j] >= '0' && p[j] <= '9') ++j;
  return std::string(p.substr(i, j - i));
}

bool ScorePasskey(std::string_view prediction, std::string_view label) {
  return FirstIntMatch(prediction) == label;
}

std::vector<std::string> PythonSplit(std::string_view s) {
  std::vector<std::string> out;
  std::string cur;
  for (size_t i = 0; i < s.size();) {
    int len;
    const int32_t c = NextCodePoint(s, i, &len);
    if (IsPySpace(c)) {
      if (!cur.empty()) out.push_back(std::move(cur)), cur.clear();
    } else {
      cur.append(s.substr(i, static_cast<size_t>(len)));
    }
    i += static_cast<size_t>(len);
  }
  if (!cur.empty()) out.push_back(std::move(cur));
  return out;
}

bool ScoreKvRetrieval(std::string_view prediction, std::string_view label) {
  std::string p(prediction);
  for (char& c : p)
    if (c == '\n' || c == ':' || c == '"' || c == '\'' || c == '.' || c == ',' || c == '?' ||
        c == '!' || c == '{' || c == '}')
      c = ' ';
  for (const auto& w : PythonSplit(p))
    if (w == label) return true;
  return false;
}

std::string Lowercase(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    int len;
    const int32_t c = NextCodePoint(s, i, &len);
    if (c < 0) {
      out.push_back(s[i]);
    } else {
      utf8proc_uint8_t buf[4];
      const auto n = utf8proc_encode_char(utf8proc_tolower(c), buf);
      out.append(reinterpret_cast<char*>(buf), static_cast<size_t>(n));
    }
    i += static_cast<size_t>(len);
  }
  return out;
}

std::string RulerPostprocess(std::string_view prediction) {
  std::string p(PyStrip(prediction));
  for (char& c : p)
    if (static_cast<unsigned char>(c) <= 0x1f) c = '\n';
  return std::string(PyStrip(p));
}

double StringMatchAll(std::string_view prediction, const std::vector<std::string>& refs) {
  if (refs.empty()) return 0.0;
  const std::string p = Lowercase(prediction);
  int hits = 0;
  for (const auto& r : refs) hits += p.find(Lowercase(r)) != std::string::npos;
  return static_cast<double>(hits) / static_cast<double>(refs.size());
}

double StringMatchPart(std::string_view prediction, const std::vector<std::string>& refs) {
  const std::string p = Lowercase(prediction);
  for (const auto& r : refs)
    if (p.find(Lowercase(r)) != std::string::npos) return 1.0;
  return 0.0;
}

bool ScoreNeedleKeywords(std::string_view response, const std::vector<std::string>& keywords) {
  const std::string r = Lowercase(response);
  for (const auto& k : keywords)
    if (r.find(Lowercase(k)) == std::string::npos) return false;
  return !keywords.empty();
}

namespace {
const char* kInfinite[] = {"passkey", "number_string", "kv_retrieval"};
const char* kRuler[] = {"niah_single_1",   "niah_single_2",   "niah_single_3",   "niah_multikey_1",
                        "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery"};
}  // namespace

bool IsKnownTask(const std::string& t) {
  for (const char* k : kInfinite)
    if (t == k) return true;
  for (const char* k : kRuler)
    if (t == k) return true;
  return t == "needle";
}

std::string KnownTasks() {
  std::string s;
  for (const char* k : kInfinite) s += std::string(s.empty() ? "" : ", ") + k;
  for (const char* k : kRuler) s += std::string(", ") + k;
  return s + ", needle";
}

double ScoreTask(const std::string& task, std::string_view prediction,
                 const std::vector<std::string>& refs) {
  if (task == "passkey" || task == "number_string") {
    if (refs.size() != 1) Fail("task ", task, " needs exactly one answer (got ", refs.size(), ")");
    return ScorePasskey(prediction, refs[0]) ? 1.0 : 0.0;
  }
  if (task == "kv_retrieval") {
    if (refs.size() != 1)
      Fail("task kv_retrieval needs exactly one answer (got ", refs.size(), ")");
    return ScoreKvRetrieval(prediction, refs[0]) ? 1.0 : 0.0;
  }
  if (task == "needle") return ScoreNeedleKeywords(prediction, refs) ? 1.0 : 0.0;
  if (IsKnownTask(task)) return StringMatchAll(RulerPostprocess(prediction), refs);
  Fail("unknown task '", task, "' (known: ", KnownTasks(), ")");
}

}  // namespace needle::eval
