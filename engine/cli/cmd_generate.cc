// needle generate: a prompt (text, a file, or token ids) in, the continuation streamed out.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "engine/base/error.h"
#include "engine/base/mapped_file.h"
#include "engine/cli/commands.h"
#include "engine/cli/options.h"
#include "engine/cli/parse_util.h"
#include "engine/cli/run_options.h"
#include "engine/cli/text_stream.h"
#include "engine/model/generate.h"
#include "engine/model/model.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"

namespace needle {

int CmdGenerate(int argc, char** argv) {
  std::vector<OptionSpec> specs = {
      {"prompt", 'p', OptKind::kString, "", "prompt text"},
      {"file", 'f', OptKind::kString, "", "read the prompt text from FILE"},
      {"prompt-ids", 0, OptKind::kString, "",
       "prompt as comma-separated token ids, e.g. 1,2,3 (no tokenizer needed)"},
      {"chat", 0, OptKind::kFlag, "",
       "format the prompt as a user turn with the model's chat template"},
      ChatTemplateSpec(),
      {"system", 0, OptKind::kString, "", "system message for --chat"},
      {"max-new-tokens", 'n', OptKind::kInt, "256", "maximum number of tokens to generate"},
      {"stop", 0, OptKind::kString, "", "stop when the output contains this string"},
      {"ignore-eos", 0, OptKind::kFlag, "", "do not stop at the model's EOS ids"},
      {"truncate", 0, OptKind::kString, "none",
       "prompt longer than the context: none (error) or middle (keep head and tail)"},
  };
  for (auto& o : SamplingSpecs()) specs.push_back(o);
  for (auto& o : RunOptionSpecs()) specs.push_back(o);
  Options opt("needle generate",
              "Runs a model on a prompt and streams the continuation to stdout (token ids with\n"
              "--prompt-ids); prefill progress and speed go to stderr.",
              specs);
  if (!opt.Parse(argc, argv)) {
    if (opt.Flag("help")) std::cout << opt.Help();
    return 0;
  }
  SparseConfigFromOptions(opt);  // refuse bad settings before loading anything
  const SamplingParams sp = SamplingFromOptions(opt);
  const std::string trunc = opt.Str("truncate");
  if (trunc != "none" && trunc != "middle") Fail("--truncate: '", trunc, "' is not none or middle");
  if (opt.Str("model").empty()) Fail("needle generate: --model is required");
  // Settings that would otherwise be silently ignored.
  for (const char* o : {"system", "chat-template"})
    if (opt.IsSet(o) && !opt.Flag("chat")) Fail("--", o, " only applies with --chat");
  if (!opt.Str("prompt-ids").empty())
    for (const char* o : {"chat", "stop"})
      if (opt.IsSet(o))
        Fail("--", o, " needs a text prompt (--prompt or --file), not --prompt-ids");
  const int given =
      !opt.Str("prompt").empty() + !opt.Str("file").empty() + !opt.Str("prompt-ids").empty();
  if (given != 1) Fail("needle generate: give exactly one of --prompt, --file and --prompt-ids");
  int64_t max_new = opt.Int("max-new-tokens");
  if (max_new < 0) Fail("--max-new-tokens must not be negative (got ", max_new, ")");

  // The prompt as ids.
  std::unique_ptr<Tokenizer> tok;
  std::vector<int32_t> prompt;
  const std::string model_dir = opt.Str("model");
  if (!opt.Str("prompt-ids").empty()) {
    prompt = ParseIdList(opt.Str("prompt-ids"), "--prompt-ids");
  } else {
    tok = Tokenizer::Load(model_dir + "/tokenizer.json");
    const std::string text =
        opt.Str("file").empty() ? opt.Str("prompt") : ReadTextFile(opt.Str("file"));
    if (opt.Flag("chat")) {
      std::string bos, eos;
      const ChatFamily fam = ChatFamilyFromOptions(opt, model_dir, &bos, &eos);
      if (fam == ChatFamily::kNone)
        std::fprintf(stderr,
                     "needle: warning: no known chat template for %s; using the raw prompt\n",
                     model_dir.c_str());
      std::vector<ChatMessage> msgs;
      if (!opt.Str("system").empty()) msgs.push_back({"system", opt.Str("system")});
      msgs.push_back({"user", text});
      prompt = tok->Encode(FormatChat(fam, msgs, bos, eos), false);
    } else {
      prompt = tok->Encode(text, true);
    }
  }
  if (prompt.empty()) Fail("needle generate: the prompt is empty");

  // Context: --ctx-size, else the model's own limit; the prompt must leave room for the answer.
  ModelConfig cfg_peek =
      opt.Flag("dummy-weights") ? ModelConfig{} : LoadModelConfig(model_dir + "/config.json");
  int64_t limit = opt.Int("ctx-size");
  if (limit == 0)
    limit = cfg_peek.max_position_embeddings > 0 ? cfg_peek.max_position_embeddings
                                                 : static_cast<int64_t>(prompt.size()) + max_new;
  // An explicit --max-new-tokens must fit; the default one shrinks to what the context leaves.
  if (!opt.IsSet("max-new-tokens"))
    max_new = std::max<int64_t>(1, std::min(max_new, limit - static_cast<int64_t>(prompt.size())));
  const int64_t room = limit - max_new;
  if (static_cast<int64_t>(prompt.size()) > room) {
    if (trunc != "middle" || room < 2)
      Fail("the prompt has ", prompt.size(), " tokens but the context of ", limit,
           " tokens leaves room for ", std::max<int64_t>(room, 0), " after --max-new-tokens ",
           max_new, "; use --truncate middle, a larger --ctx-size or a smaller --max-new-tokens");
    const int64_t head = room / 2, tail = room - head;
    std::vector<int32_t> cut(prompt.begin(), prompt.begin() + head);
    cut.insert(cut.end(), prompt.end() - tail, prompt.end());
    std::fprintf(stderr, "needle: prompt truncated in the middle from %zu to %zu tokens\n",
                 prompt.size(), cut.size());
    prompt = std::move(cut);
  }
  const int64_t ctx = std::min(limit, static_cast<int64_t>(prompt.size()) + max_new);
  RunSetup rs = MakeRunSetup(opt, ctx);
  const ModelConfig& cfg = rs.model->config();
  if (opt.Flag("ignore-eos")) rs.model->set_eos_token_ids({});
  if (const std::string note =
          LongContextNote(cfg, ctx, opt.Str("attention") == "sparse" ? &rs.sparse_cfg : nullptr);
      !note.empty())
    std::fprintf(stderr, "%s\n", note.c_str());
  std::fprintf(stderr,
               "needle: %s, %lld layers, %s weights, %d threads, %s kernels, %s attention\n",
               cfg.architecture.c_str(), static_cast<long long>(cfg.num_layers),
               DTypeName(rs.model->weights().dtype), rs.tc->threads(), rs.backend->Name(),
               opt.Str("attention").c_str());
  ProgressBar bar;
  rs.model->set_progress([&](int64_t done, int64_t total) { bar.Update(done, total); });

  std::unique_ptr<StopStream> out =
      tok ? std::make_unique<StopStream>(*tok, opt.Str("stop")) : nullptr;
  bool first = true;
  GenerateStats st;
  Generate(
      *rs.model, *rs.cache, prompt, max_new, sp,
      [&](int32_t id) {
        rs.model->set_progress(nullptr);
        if (out) return out->Push(id);
        std::printf("%s%d", first ? "" : ",", id);  // --prompt-ids: the ids
        std::fflush(stdout);
        first = false;
        return true;
      },
      &st);
  if (out)
    out->Finish();
  else
    std::printf("\n"), std::fflush(stdout);
  const bool stopped = out && out->stopped();
  const double decode_tps = st.new_tokens > 1 ? (st.new_tokens - 1) / st.decode_seconds : 0.0;
  std::fprintf(stderr,
               "needle: prompt %lld tokens, prefill %.1f tok/s (%.3f s); generated %lld tokens, "
               "decode %.2f tok/s%s\n",
               static_cast<long long>(st.prompt_tokens), st.prompt_tokens / st.prefill_seconds,
               st.prefill_seconds, static_cast<long long>(st.new_tokens), decode_tps,
               st.stopped_at_eos ? " (stopped at EOS)"
               : stopped         ? " (stopped at the stop string)"
                                 : "");
  PrintRecall(rs);
  PrintHybridSplit(rs);
  return 0;
}

}  // namespace needle
