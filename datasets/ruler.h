// RULER's needle-in-a-haystack tasks (scripts/data/synthetic/niah.py; formats quoted in
// ../shared/reference/eval_datasets.md): niah_single_1/2/3, niah_multikey_1/2/3,
// niah_multivalue, niah_multiquery, with noise, essay and needle haystacks, word / 7-digit number
// / UUID keys and values, the 40-point depth grid for essays, and the haystack size found by
// binary search so that prompt + answer prefix + 128 generated tokens fit the target length in
// the model's tokens. Substitutions (documented): word keys are "adjective-noun" pairs from
// WordNet's common lemmas (Debian wordnet-base) instead of Python wonderwords' lists; essays are
// the haystack text needle uses (the Jargon File by default) split into sentences at ". ".
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "datasets/infinitebench.h"

namespace needle::datasets {

struct RulerTask {
  std::string haystack;              // noise, essay, needle
  std::string key_type, value_type;  // words, numbers, uuids
  int k = 1, v = 1, q = 1;           // keys inserted, values per key, keys queried
};

bool IsRulerTask(const std::string& name);
RulerTask RulerTaskSpec(const std::string& name);  // throws naming the task
constexpr int64_t kRulerMaxNewTokens = 128;

// The prompt for a sample (context = haystack with needles, input = the query keys) and its
// answer prefix, with the singular rewording of q * v == 1 tasks.
std::string RulerTaskPrompt(const std::string& name, const std::string& context,
                            const std::string& query);
std::string RulerAnswerPrefix(const std::string& name, const std::string& query);

// "One of the special magic {values} for {key} is: {value}." (plural type name, as in RULER).
std::string RulerNeedle(const std::string& name, const std::string& key, const std::string& value);
// "A", "A and B", "A, B, C, and D".
std::string RulerQuery(const std::vector<std::string>& keys);

struct WordLists {
  std::vector<std::string> adjectives, nouns;
};
// Common adjectives and nouns from WordNet index files (dir: /usr/share/wordnet by default).
WordLists LoadWordLists(const std::string& wordnet_dir = "/usr/share/wordnet");

// samples samples of `name` at `target` tokens; count: tokens of prompt + answer prefix.
std::vector<Sample> GenerateRuler(const std::string& name, int64_t target, int64_t samples,
                                  uint64_t seed, const TokenCounter& count,
                                  const std::string& essay, const WordLists& words);

}  // namespace needle::datasets
