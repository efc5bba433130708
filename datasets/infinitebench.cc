#include "datasets/infinitebench.h"

#include <algorithm>
#include <cstdio>

#include "datasets/fit_search.h"
#include "engine/base/error.h"

namespace needle::datasets {

namespace {

std::string Repeat(const std::string& s, int64_t n) {
  std::string out;
  out.reserve(s.size() * static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) out += s;
  return out;
}

// One stream per (seed, task, length, depth, sample): inserting samples never shifts others.
std::mt19937_64 StreamFor(uint64_t seed, const std::string& task, int64_t length, int64_t depth_i,
                          int64_t sample_i) {
  std::seed_seq seq{static_cast<uint32_t>(seed),
                    static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(std::hash<std::string>{}(task)&0xffffffffu),
                    static_cast<uint32_t>(length),
                    static_cast<uint32_t>(length >> 32),
                    static_cast<uint32_t>(depth_i),
                    static_cast<uint32_t>(sample_i)};
  return std::mt19937_64(seq);
}

double DepthOf(int64_t i, int64_t n) {
  return n <= 1 ? 0.5 : static_cast<double>(i) / static_cast<double>(n - 1);
}

}  // namespace

const char* kNoiseLine =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n";

std::string InfiniteBenchNeedle(const std::string& task, const std::string& key) {
  if (task == "passkey")
    return "The pass key is " + key + ". Remember it. " + key + " is the pass key.\n";
  return "The sequence of digits is " + key + ". Remember it. " + key +
         " is the sequence of digits.\n";
}

std::string InfiniteBenchQuestion(const std::string& task) {
  if (task == "passkey") return "What is the pass key?";
  if (task == "number_string") return "What is the sequence of digits?";
  return "";
}

std::string KvContext(const std::vector<std::pair<std::string, std::string>>& kv) {
  std::string c = "JSON data:\n{";
  for (size_t i = 0; i < kv.size(); ++i)
    c += (i ? ", \"" : "\"") + kv[i].first + "\": \"" + kv[i].second + "\"";
  return c + "}";
}

std::string KvInput(const std::string& key) {
  return "\nKey: \"" + key + "\"\nThe value associated with the specified key is: ";
}

bool IsInfiniteBenchTask(const std::string& t) {
  return t == "passkey" || t == "number_string" || t == "kv_retrieval";
}

std::string InfiniteBenchPrompt(const std::string& task, const std::string& context,
                                const std::string& input) {
  if (task == "passkey")
    return "There is an important info hidden inside a lot of irrelevant text. Find it and "
           "memorize it. I will quiz you "
           "about the important information.\n\n" +
           context + "\n\n" + input + "\n\nThe pass key is";
  if (task == "number_string")
    return "There is an important info hidden inside a lot of irrelevant text. Find it. I will "
           "quiz you about the "
           "important information there.\n\n" +
           context + "\n\n" + input + "\n\nThe sequence of digits is";
  if (task == "kv_retrieval")
    return "Extract the value corresponding to the specified key in the JSON object below.\n\n" +
           context + "\n\n" + input;
  Fail("unknown InfiniteBench task '", task, "' (expected passkey, number_string or kv_retrieval)");
}

std::string InfiniteBenchAnswerPrefix(const std::string& task) {
  if (task == "passkey") return "The pass key is";
  if (task == "number_string") return "The sequence of digits is";
  return "";
}

int64_t InfiniteBenchMaxNewTokens(const std::string& task) {
  return task == "passkey" ? 6 : task == "number_string" ? 12 : 50;
}

std::string RandomDigits(std::mt19937_64& rng, int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s.push_back(static_cast<char>('0' + rng() % 10));
  return s;
}

std::string NumberStringKey(std::mt19937_64& rng) {
  std::string k = RandomDigits(rng, 5);
  for (int i = 0; i < 5; ++i) {
    const size_t pos =
        static_cast<size_t>(rng() % static_cast<uint64_t>(5 + i));  // randint(0, 5+k-1)
    k.insert(k.begin() + static_cast<long>(pos), k[pos]);
  }
  return k;
}

std::string RandomUuid4(std::mt19937_64& rng) {
  uint8_t b[16];
  for (auto& x : b) x = static_cast<uint8_t>(rng() & 0xff);
  b[6] = static_cast<uint8_t>((b[6] & 0x0f) | 0x40);
  b[8] = static_cast<uint8_t>((b[8] & 0x3f) | 0x80);
  char out[37];
  std::snprintf(out, sizeof out,
                "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
                b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
                b[15]);
  return out;
}

std::vector<Sample> GenerateInfiniteBench(const std::string& task, int64_t target, int64_t n_depths,
                                          int64_t samples_per_depth, uint64_t seed,
                                          const TokenCounter& count) {
  if (!IsInfiniteBenchTask(task)) InfiniteBenchPrompt(task, "", "");  // throws naming the task
  if (n_depths <= 0 || samples_per_depth <= 0) Fail("data: depths and samples must be positive");
  std::vector<Sample> out;
  if (task == "kv_retrieval") {
    // Pairs that fit, measured on a probe dictionary (UUID pairs all tokenise alike in length).
    std::mt19937_64 probe = StreamFor(seed, task, target, -1, -1);
    std::vector<std::pair<std::string, std::string>> pool;
    auto tokens = [&](int64_t n) {
      while (static_cast<int64_t>(pool.size()) < n)
        pool.emplace_back(RandomUuid4(probe), RandomUuid4(probe));
      std::vector<std::pair<std::string, std::string>> kv(pool.begin(), pool.begin() + n);
      return count(InfiniteBenchPrompt(task, KvContext(kv), KvInput(kv[0].first)));
    };
    if (tokens(1) > target)
      Fail("data: kv_retrieval cannot fit even one pair in ", target, " tokens");
    const int64_t n_pairs = LargestFitting(1, target, tokens);
    for (int64_t di = 0; di < n_depths; ++di) {
      for (int64_t si = 0; si < samples_per_depth; ++si) {
        std::mt19937_64 rng = StreamFor(seed, task, target, di, si);
        std::vector<std::pair<std::string, std::string>> kv;
        for (int64_t i = 0; i < n_pairs; ++i) kv.emplace_back(RandomUuid4(rng), RandomUuid4(rng));
        const int64_t pos = std::min<int64_t>(
            n_pairs - 1,
            static_cast<int64_t>(DepthOf(di, n_depths) * static_cast<double>(n_pairs)));
        Sample s;
        s.id = static_cast<int64_t>(out.size());
        s.context = KvContext(kv);
        s.input = KvInput(kv[pos].first);
        s.answer = {kv[pos].second};
        s.depth = DepthOf(di, n_depths);  // the swept depth (the heatmap's row), not pos's
        s.target_tokens = target;
        out.push_back(std::move(s));
      }
    }
    return out;
  }
  // passkey / number_string: N noise lines with the needle line at line j.
  const std::string probe_needle =
      InfiniteBenchNeedle(task, task == "passkey" ? "00000" : "0000000000");
  auto tokens = [&](int64_t n) {
    return count(InfiniteBenchPrompt(task, probe_needle + Repeat(kNoiseLine, n),
                                     InfiniteBenchQuestion(task)));
  };
  if (tokens(0) > target)
    Fail("data: ", task, " does not fit in ", target, " tokens even without noise");
  const int64_t n_lines = LargestFitting(0, target, tokens);
  for (int64_t di = 0; di < n_depths; ++di) {
    const int64_t j =
        static_cast<int64_t>(DepthOf(di, n_depths) * static_cast<double>(n_lines) + 0.5);
    for (int64_t si = 0; si < samples_per_depth; ++si) {
      std::mt19937_64 rng = StreamFor(seed, task, target, di, si);
      const std::string key = task == "passkey" ? RandomDigits(rng, 5) : NumberStringKey(rng);
      Sample s;
      s.id = static_cast<int64_t>(out.size());
      s.context =
          Repeat(kNoiseLine, j) + InfiniteBenchNeedle(task, key) + Repeat(kNoiseLine, n_lines - j);
      s.input = InfiniteBenchQuestion(task);
      s.answer = {key};
      s.depth = DepthOf(di, n_depths);  // the swept depth; the needle line is the nearest one
      s.target_tokens = target;
      out.push_back(std::move(s));
    }
  }
  return out;
}

}  // namespace needle::datasets
