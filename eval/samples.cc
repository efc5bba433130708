#include "eval/samples.h"

#include <algorithm>
#include <cstdio>

#include "datasets/niah.h"
#include "datasets/ruler.h"
#include "engine/base/error.h"
#include "engine/cli/parse_util.h"
#include "engine/tokenizer/chat_template.h"

namespace needle::eval {

bool IsRunnableTask(const std::string& t) {
  return datasets::IsInfiniteBenchTask(t) || datasets::IsRulerTask(t) || t == "needle";
}

std::string RunnableTasks() {
  return "passkey, number_string, kv_retrieval, niah_single_1/2/3, niah_multikey_1/2/3, "
         "niah_multivalue, "
         "niah_multiquery, needle";
}

namespace {
// Generating (and counting the tokens of) a long sample takes a while: one line per length from
// 32K tokens on, so that a long generation is never silent.
void Progress(const std::string& task, const std::vector<int64_t>& lengths, size_t i) {
  if (lengths[i] < 32768) return;
  std::fprintf(stderr, "needle: generating %s samples of %lld tokens (length %zu of %zu)\n",
               task.c_str(), static_cast<long long>(lengths[i]), i + 1, lengths.size());
}
}  // namespace

std::vector<datasets::Sample> MakeSamples(const std::string& task, const Tokenizer& tok,
                                          const RunnerOptions& ro, const Options& opt) {
  if (!IsRunnableTask(task)) Fail("unknown task '", task, "' (available: ", RunnableTasks(), ")");
  const std::vector<int64_t> lengths = ParseTokenLengths(opt.Str("lengths"), "--lengths");
  if (lengths.empty()) Fail("--lengths: no length given (examples: 4k, 8k,16k)");
  for (int64_t len : lengths) {
    if (len > kMaxLength)
      Fail("--lengths: ", len, " tokens is more than needle generates (at most ", kMaxLength,
           " tokens, 16m)");
    if (ro.context_limit > 0 && len > ro.context_limit)
      std::fprintf(stderr,
                   "needle: warning: --lengths %lld is above the context limit of %lld tokens "
                   "(--ctx-size, by default the model's max_position_embeddings): its prompts "
                   "will be cut in the middle; raise --ctx-size to evaluate the whole length\n",
                   static_cast<long long>(len), static_cast<long long>(ro.context_limit));
  }
  const int64_t depths = opt.Int("depths"), per = opt.Int("samples");
  if (depths < 1 || depths > kMaxDepths)
    Fail("--depths: ", depths, " is not between 1 and ", kMaxDepths);
  if (per < 1 || per > kMaxSamplesPerCell)
    Fail("--samples: ", per, " is not between 1 and ", kMaxSamplesPerCell);
  std::vector<datasets::Sample> out;
  if (task == "needle") {
    datasets::NiahOptions no;
    if (!opt.Str("needle-text").empty()) no.needle = "\n" + opt.Str("needle-text") + "\n";
    if (!opt.Str("question").empty()) no.question = opt.Str("question");
    if (!opt.Str("keywords").empty()) no.keywords = SplitComma(opt.Str("keywords"));
    const std::string spacing = opt.Str("depth-spacing");
    if (spacing != "linear" && spacing != "sigmoid")
      Fail("--depth-spacing: '", spacing, "' is not linear or sigmoid");
    const auto depth_list =
        spacing == "linear" ? datasets::LinearDepths(depths) : datasets::SigmoidDepths(depths);
    const std::vector<std::string> paths =
        opt.Str("haystack").empty() ? std::vector<std::string>{datasets::kDefaultHaystack}
                                    : SplitComma(opt.Str("haystack"));
    datasets::Sample probe;
    probe.input = no.question;
    const int64_t overhead = static_cast<int64_t>(PromptIds(task, probe, tok, ro).size());
    const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
    if (longest >= 32768)
      std::fprintf(stderr, "needle: generating %s samples at %zu lengths up to %lld tokens\n",
                   task.c_str(), lengths.size(), static_cast<long long>(longest));
    out = datasets::GenerateNiah(tok, datasets::LoadHaystack(paths), lengths, depth_list, overhead,
                                 no);
  } else if (datasets::IsRulerTask(task)) {
    // Counted as the model will see it: in its chat template when it has one.
    const auto count = [&](const std::string& s) {
      if (ro.chat == ChatFamily::kNone) return static_cast<int64_t>(tok.Encode(s, true).size());
      return static_cast<int64_t>(
          tok.Encode(FormatChat(ro.chat, {{"user", s}}, ro.bos, ro.eos), false).size());
    };
    std::string essay;
    if (datasets::RulerTaskSpec(task).haystack == "essay")
      essay = datasets::LoadHaystack(opt.Str("haystack").empty()
                                         ? std::vector<std::string>{datasets::kDefaultHaystack}
                                         : SplitComma(opt.Str("haystack")));
    const datasets::WordLists words = datasets::LoadWordLists(opt.Str("wordnet"));
    for (size_t i = 0; i < lengths.size(); ++i) {
      Progress(task, lengths, i);
      for (auto& s : datasets::GenerateRuler(
               task, lengths[i], per, static_cast<uint64_t>(opt.Int("seed")), count, essay, words))
        out.push_back(std::move(s));
    }
  } else {
    const auto count = [&](const std::string& s) {
      return static_cast<int64_t>(tok.Encode(s, true).size());
    };
    for (size_t i = 0; i < lengths.size(); ++i) {
      Progress(task, lengths, i);
      for (auto& s : datasets::GenerateInfiniteBench(task, lengths[i], depths, per,
                                                     static_cast<uint64_t>(opt.Int("seed")), count))
        out.push_back(std::move(s));
    }
  }
  return out;
}

std::string PromptText(const std::string& task, const datasets::Sample& s, const RunnerOptions& ro,
                       bool* add_bos) {
  // Raw models: the benchmark's raw template (answer prefix included), BOS from the tokenizer.
  // Chat models: the same request as chat messages, the answer prefix after the assistant tag.
  if (!s.prompt.empty()) {  // a RULER file's own prompt, template and all
    *add_bos = true;
    return s.prompt;
  }
  *add_bos = ro.chat == ChatFamily::kNone;
  std::vector<ChatMessage> msgs;
  std::string prefix;
  if (datasets::IsRulerTask(task)) {
    const std::string body = datasets::RulerTaskPrompt(task, s.context, s.input);
    prefix = datasets::RulerAnswerPrefix(task, s.input);
    if (ro.chat == ChatFamily::kNone) return body + prefix;
    msgs = {{"user", body}};
  } else if (task == "needle") {
    if (ro.chat == ChatFamily::kNone) return datasets::NiahPrompt(s.context, s.input);
    msgs = {{"system", datasets::NiahSystem()}, {"user", datasets::NiahUser(s.context, s.input)}};
  } else {
    const std::string prompt = datasets::InfiniteBenchPrompt(task, s.context, s.input);
    if (ro.chat == ChatFamily::kNone) return prompt;
    prefix = datasets::InfiniteBenchAnswerPrefix(task);
    std::string user = prompt.substr(0, prompt.size() - prefix.size());
    while (!user.empty() && user.back() == '\n') user.pop_back();
    msgs = {{"user", user}};
  }
  return FormatChat(ro.chat, msgs, ro.bos, ro.eos) + prefix;
}

}  // namespace needle::eval
