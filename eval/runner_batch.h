// needle eval --batch N: a configuration's samples decoded together (dense, sparse on the CPU, or
// sparse on a GPU in the Engine's slots)
// (issue 19's continuous batching), submitted to the Engine (engine/runtime/engine.h: one KV
// BlockPool, blocks taken as samples grow, preemption by swapping, prompt prefixes shared,
// Model::ForwardBatch). A sample's result is appended the moment it stops, like a sample run alone,
// with the same answer. (Its decode tok/s is its own wall-clock rate, which includes the steps it
// shared and the other samples' prefills meanwhile: the batch's throughput is the run's, not a
// sample's.)
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

// Runs `todo` with up to opt.batch samples at once (dense; sparse on the CPU, each sample with a
// planner of its own; sparse on a GPU, each in the Engine's slots: the hybrid engine's caches of
// its own, not with --attn-recall). prompt_ids: a sample's tokens;
// record: called once per finished sample, in the order they finish.
// The mean over layers of a sparse planner's recall (--attn-recall), -1 when never measured.
double MeanRecall(const SparseAttention& sp);

void RunBatched(Model& model, const Tokenizer& tok, ThreadingContext& tc, const std::string& task,
                const EvalConfig& cfg, const std::vector<const datasets::Sample*>& todo,
                const RunnerOptions& opt, int64_t max_new,
                const std::function<std::vector<int32_t>(const datasets::Sample&)>& prompt_ids,
                const std::function<void(EvalResult, const datasets::Sample&)>& record);

}  // namespace needle::eval
