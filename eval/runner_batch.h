// needle eval --batch N: a configuration's samples decoded together (dense, or sparse on the CPU)
// (issue 19's continuous batching). One KV BlockPool holds the running samples' caches; a sample
// joins as soon as the pool has the blocks of its whole prompt and answer (reserved when it joins,
// so a running sample never runs out of blocks and nothing is preempted: the pool is under-used
// while samples are short, the price of never recomputing or swapping), is prefilled alone, then
// decodes one token a step beside the others (Model::ForwardBatch) and leaves the moment it
// stops; its result is appended then, like a sample run alone, with the same answer. (Its
// decode tok/s is its own wall-clock rate, which includes the steps it shared and the other
// samples' prefills meanwhile: the batch's throughput is the run's, not a sample's.)
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "engine/model/generate.h"
#include "eval/runner.h"

namespace needle::eval {

// One finished sample's result (runner.cc): scores and rates from its text and stats.
EvalResult MakeResult(const std::string& task, const EvalConfig& cfg, const datasets::Sample& s,
                      const RunnerOptions& opt, int64_t prompt_tokens, const std::string& text,
                      const GenerateStats& st);

// Runs `todo` with up to opt.batch samples at once (dense, or sparse on the CPU: each sample
// with a planner of its own). prompt_ids: a sample's tokens;
// record: called once per finished sample, in the order they finish.
// The mean over layers of a sparse planner's recall (--attn-recall), -1 when never measured.
double MeanRecall(const SparseAttention& sp);

void RunBatched(Model& model, const Tokenizer& tok, ThreadingContext& tc, const std::string& task,
                const EvalConfig& cfg, const std::vector<const datasets::Sample*>& todo,
                const RunnerOptions& opt, int64_t max_new,
                const std::function<std::vector<int32_t>(const datasets::Sample&)>& prompt_ids,
                const std::function<void(EvalResult, const datasets::Sample&)>& record);

}  // namespace needle::eval
