// Builds a task's samples from the dataset options (generated InfiniteBench, RULER or classic
// needle samples), and the exact prompt text a sample is run with. Shared by `needle eval` and
// `needle data`, so that exported datasets are the ones evaluated.
#pragma once

#include <string>
#include <vector>

#include "datasets/infinitebench.h"
#include "engine/cli/options.h"
#include "engine/tokenizer/tokenizer.h"
#include "eval/runner.h"

namespace needle::eval {

bool IsRunnableTask(const std::string& task);  // InfiniteBench, RULER NIAH, needle
std::string RunnableTasks();
// Bounds of the generated grid: depths per length, samples per (length, depth).
constexpr int64_t kMaxDepths = 1000, kMaxSamplesPerCell = 100000, kMaxLength = int64_t{1} << 24;
// From the options of DatasetOptionSpecs(): lengths, depths, samples, seed, haystack, ... Refuses
// an empty --lengths, lengths, depths or samples outside their bounds; warns about lengths above
// ro.context_limit (when set), whose prompts the runner cuts.
std::vector<datasets::Sample> MakeSamples(const std::string& task, const Tokenizer& tok,
                                          const RunnerOptions& ro, const Options& opt);
// The prompt text of a sample: the benchmark's raw template, or (chat models) the chat-formatted
// messages followed by the answer prefix. add_bos: whether the tokenizer's BOS should be added.
std::string PromptText(const std::string& task, const datasets::Sample& s, const RunnerOptions& ro,
                       bool* add_bos);

}  // namespace needle::eval
