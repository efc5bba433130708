// The JSONL files needle eval reads from users: --data samples (InfiniteBench's and RULER's
// released files, `needle data` output) and the predictions `needle eval score` re-scores. Each
// reader either returns what the file holds or throws Error naming the file, the line and the
// field; lines and nesting are bounded before anything grows past them.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "datasets/infinitebench.h"
#include "eval/runner.h"

namespace needle::eval {

constexpr size_t kMaxJsonlLine = size_t{256} << 20;  // bytes of one line (an 8M-token context fits)
constexpr int kMaxJsonDepth = 64;                    // nesting of one record

// Calls f(record, "file:line") for each non-blank line; a malformed line, one longer than
// kMaxJsonlLine or nested deeper than kMaxJsonDepth is an error naming the file and line.
// (max_line: for tests.)
void ForEachJsonLine(const std::string& path,
                     const std::function<void(const nlohmann::json&, const std::string&)>& f,
                     size_t max_line = kMaxJsonlLine);

// The reference answers of a record: "answer", "ground_truth", "outputs" or "label", a string,
// an integer or a list of strings.
std::vector<std::string> References(const nlohmann::json& j, const std::string& where);

// --data: InfiniteBench (id, context, input, answer), RULER (index, input, answer_prefix,
// outputs, length) or `needle data` records. Optional fields: id / index (integer), depth (a
// number in [0, 1]), length (an integer in [0, 2^31)).
std::vector<datasets::Sample> ReadSamples(const std::string& path);

struct Prediction {
  std::string prediction;  // "prediction" or "pred"
  std::vector<std::string> references;
};
// needle eval score: needle's, InfiniteBench's and RULER's prediction files.
std::vector<Prediction> ReadPredictions(const std::string& path);

// The finished results of run_dir/predictions.jsonl (none when the file does not exist). A torn
// last line (a run killed mid-write) is cut off the file, so that appending continues on a clean
// line; a malformed line anywhere else is an error naming the file and line.
std::vector<EvalResult> ReadResults(const std::string& path);
// One line of predictions.jsonl.
nlohmann::json ResultToJson(const EvalResult& r);

// A run directory's small JSON file (shard.json, tasks.json), whole, nesting bounded; an error
// naming the file when it cannot be read or is not JSON.
nlohmann::json ReadJsonFile(const std::string& path);

}  // namespace needle::eval
