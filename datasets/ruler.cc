#include "datasets/ruler.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <sstream>

#include "datasets/fit_search.h"
#include "engine/base/error.h"

namespace needle::datasets {

namespace {

const char* kNoiseSentence =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

struct Spec {
  const char* name;
  RulerTask t;
};
const Spec kTasks[] = {
    {"niah_single_1", {"noise", "words", "numbers", 1, 1, 1}},
    {"niah_single_2", {"essay", "words", "numbers", 1, 1, 1}},
    {"niah_single_3", {"essay", "words", "uuids", 1, 1, 1}},
    {"niah_multikey_1", {"essay", "words", "numbers", 4, 1, 1}},
    {"niah_multikey_2", {"needle", "words", "numbers", 1, 1, 1}},
    {"niah_multikey_3", {"needle", "uuids", "uuids", 1, 1, 1}},
    {"niah_multivalue", {"essay", "words", "numbers", 1, 4, 1}},
    {"niah_multiquery", {"essay", "words", "numbers", 1, 1, 4}},
};

void ReplaceAll(std::string* s, const std::string& from, const std::string& to) {
  for (size_t at = s->find(from); at != std::string::npos; at = s->find(from, at + to.size()))
    s->replace(at, from.size(), to);
}

// The template with {type} and {query} filled, reworded in the singular when q * v == 1.
std::string Reword(const RulerTask& t, std::string tmpl) {
  std::string type = t.value_type;  // plural: numbers, uuids, words
  if (t.q * t.v == 1) {
    ReplaceAll(&tmpl, "Some", "A");
    ReplaceAll(&tmpl, "are all", "is");
    ReplaceAll(&tmpl, "are", "is");
    ReplaceAll(&tmpl, "answers", "answer");
    type.pop_back();
  }
  ReplaceAll(&tmpl, "{type}", type);
  return tmpl;
}

std::string RandomValue(const std::string& type, std::mt19937_64& rng, const WordLists& w) {
  if (type == "numbers")
    return std::to_string(1000000 + rng() % 9000000);  // randint(10**6, 10**7 - 1)
  if (type == "uuids") return RandomUuid4(rng);
  if (w.adjectives.empty() || w.nouns.empty())
    Fail("RULER: word keys need word lists (install wordnet-base)");
  return w.adjectives[rng() % w.adjectives.size()] + "-" + w.nouns[rng() % w.nouns.size()];
}

std::vector<std::string> Sentences(const std::string& text) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(text);
  std::string word;
  while (in >> word) {  // whitespace collapsed, as RULER does
    cur += (cur.empty() ? "" : " ") + word;
    if (word.back() == '.' || word.back() == '?' || word.back() == '!')
      out.push_back(std::move(cur)), cur.clear();
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

}  // namespace

std::string RulerNeedle(const std::string& name, const std::string& key, const std::string& value) {
  return "One of the special magic " + RulerTaskSpec(name).value_type + " for " + key +
         " is: " + value + ".";
}

std::string RulerQuery(const std::vector<std::string>& keys) {
  if (keys.size() == 1) return keys[0];
  if (keys.size() == 2) return keys[0] + " and " + keys[1];
  std::string q;
  for (size_t i = 0; i < keys.size(); ++i)
    q += (i == 0 ? "" : i + 1 == keys.size() ? ", and " : ", ") + keys[i];
  return q;
}

bool IsRulerTask(const std::string& name) {
  for (const auto& s : kTasks)
    if (name == s.name) return true;
  return false;
}

RulerTask RulerTaskSpec(const std::string& name) {
  for (const auto& s : kTasks)
    if (name == s.name) return s.t;
  Fail("unknown RULER task '", name, "'");
}

std::string RulerTaskPrompt(const std::string& name, const std::string& context,
                            const std::string& query) {
  std::string p = Reword(
      RulerTaskSpec(name),
      "Some special magic {type} are hidden within the following text. Make sure to memorize it. I "
      "will quiz you about the {type} afterwards.\n{context}\nWhat are all the special magic "
      "{type} for "
      "{query} mentioned in the provided text?");
  ReplaceAll(&p, "{query}", query);
  const size_t at = p.find("{context}");
  return p.replace(at, 9, context);
}

std::string RulerAnswerPrefix(const std::string& name, const std::string& query) {
  std::string p =
      Reword(RulerTaskSpec(name),
             " The special magic {type} for {query} mentioned in the provided text are");
  ReplaceAll(&p, "{query}", query);
  return p;
}

WordLists LoadWordLists(const std::string& dir) {
  WordLists w;
  for (auto [file, out] :
       {std::pair<std::string, std::vector<std::string>*>{dir + "/index.adj", &w.adjectives},
        std::pair<std::string, std::vector<std::string>*>{dir + "/index.noun", &w.nouns}}) {
    std::ifstream in(file);
    if (!in)
      Fail(file, ": cannot open (install the Debian package wordnet-base, or give --wordnet)");
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == ' ') continue;  // licence header
      std::istringstream ls(line);
      std::string lemma, pos;
      int64_t synsets = 0, pointers = 0;
      ls >> lemma >> pos >> synsets >> pointers;
      std::string sym;
      for (int64_t i = 0; i < pointers; ++i) ls >> sym;
      int64_t senses = 0, tagged = 0;
      ls >> senses >> tagged;
      // Common plain words: tagged in the SemCor corpus, letters only, short.
      if (tagged >= 3 && lemma.size() <= 10 &&
          std::all_of(lemma.begin(), lemma.end(), [](char c) { return c >= 'a' && c <= 'z'; }))
        out->push_back(lemma);
    }
    std::sort(out->begin(), out->end());
  }
  return w;
}

std::vector<Sample> GenerateRuler(const std::string& name, int64_t target, int64_t n_samples,
                                  uint64_t seed, const TokenCounter& count,
                                  const std::string& essay, const WordLists& words) {
  const RulerTask t = RulerTaskSpec(name);
  const int k = std::max(t.k, t.q);
  const std::vector<std::string> essay_sents =
      t.haystack == "essay" ? Sentences(essay) : std::vector<std::string>{};
  if (t.haystack == "essay" && essay_sents.empty())
    Fail("RULER: ", name, " needs an essay haystack text");
  std::vector<Sample> out;
  for (int64_t si = 0; si < n_samples; ++si) {
    std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                      static_cast<uint32_t>(target), static_cast<uint32_t>(si),
                      static_cast<uint32_t>(std::hash<std::string>{}(name))};
    std::mt19937_64 rng(seq);
    // Keys, values and needles.
    std::vector<std::string> keys;
    std::vector<std::vector<std::string>> values;
    std::vector<std::string> needles;
    for (int i = 0; i < k; ++i) {
      keys.push_back(RandomValue(t.key_type, rng, words));
      values.emplace_back();
      for (int j = 0; j < t.v; ++j) {
        values.back().push_back(RandomValue(t.value_type, rng, words));
        needles.push_back(RulerNeedle(name, keys.back(), values.back().back()));
      }
    }
    std::shuffle(needles.begin(), needles.end(), rng);
    std::vector<int> qidx(static_cast<size_t>(k));
    std::iota(qidx.begin(), qidx.end(), 0);
    std::shuffle(qidx.begin(), qidx.end(), rng);
    qidx.resize(static_cast<size_t>(t.q));
    std::vector<std::string> qkeys;
    for (int qi : qidx) qkeys.push_back(keys[qi]);
    const std::string query = RulerQuery(qkeys);
    std::vector<std::string> answer;
    for (int qi : qidx) answer.insert(answer.end(), values[qi].begin(), values[qi].end());
    // The haystack for a size n (lines, or words for essays); needle positions drawn once per n.
    std::mt19937_64 hay_rng = rng;
    std::vector<std::string> fillers;  // needle haystack: distractor needles, drawn as needed
    auto build = [&](int64_t n) {
      std::mt19937_64 r = hay_rng;
      if (t.haystack == "essay") {
        // The first n words of the (repeated) essay, as sentences; needles at depths of the
        // 40-point grid.
        std::vector<std::string> sents;
        int64_t words_taken = 0;
        for (size_t i = 0; words_taken < n; i = (i + 1) % essay_sents.size()) {
          sents.push_back(essay_sents[i]);
          words_taken += 1 + std::count(essay_sents[i].begin(), essay_sents[i].end(), ' ');
        }
        std::vector<int> depths;
        for (int i = 0; i < 40; ++i)
          depths.push_back(static_cast<int>(std::round(100.0 * i / 39.0)));
        std::shuffle(depths.begin(), depths.end(), r);
        std::vector<int> chosen(depths.begin(), depths.begin() + static_cast<long>(needles.size()));
        std::sort(chosen.begin(), chosen.end());
        std::vector<std::string> parts;
        size_t prev = 0;
        for (size_t i = 0; i < chosen.size(); ++i) {
          const size_t at =
              static_cast<size_t>(static_cast<double>(sents.size()) * chosen[i] / 100.0);
          parts.insert(parts.end(), sents.begin() + static_cast<long>(prev),
                       sents.begin() + static_cast<long>(at));
          parts.push_back(needles[i]);
          prev = at;
        }
        parts.insert(parts.end(), sents.begin() + static_cast<long>(prev), sents.end());
        std::string s;
        for (const auto& p : parts) s += (s.empty() ? "" : " ") + p;
        return std::make_pair(s, chosen.empty() ? 0.0 : chosen[0] / 100.0);
      }
      std::vector<std::string> lines;
      for (int64_t i = 0; i < n; ++i) {
        if (t.haystack == "noise") {
          lines.push_back(kNoiseSentence);
        } else {
          while (static_cast<int64_t>(fillers.size()) <= i) {
            std::mt19937_64 fr(seed ^ (0x9e3779b97f4a7c15ull * (fillers.size() + 1)) ^
                               static_cast<uint64_t>(si));
            const std::string key = RandomValue(t.key_type, fr, words);
            fillers.push_back(RulerNeedle(name, key, RandomValue(t.value_type, fr, words)));
          }
          lines.push_back(fillers[i]);
        }
      }
      // Needles at distinct random line indices, in order.
      std::vector<int64_t> idx(static_cast<size_t>(n));
      std::iota(idx.begin(), idx.end(), 0);
      std::shuffle(idx.begin(), idx.end(), r);
      idx.resize(std::min<size_t>(needles.size(), idx.size()));
      std::sort(idx.begin(), idx.end());
      for (size_t i = idx.size(); i-- > 0;) lines.insert(lines.begin() + idx[i], needles[i]);
      std::string s;
      for (const auto& l : lines) s += (s.empty() ? "" : "\n") + l;
      return std::make_pair(
          s, idx.empty() || n == 0 ? 0.0 : static_cast<double>(idx[0]) / static_cast<double>(n));
    };
    auto tokens = [&](int64_t n) {
      const auto hs = build(n);
      return count(RulerTaskPrompt(name, hs.first, query) + RulerAnswerPrefix(name, query)) +
             kRulerMaxNewTokens;
    };
    if (tokens(t.haystack == "essay"
                   ? 1
                   : std::max<int64_t>(1, static_cast<int64_t>(needles.size()))) > target)
      Fail("RULER: ", name, " does not fit in ", target, " tokens");
    const auto hs = build(LargestFitting(1, target, tokens));
    Sample s;
    s.id = static_cast<int64_t>(out.size());
    s.context = hs.first;
    s.input = query;
    s.answer = answer;
    s.depth = hs.second;
    s.target_tokens = target;
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace needle::datasets
