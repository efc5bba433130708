// The evaluation runner: samples x configurations through the model, each result appended and
// flushed to RUN_DIR/predictions.jsonl as soon as it exists (a rerun resumes where the last one
// stopped), then RUN_DIR/summary.json and summary.md (task x length x configuration).
// (The summaries, the hashes and ResultKey are in eval/summary.cc; sharded runs and their merge in
// eval/shard.h.)
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "datasets/infinitebench.h"
#include "engine/model/model.h"
#include "engine/runtime/sequence_attention.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "sparse_attn/sparse_config.h"

namespace needle::eval {

struct EvalConfig {
  std::string name;  // e.g. "dense", "sparse topk=16"
  bool sparse = false;
  SparseConfig sparse_cfg;
};

struct EvalResult {
  std::string config, task;
  // What the answer depended on (RunSettings) and which sample it answered (SampleHash): a rerun
  // into the same run directory skips a sample only when both match.
  std::string settings, sample;
  int64_t id = 0, length = 0, prompt_tokens = 0;
  double depth = 0, score = 0, prefill_tps = 0, decode_tps = 0, recall = -1;
  std::string prediction;
  std::vector<std::string> answer;
};

struct RunnerOptions {
  std::string run_dir;
  std::string model_id;       // ModelIdentity(model folder)
  int64_t context_limit = 0;  // tokens; longer prompts are cut in the middle (InfiniteBench's rule)
  size_t kv_memory = 0;       // bytes a sample's KV cache may take (--kv-memory; 0: available)
  size_t gpu_memory = 0;      // sparse on a GPU: the hybrid engine's budget (0: free memory)
  KVPlacement placement = KVPlacement::kAuto;  // sparse on a GPU: --kv-placement
  int64_t ubatch = 512;  // prompt tokens per forward step (the model's --ubatch)
  DType kv_type = DType::kBF16;
  bool recall = false;
  // Sparse configurations: per layer, how often the answer's block was attended (its first
  // place in the prompt), on stderr and in RUN_DIR/needle_hits.jsonl.
  bool needle_hits = false;
  // Sparse configurations (--dump-plan FILE; "-": stderr): every decode step's plan of every
  // layer, one JSON line each ({"config", "task", "length", "id", "plan"}), appended to FILE as
  // each sample finishes.
  std::string dump_plan;
  // Chat models get the task prompt as a user turn, the answer prefix after the assistant tag.
  ChatFamily chat = ChatFamily::kNone;
  std::string bos, eos;
  // Dense configurations: samples decoded at once (runner_batch.h; 1: one after another).
  int64_t batch = 1;
};

// "FOLDER config.json:HASH": the model folder's absolute path and a hash of its config.json.
std::string ModelIdentity(const std::string& dir);
// Everything of a configuration that can change its answers: the model, the KV type, the context
// limit, the prompt format, greedy decoding, and the attention with every sparse setting.
std::string RunSettings(const EvalConfig& cfg, const RunnerOptions& opt);
// What identifies one result in a run directory: configuration, task, length and sample id.
std::string ResultKey(const std::string& config, const std::string& task, int64_t length,
                      int64_t id);
// A hash of the sample's task, text, answers, depth and length.
std::string SampleHash(const std::string& task, const datasets::Sample& s);
// 64-bit FNV-1a of s in hex: stable across builds and machines (std::hash is not promised to be).
std::string StableHash(const std::string& s);

// Runs every (config, sample) not already in run_dir/predictions.jsonl; returns all results
// (old and new). Writes the summary files at the end. Refuses (Error naming the file, the
// configuration and both settings) a run directory whose results of a configuration of the
// same name were made with other settings or other samples, and samples whose (length, id)
// repeat: results are never reused for what they did not answer.
std::vector<EvalResult> RunEval(Model& model, const Tokenizer& tok, ThreadingContext& tc,
                                const std::string& task,
                                const std::vector<datasets::Sample>& samples,
                                const std::vector<EvalConfig>& configs, const RunnerOptions& opt);

// The prompt ids of a sample (raw template, or chat messages for chat models), and the task's
// maximum new tokens (the originals': passkey 6, number_string 12, kv_retrieval 50, needle 300).
std::vector<int32_t> PromptIds(const std::string& task, const datasets::Sample& s,
                               const Tokenizer& tok, const RunnerOptions& opt);
int64_t MaxNewTokens(const std::string& task);

// summary.md: one row per (task, length, config) with accuracy x 100, mean tok/s and recall.
std::string SummaryMarkdown(const std::vector<EvalResult>& results);
// run_dir/summary.md, summary.json and (tasks that sweep the needle's depth) the heatmaps of
// each configuration, heatmap_<config>.png / .svg; each file replaced atomically.
void WriteRunSummaries(const std::string& task, const std::vector<EvalResult>& results,
                       const std::string& run_dir);

}  // namespace needle::eval
