// needle generate: greedy generation from token ids (the tokenizer issue adds text prompts).
#include <sys/stat.h>

#include <cstdio>
#include <iostream>
#include <sstream>

#include "engine/backend/backend.h"
#include "engine/base/error.h"
#include "engine/cli/commands.h"
#include "engine/cli/options.h"
#include "engine/cli/run_options.h"
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

}  // namespace

int CmdGenerate(int argc, char** argv) {
  std::vector<OptionSpec> specs = {
      {"prompt-ids", 0, OptKind::kString, "", "prompt as comma-separated token ids, e.g. 1,2,3"},
      {"max-new-tokens", 'n', OptKind::kInt, "16", "maximum number of tokens to generate"},
  };
  for (auto& o : RunOptionSpecs()) specs.push_back(o);
  Options opt(
      "needle generate",
      "Runs a model on a prompt of token ids with greedy decoding; prints the new ids on stdout\n"
      "(comma-separated, as they are produced) and the timing on stderr.",
      specs);
  if (!opt.Parse(argc, argv)) {
    std::cout << opt.Help();
    return 0;
  }
  SparseConfigFromOptions(opt);  // refuse bad settings before loading anything
  if (opt.Str("model").empty()) Fail("needle generate: --model is required");
  if (opt.Str("prompt-ids").empty()) Fail("needle generate: --prompt-ids is required");
  const std::vector<int32_t> prompt = ParseIds(opt.Str("prompt-ids"));
  const int64_t max_new = opt.Int("max-new-tokens");
  if (max_new < 0) Fail("--max-new-tokens must not be negative (got ", max_new, ")");
  int64_t ctx = opt.Int("ctx-size");
  const int64_t need = static_cast<int64_t>(prompt.size()) + max_new;
  if (ctx == 0) ctx = need;
  if (ctx < need)
    Fail("--ctx-size ", ctx, " is smaller than the prompt (", prompt.size(),
         " tokens) plus --max-new-tokens (", max_new, ")");
  RunSetup rs = MakeRunSetup(opt, ctx);
  const ModelConfig& cfg = rs.model->config();
  std::fprintf(stderr,
               "needle: %s, %lld layers, %s weights, %d threads, %s kernels, %s attention\n",
               cfg.architecture.c_str(), static_cast<long long>(cfg.num_layers),
               DTypeName(rs.model->weights().dtype), rs.tc->threads(), rs.backend->Name(),
               opt.Str("attention").c_str());
  bool first = true;
  GenerateStats st;
  GenerateGreedy(
      *rs.model, *rs.cache, prompt, max_new,
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
  PrintRecall(rs);
  return 0;
}

}  // namespace needle
