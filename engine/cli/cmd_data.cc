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

namespace needle {

int CmdData(int argc, char** argv) {
  if (argc < 1 || argv[0][0] == '-')
    Fail(
        "needle data: usage: needle data TASK -m MODEL -o FILE.jsonl [...]; tasks: passkey, "
        "number_string, kv_retrieval");
  const std::string task = argv[0];
  std::vector<OptionSpec> specs = {
      {"model", 'm', OptKind::kString, "", "model folder whose tokenizer.json counts the tokens"},
      {"output", 'o', OptKind::kString, "", "output JSONL file"}};
  for (auto& o : DatasetOptionSpecs()) specs.push_back(o);
  Options opt("needle data " + task,
              "Writes a benchmark dataset as JSONL, lengths counted in the model's tokens.", specs);
  if (!opt.Parse(argc - 1, argv + 1)) {
    if (opt.Flag("help")) std::cout << opt.Help();
    return 0;
  }
  if (!datasets::IsInfiniteBenchTask(task))
    Fail("needle data: unknown task '", task,
         "' (available: passkey, number_string, kv_retrieval)");
  if (opt.Str("model").empty() || opt.Str("output").empty())
    Fail("needle data: --model and --output are required");
  auto tok = Tokenizer::Load(opt.Str("model") + "/tokenizer.json");
  const auto count = [&](const std::string& s) {
    return static_cast<int64_t>(tok->Encode(s, true).size());
  };
  const std::string out_path = opt.Str("output"), tmp = out_path + ".tmp";
  std::ofstream out(tmp);
  if (!out) Fail(tmp, ": cannot write");
  int64_t n = 0;
  for (int64_t len : ParseTokenLengths(opt.Str("lengths"), "--lengths")) {
    for (const auto& s :
         datasets::GenerateInfiniteBench(task, len, opt.Int("depths"), opt.Int("samples"),
                                         static_cast<uint64_t>(opt.Int("seed")), count)) {
      nlohmann::json j = {{"id", n++},        {"context", s.context},
                          {"input", s.input}, {"answer", s.answer},
                          {"depth", s.depth}, {"length", s.target_tokens}};
      out << j.dump() << "\n";
    }
  }
  out.close();
  if (!out) Fail(tmp, ": write failed");
  std::filesystem::rename(tmp, out_path);
  std::fprintf(stderr, "needle: wrote %lld samples to %s\n", static_cast<long long>(n),
               out_path.c_str());
  return 0;
}

}  // namespace needle
