// InfiniteBench's synthetic retrieval tasks, generated the way data/construct_synthetic_dataset.py
// builds them (formats quoted in ../shared/reference/eval_datasets.md): passkey and number_string
// hide a needle line among repeated noise lines at a swept line depth; kv_retrieval serialises a
// JSON dictionary of random UUID pairs and asks for the value of the pair at a swept position.
// Lengths are counted in the evaluated model's tokens over the whole prompt (open-model template
// with its answer prefix), by binary search on the haystack size. Same seed, same bytes.
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace needle::datasets {

struct Sample {
  int64_t id = 0;
  std::string context, input;
  std::vector<std::string> answer;  // released files: a one-element list
  double depth = 0;                 // needle position / haystack size, in [0, 1]
  int64_t target_tokens = 0;
  // Set for samples read from RULER's files, whose `input` is already the whole prompt: the text
  // run as is (answer prefix included), instead of a template filled with context and input.
  std::string prompt;
};

// Tokens of a full prompt, as the evaluated model counts them.
using TokenCounter = std::function<int64_t(const std::string&)>;

bool IsInfiniteBenchTask(const std::string& task);  // passkey, number_string, kv_retrieval
// The open-model prompt (yarn_mistral_templates): preamble, context, question, answer prefix.
std::string InfiniteBenchPrompt(const std::string& task, const std::string& context,
                                const std::string& input);
int64_t InfiniteBenchMaxNewTokens(const std::string& task);  // 6, 12, 50
// The answer prefix that InfiniteBenchPrompt ends with ("" for kv_retrieval).
std::string InfiniteBenchAnswerPrefix(const std::string& task);

// n_depths depths evenly from 0 to 1 (a single one is 0.5), samples_per_depth each.
std::vector<Sample> GenerateInfiniteBench(const std::string& task, int64_t target_tokens,
                                          int64_t n_depths, int64_t samples_per_depth,
                                          uint64_t seed, const TokenCounter& count);

// The pieces of the formats (also used by the training-data script's port, which a test compares).
extern const char* kNoiseLine;  // InfiniteBench / RULER noise line, newline included
std::string InfiniteBenchNeedle(const std::string& task,
                                const std::string& key);  // passkey, number_string
std::string InfiniteBenchQuestion(const std::string& task);
std::string KvContext(const std::vector<std::pair<std::string, std::string>>& pairs);
std::string KvInput(const std::string& key);

// Deterministic helpers, exposed for tests.
std::string RandomDigits(std::mt19937_64& rng, int n);
std::string NumberStringKey(std::mt19937_64& rng);  // 5 digits, then 5 duplications
std::string RandomUuid4(std::mt19937_64& rng);      // lowercase 8-4-4-4-12, version 4, variant 10xx

}  // namespace needle::datasets
