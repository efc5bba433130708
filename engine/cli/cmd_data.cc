// needle data TASK: writes a benchmark dataset as JSONL (id, context, input, answer, depth,
// length), with lengths counted in the given model's tokens, so that other engines can run the
// very same samples. Written to FILE.tmp and renamed when complete.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "datasets/infinitebench.h"
#include "engine/base/error.h"
#include "engine/cli/commands.h"
#include "engine/cli/options.h"
#include "engine/cli/parse_util.h"
#include "engine/tokenizer/tokenizer.h"
#include "eval/samples.h"

namespace needle {

int CmdData(int argc, char** argv) {
  const int rc = TaskCommandStart(
      argc, argv, "needle data",
      "usage: needle data TASK -o FILE.jsonl [options]   (needle data TASK --help lists them)",
      eval::RunnableTasks());
  if (rc >= 0) return rc;
  const std::string task = argv[0];
  std::vector<OptionSpec> specs = {
      {"model", 'm', OptKind::kString, NEEDLE_DEFAULT_MODEL,
       "model folder whose tokenizer.json counts the tokens (default: the bundled needle-tiny)"},
      {"output", 'o', OptKind::kString, "", "output JSONL file"}};
  for (auto& o : DatasetOptionSpecs()) specs.push_back(o);
  Options opt("needle data " + task,
              "Writes a benchmark dataset as JSONL, lengths counted in the model's tokens.", specs);
  if (!opt.Parse(argc - 1, argv + 1)) {
    if (opt.Flag("help")) std::cout << opt.Help();
    return 0;
  }
  if (!eval::IsRunnableTask(task))
    Fail("needle data: unknown task '", task, "' (available: ", eval::RunnableTasks(), ")");
  if (opt.Str("model").empty() || opt.Str("output").empty())
    Fail("needle data: --model and --output are required");
  auto tok = Tokenizer::Load(opt.Str("model") + "/tokenizer.json");
  // Lengths are counted with the model's tokenizer and raw templates; "prompt" is the raw text
  // needle itself runs for a model without a chat template.
  eval::RunnerOptions ro;
  const std::string out_path = opt.Str("output"), tmp = out_path + ".tmp";
  std::ofstream out(tmp);
  if (!out) Fail(tmp, ": cannot write");
  int64_t n = 0;
  for (const auto& s : eval::MakeSamples(task, *tok, ro, opt)) {
    bool bos = true;
    nlohmann::json j = {{"id", n++},
                        {"context", s.context},
                        {"input", s.input},
                        {"answer", s.answer},
                        {"depth", s.depth},
                        {"length", s.target_tokens},
                        {"prompt", eval::PromptText(task, s, ro, &bos)}};
    out << j.dump() << "\n";
  }
  out.close();
  if (!out) Fail(tmp, ": write failed");
  std::filesystem::rename(tmp, out_path);
  std::fprintf(stderr, "needle: wrote %lld samples to %s\n", static_cast<long long>(n),
               out_path.c_str());
  return 0;
}

}  // namespace needle
