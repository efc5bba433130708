// Scoring rules of the published long-context benchmarks, reproduced exactly
// (../shared/reference/eval_datasets.md quotes the originals):
//   InfiniteBench passkey / number_string: the first run of digits of the prediction (split on
//     [^0-9]) must equal the label string ("00123" != "123"; "98,619" gives "98").
//   InfiniteBench kv_retrieval: replace each of \n : " ' . , ? ! { } with a space, split on
//     whitespace (Python str.split), correct iff the gold UUID is one of the pieces.
//   RULER: strip, map [\x00-\x1f] to \n, strip; string_match_all = mean over references of
//     case-insensitive substring membership (partial credit), string_match_part = any.
//   Needle-in-a-haystack: the original repository's keyword rule (substring_match), our
//     documented substitute for its LLM judge: 1 iff every keyword occurs in the lowercased
//     response.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace needle::eval {

std::string FirstIntMatch(std::string_view prediction);
bool ScorePasskey(std::string_view prediction, std::string_view label);  // also number_string
bool ScoreKvRetrieval(std::string_view prediction, std::string_view label);
std::vector<std::string> PythonSplit(std::string_view s);  // str.split(): Unicode whitespace
std::string RulerPostprocess(std::string_view prediction);
double StringMatchAll(std::string_view prediction, const std::vector<std::string>& references);
double StringMatchPart(std::string_view prediction, const std::vector<std::string>& references);
bool ScoreNeedleKeywords(std::string_view response, const std::vector<std::string>& keywords);
std::string Lowercase(std::string_view s);  // Unicode-aware, like Python str.lower()

// Tasks that `needle eval score` knows; the score of one prediction in [0, 1].
// references: the answer(s) (one for InfiniteBench tasks and the classic needle's keywords).
double ScoreTask(const std::string& task, std::string_view prediction,
                 const std::vector<std::string>& references);
bool IsKnownTask(const std::string& task);
std::string KnownTasks();

}  // namespace needle::eval
