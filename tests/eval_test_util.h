// What eval tests compare: a run directory's answers.
#pragma once

#include <set>
#include <string>

#include "eval/data_files.h"

namespace needle {

// The predictions of a run without the timings (which differ between runs), one per line.
inline std::multiset<std::string> Answers(const std::string& run) {
  std::multiset<std::string> out;
  for (auto r : eval::ReadResults(run + "/predictions.jsonl")) {
    r.prefill_tps = r.decode_tps = 0;
    out.insert(eval::ResultToJson(r).dump());
  }
  return out;
}

}  // namespace needle
