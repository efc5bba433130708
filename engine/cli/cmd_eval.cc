// needle eval score: re-scores existing predictions with the benchmarks' own rules
// (eval/scoring.h). Reads JSONL with a prediction ("prediction" or "pred") and the reference(s)
// ("answer", "ground_truth", "outputs" or "label"; a string or a list of strings), which covers
// needle's own files, InfiniteBench's result files and RULER's prediction files.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "engine/base/error.h"
#include "engine/cli/commands.h"
#include "engine/cli/options.h"
#include "eval/scoring.h"

namespace needle {

namespace {

std::vector<std::string> References(const nlohmann::json& j, const std::string& where) {
  for (const char* key : {"answer", "ground_truth", "outputs", "label"}) {
    if (!j.contains(key)) continue;
    const auto& v = j[key];
    if (v.is_string()) return {v.get<std::string>()};
    if (v.is_number_integer()) return {std::to_string(v.get<int64_t>())};
    if (v.is_array()) {
      std::vector<std::string> out;
      for (const auto& e : v) {
        if (!e.is_string())
          Fail(where, ": field '", key, "' must hold strings (value: ", v.dump(), ")");
        out.push_back(e.get<std::string>());
      }
      return out;
    }
    Fail(where, ": field '", key, "' must be a string or a list of strings (value: ", v.dump(),
         ")");
  }
  Fail(where, ": no reference field (answer, ground_truth, outputs or label)");
}

int CmdEvalScore(int argc, char** argv) {
  Options opt("needle eval score",
              "Re-scores a predictions JSONL file with the benchmark's own rule.",
              {{"task", 0, OptKind::kString, "", "task: " + eval::KnownTasks()},
               {"preds", 0, OptKind::kString, "", "predictions JSONL file"}});
  if (!opt.Parse(argc, argv)) {
    if (opt.Flag("help")) std::cout << opt.Help();
    return 0;
  }
  const std::string task = opt.Str("task"), path = opt.Str("preds");
  if (task.empty() || path.empty()) Fail("needle eval score: --task and --preds are required");
  if (!eval::IsKnownTask(task))
    Fail("--task: unknown task '", task, "' (known: ", eval::KnownTasks(), ")");
  std::ifstream in(path);
  if (!in) Fail(path, ": cannot open");
  std::string line;
  int64_t n = 0, lineno = 0;
  double total = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(lineno);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      Fail(where, ": malformed JSON: ", e.what());
    }
    std::string pred;
    if (j.contains("prediction") && j["prediction"].is_string())
      pred = j["prediction"].get<std::string>();
    else if (j.contains("pred") && j["pred"].is_string())
      pred = j["pred"].get<std::string>();
    else
      Fail(where, ": no string field 'prediction' (or 'pred')");
    total += eval::ScoreTask(task, pred, References(j, where));
    ++n;
  }
  if (n == 0) Fail(path, ": no predictions");
  std::printf("%s: %.2f (%lld predictions, %.1f correct)\n", task.c_str(),
              100.0 * total / static_cast<double>(n), static_cast<long long>(n), total);
  return 0;
}

}  // namespace

int CmdEval(int argc, char** argv) {
  if (argc >= 1 && std::string(argv[0]) == "score") return CmdEvalScore(argc - 1, argv + 1);
  Fail(
      "needle eval: the evaluation runners are not built yet; available: 'needle eval score --task "
      "T --preds F'");
}

}  // namespace needle
