#include "datasets/niah.h"

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "engine/base/error.h"
#include "engine/base/mapped_file.h"

namespace needle::datasets {

const char* kDefaultHaystack = "/usr/share/doc/jargon-text/jargon.txt.gz";

std::vector<double> LinearDepths(int64_t n) {
  std::vector<double> d;
  for (int64_t i = 0; i < n; ++i)
    d.push_back(n == 1 ? 50.0 : std::round(100.0 * i / static_cast<double>(n - 1)));
  return d;
}

std::vector<double> SigmoidDepths(int64_t n) {
  std::vector<double> d;
  for (int64_t i = 0; i < n; ++i) {
    const double x = n == 1 ? 50.0 : 100.0 * i / static_cast<double>(n - 1);
    if (x == 0.0 || x == 100.0) {
      d.push_back(x);
      continue;
    }
    const double y = 100.0 / (1.0 + std::exp(0.1 * (x - 50.0)));  // 100 * sigmoid(-0.1 (x - 50))
    d.push_back(std::round(y * 1000.0) / 1000.0);
  }
  return d;
}

namespace {

std::string ReadMaybeGz(const std::string& path) {
  if (path.size() < 3 || path.compare(path.size() - 3, 3, ".gz") != 0) return ReadTextFile(path);
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) Fail(path, ": cannot open");
  std::string out;
  char buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  const bool bad = n < 0;
  gzclose(f);
  if (bad) Fail(path, ": corrupt gzip data");
  return out;
}

bool HasBoxDrawing(const std::string& line) {
  for (size_t i = 0; i + 2 < line.size(); ++i)  // U+2500..U+257F: E2 94 80 .. E2 95 BF
    if (static_cast<unsigned char>(line[i]) == 0xE2 &&
        (static_cast<unsigned char>(line[i + 1]) == 0x94 ||
         static_cast<unsigned char>(line[i + 1]) == 0x95))
      return true;
  return false;
}

}  // namespace

std::string LoadHaystack(const std::vector<std::string>& paths) {
  std::vector<std::string> files;
  for (const auto& p : paths) {
    if (std::filesystem::is_directory(p)) {
      std::vector<std::string> here;
      for (const auto& e : std::filesystem::directory_iterator(p)) {
        const std::string f = e.path().string();
        if (f.ends_with(".txt") || f.ends_with(".txt.gz")) here.push_back(f);
      }
      std::sort(here.begin(), here.end());
      if (here.empty()) Fail(p, ": no .txt or .txt.gz files in the haystack folder");
      files.insert(files.end(), here.begin(), here.end());
    } else {
      if (!std::filesystem::exists(p))
        Fail(p, ": haystack file not found",
             p == kDefaultHaystack ? " (install the Debian package jargon-text)" : "");
      files.push_back(p);
    }
  }
  std::string text;
  for (const auto& f : files) {
    const std::string raw = ReadMaybeGz(f);
    size_t at = 0;
    while (at < raw.size()) {
      size_t nl = raw.find('\n', at);
      if (nl == std::string::npos) nl = raw.size();
      const std::string line = raw.substr(at, nl - at);
      if (!HasBoxDrawing(line)) text += line + "\n";
      at = nl + 1;
    }
  }
  if (text.find_first_not_of(" \t\r\n") == std::string::npos)
    Fail("haystack: the files hold no text");
  return text;
}

std::string NiahSystem() {
  return "You are a helpful AI bot that answers questions for a user. Keep your response short and "
         "direct";
}

std::string NiahUser(const std::string& context, const std::string& question) {
  return "<context>\n" + context + "\n</context>\n\n" + question +
         " Don't give information outside the document or repeat your findings";
}

std::string NiahPrompt(const std::string& context, const std::string& question) {
  return NiahSystem() + "\n\nHuman: " + NiahUser(context, question) +
         "\n\nAssistant: Here is the most relevant sentence in the context:";
}

std::vector<Sample> GenerateNiah(const Tokenizer& tok, const std::string& haystack,
                                 const std::vector<int64_t>& lengths,
                                 const std::vector<double>& depths, int64_t prompt_overhead,
                                 const NiahOptions& o) {
  const int64_t max_len = lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
  std::vector<int32_t> hay = tok.Encode(haystack, false);
  if (hay.empty()) Fail("haystack: no tokens");
  // Loop the text until it covers the longest context, as the original concatenates its files.
  const std::vector<int32_t> once = hay;
  while (static_cast<int64_t>(hay.size()) < max_len)
    hay.insert(hay.end(), once.begin(), once.end());
  const int64_t needle_tokens = static_cast<int64_t>(tok.Encode(o.needle, false).size());
  std::vector<Sample> out;
  for (int64_t L : lengths) {
    const int64_t ctx_len = L - o.buffer - prompt_overhead - needle_tokens;
    if (ctx_len <= 0)
      Fail("needle: length ", L, " leaves no room for a haystack (buffer ", o.buffer, ", prompt ",
           prompt_overhead, ", needle ", needle_tokens, " tokens)");
    const std::vector<int32_t> ctx(hay.begin(), hay.begin() + ctx_len);
    for (double depth : depths) {
      int64_t p = ctx_len;
      if (depth < 100.0) {
        p = static_cast<int64_t>(static_cast<double>(ctx_len) * depth / 100.0);
        // Back up to a sentence boundary: the token before the needle ends with a period.
        while (p > 0) {
          const std::string prev = tok.Decode({ctx[p - 1]});
          if (!prev.empty() && prev.back() == '.') break;
          --p;
        }
      }
      Sample s;
      s.id = static_cast<int64_t>(out.size());
      s.context = tok.Decode(std::vector<int32_t>(ctx.begin(), ctx.begin() + p)) + o.needle +
                  tok.Decode(std::vector<int32_t>(ctx.begin() + p, ctx.end()));
      s.input = o.question;
      s.answer = o.keywords;
      s.depth = depth / 100.0;
      s.target_tokens = L;
      out.push_back(std::move(s));
    }
  }
  return out;
}

}  // namespace needle::datasets
