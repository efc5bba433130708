// Options shared by every subcommand that runs a model: threads, context, KV cache, attention
// (dense or block-sparse with all its settings) and the attention diagnostics. Declared once
// here; each subcommand appends them to its own table.
#pragma once

#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/cli/options.h"
#include "engine/model/model.h"
#include "engine/model/sampling.h"
#include "engine/runtime/sequence_attention.h"
#include "engine/tokenizer/chat_template.h"
#include "sparse_attn/sparse_attention.h"

namespace needle {

std::vector<OptionSpec> RunOptionSpecs();

// --chat-template, for the subcommands that format chats (generate --chat, serve), and the
// family it picks for a model folder: the one --chat-template names, else the folder's own
// (tokenizer_config.json), with its bos and eos tokens.
OptionSpec ChatTemplateSpec();
ChatFamily ChatFamilyFromOptions(const Options& opt, const std::string& model_dir, std::string* bos,
                                 std::string* eos);

// The sampling options of the subcommands that generate text (generate, ask): --temperature,
// --top-k, --top-p, --min-p, --repetition-penalty, --seed; and the SamplingParams they give
// (validated: an Error names the setting).
std::vector<OptionSpec> SamplingSpecs();
SamplingParams SamplingFromOptions(const Options& opt);

// Everything a run needs besides the prompt: built from the options and the loaded model.
struct RunSetup {
  std::unique_ptr<ThreadingContext> tc;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::unique_ptr<KVCache> cache;           // the model's (engine/runtime/sequence_attention.h)
  std::unique_ptr<AttentionPolicy> policy;  // null for dense attention
  SparseAttention* sparse = nullptr;        // the sparse planner in policy; null for dense
  std::unique_ptr<std::ofstream> plan_file;
  DType kv_type = DType::kF32;
  SparseConfig sparse_cfg;
};

// Parses and validates the run options (refusing impossible combinations with a message that
// names them) and returns the sparse settings; called before any model is loaded.
// attention: the attention value to check against (default: the --attention option).
SparseConfig SparseConfigFromOptions(const Options& opt, const std::string* attention = nullptr);
// The limits every subcommand that runs a model validates the same way: --threads (>= 0),
// --ubatch (>= 0; 0: ResolveUbatch's default) and --kv-memory (a size; 0 when unset: the
// memory's available bytes).
struct RunLimits {
  int threads = 0;
  int64_t ubatch = 0;
  size_t kv_memory = 0;
  size_t gpu_memory = 0;                       // --gpu-memory (0: the GPU's free memory)
  KVPlacement placement = KVPlacement::kAuto;  // --kv-placement
};
RunLimits RunLimitsFromOptions(const Options& opt);
// The prompt micro-batch: --ubatch, or with 0, 512 tokens on the CPU and 4096 on a GPU (its
// matrix products want more rows; the hybrid engine's host work per micro-batch is amortised:
// needle-tiny's 1M prompt in 4-5 s instead of 16-18 s on the H200). A multiple of the default
// --prefill-chunk either way, so that a sparse prefill's chunks, and so its plan, are the same.
int64_t ResolveUbatch(int64_t ubatch, Backend& b);
// Loads the model (or dummy weights), sizes the KV cache for `ctx` tokens and installs the
// attention policy. sequence == false: the model alone (no cache, no policy: an Engine makes
// them per sequence); ctx then only checks that a sequence of ctx tokens fits the GPU budget.
RunSetup MakeRunSetup(const Options& opt, int64_t ctx, bool sequence = true);
// MakeRunSetup's second half, for a setup made with sequence == false: the cache of a ctx-token
// sequence and its attention policy, installed in the model (--dump-plan's sink too).
void AttachSequence(const Options& opt, RunSetup& rs, int64_t ctx);
// The model --model names, or with --dummy-weights random weights of its config.json's shapes
// (--dummy-type; progress on stderr). fits: checked before the weights are uploaded.
std::unique_ptr<Model> LoadModelFromOptions(const Options& opt, Backend& backend,
                                            ThreadingContext& tc,
                                            const BeforeUpload& fits = nullptr);
// The backend that --device names: cpu, cuda / cuda:N, or auto (cuda when a GPU exists and the
// run needs neither sparse attention nor the reference kernels, which are CPU-only).
std::unique_ptr<Backend> MakeBackend(const std::string& device, const Options& opt,
                                     ThreadingContext& tc);
// Applies one sparse setting by its flag name ("topk", "local-window", "repr", ...) to c; throws
// naming the flag for unknown names or bad values. Used for --set sweeps.
void ApplySparseSetting(SparseConfig* c, const std::string& flag, const std::string& value);
// "needle: attention recall per layer: ..." on stderr, when --attn-recall is on.
void PrintRecall(const RunSetup& rs);
// "needle: hybrid decode, ..." on stderr for a run on the hybrid engine (nothing otherwise): per
// decode step, where the host's time went (HybridStats) and which side attended the Context
// blocks: the GPU's part, of it the blocks already in GPU memory, and the blocks copied there in
// the background (docs/ARCHITECTURE.md, the GPU block cache).
void PrintHybridSplit(RunSetup& rs);
// What a run does with positions past the model's trained length (max_position_embeddings) when
// its context of ctx tokens goes beyond it: one line for stderr, or "" within it. sparse: the
// sparse settings of the run (nullptr: dense attention).
std::string LongContextNote(const ModelConfig& m, int64_t ctx, const SparseConfig* sparse);

}  // namespace needle
