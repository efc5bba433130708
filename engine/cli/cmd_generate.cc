// needle generate: greedy generation from token ids (the tokenizer issue adds text prompts).
#include <sys/stat.h>

#include <cstdio>
#include <iostream>
#include <sstream>

#include "engine/backend/backend.h"
#include "engine/base/error.h"
#include "engine/cli/commands.h"
#include "engine/cli/options.h"
#include "engine/model/generate.h"
#include "engine/model/model.h"

namespace needle {

namespace {

std::vector<int32_t> ParseIds(const std::string& s) {
  std::vector<int32_t> ids;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t pos = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &pos);
    } catch (...) {
      pos = 0;
    }
    if (item.empty() || pos != item.size() || v < 0 || v > INT32_MAX)
      Fail("--prompt-ids: '", item,
           "' is not a token id (expected comma-separated non-negative integers)");
    ids.push_back(static_cast<int32_t>(v));
  }
  return ids;
}

bool IsDir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace

int CmdGenerate(int argc, char** argv) {
  Options opt(
      "needle generate",
      "Runs a model on a prompt of token ids with greedy decoding; prints the new ids on stdout\n"
      "(comma-separated, as they are produced) and the timing on stderr.",
      {
          {"model", 'm', OptKind::kString, "",
           "model folder (config.json + model.safetensors[.index.json])"},
          {"prompt-ids", 0, OptKind::kString, "",
           "prompt as comma-separated token ids, e.g. 1,2,3"},
          {"max-new-tokens", 'n', OptKind::kInt, "16", "maximum number of tokens to generate"},
          {"threads", 't', OptKind::kInt, "0", "CPU threads (0: all hardware threads)"},
          {"ctx-size", 'c', OptKind::kInt, "0",
           "KV cache capacity in tokens (0: prompt + max-new-tokens)"},
          {"kv-type", 0, OptKind::kString, "auto",
           "KV cache type: auto (the weights' type), f32, f16, bf16, int8"},
          {"ubatch", 0, OptKind::kInt, "512", "prompt tokens per forward step"},
          {"dummy-weights", 0, OptKind::kFlag, "",
           "random weights of config.json's shapes (no safetensors needed)"},
          {"dummy-type", 0, OptKind::kString, "bf16",
           "weight type of --dummy-weights: f32, f16, bf16"},
          {"reference-kernels", 0, OptKind::kFlag, "",
           "use the scalar reference kernels (slow; for checking)"},
      });
  if (!opt.Parse(argc, argv)) {
    std::cout << opt.Help();
    return 0;
  }
  const std::string model_path = opt.Str("model");
  if (model_path.empty()) Fail("needle generate: --model is required");
  if (opt.Str("prompt-ids").empty()) Fail("needle generate: --prompt-ids is required");
  const std::vector<int32_t> prompt = ParseIds(opt.Str("prompt-ids"));
  const int64_t max_new = opt.Int("max-new-tokens");
  if (max_new < 0) Fail("--max-new-tokens must not be negative (got ", max_new, ")");
  if (opt.Int("threads") < 0) Fail("--threads must not be negative (got ", opt.Int("threads"), ")");
  if (opt.Int("ubatch") <= 0) Fail("--ubatch must be positive (got ", opt.Int("ubatch"), ")");

  ThreadingContext tc(static_cast<int>(opt.Int("threads")));
  auto backend = MakeCpuBackend(tc, opt.Flag("reference-kernels"));
  std::unique_ptr<Model> model;
  if (opt.Flag("dummy-weights")) {
    const std::string cfg = IsDir(model_path) ? model_path + "/config.json" : model_path;
    model =
        MakeDummyModel(cfg, ParseFloatDType(opt.Str("dummy-type"), "--dummy-type"), *backend, tc);
  } else {
    model = LoadModel(model_path, *backend);
  }
  model->set_ubatch(opt.Int("ubatch"));
  const ModelConfig& cfg = model->config();

  int64_t ctx = opt.Int("ctx-size");
  const int64_t need = static_cast<int64_t>(prompt.size()) + max_new;
  if (ctx == 0) ctx = need;
  if (ctx < need)
    Fail("--ctx-size ", ctx, " is smaller than the prompt (", prompt.size(),
         " tokens) plus --max-new-tokens (", max_new, ")");
  const std::string kvs = opt.Str("kv-type");
  const DType kv_type = kvs == "auto" ? model->weights().dtype : ParseKVType(kvs, "--kv-type");
  KVCache cache(model->CacheShape(ctx, kv_type));

  std::fprintf(stderr,
               "needle: %s, %lld layers, %s weights, KV cache %lld tokens x %zu bytes (%s), %d "
               "threads, %s kernels\n",
               cfg.architecture.c_str(), static_cast<long long>(cfg.num_layers),
               DTypeName(model->weights().dtype), static_cast<long long>(ctx),
               cache.shape().BytesPerToken(), KVTypeName(kv_type), tc.threads(), backend->Name());
  bool first = true;
  GenerateStats st;
  GenerateGreedy(
      *model, cache, prompt, max_new,
      [&](int32_t id) {
        std::printf(first ? "%d" : ",%d", id);
        std::fflush(stdout);
        first = false;
      },
      &st);
  std::printf("\n");
  std::fflush(stdout);
  const double decode_tps = st.new_tokens > 1 ? (st.new_tokens - 1) / st.decode_seconds : 0.0;
  std::fprintf(stderr,
               "needle: prompt %lld tokens, prefill %.1f tok/s (%.3f s); generated %lld tokens, "
               "decode %.2f tok/s%s\n",
               static_cast<long long>(st.prompt_tokens), st.prompt_tokens / st.prefill_seconds,
               st.prefill_seconds, static_cast<long long>(st.new_tokens), decode_tps,
               st.stopped_at_eos ? " (stopped at EOS)" : "");
  return 0;
}

}  // namespace needle
