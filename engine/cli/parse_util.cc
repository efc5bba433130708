#include "engine/cli/parse_util.h"

#include <climits>
#include <iostream>
#include <sstream>

#include "engine/base/error.h"

namespace needle {

std::vector<std::string> SplitComma(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

namespace {
// Leading integer of s: its value and the length it spans (0 when there is none).
long long LeadingInt(const std::string& s, size_t* pos) {
  *pos = 0;
  try {
    return std::stoll(s, pos);
  } catch (...) {
    *pos = 0;
    return 0;
  }
}
}  // namespace

std::vector<int64_t> ParseTokenLengths(const std::string& s, const std::string& what) {
  std::vector<int64_t> out;
  for (const auto& item : SplitComma(s)) {
    size_t pos;
    const long long v = LeadingInt(item, &pos);
    const std::string suf = pos < item.size() ? item.substr(pos) : "";
    if (pos == 0 || v <= 0 || (suf != "" && suf != "k" && suf != "K" && suf != "m" && suf != "M"))
      Fail(what, ": '", item, "' is not a length (examples: 4096, 4k, 128k, 1m)");
    const int64_t mul = suf == "k" || suf == "K" ? 1024 : suf == "m" || suf == "M" ? 1048576 : 1;
    if (v > (int64_t{1} << 40) / mul)
      Fail(what, ": '", item, "' is more tokens than needle can hold (at most 2^40)");
    out.push_back(v * mul);
  }
  return out;
}

std::vector<int32_t> ParseIdList(const std::string& s, const std::string& what) {
  std::vector<int32_t> ids;
  for (const auto& item : SplitComma(s)) {
    size_t pos;
    const long long v = LeadingInt(item, &pos);
    if (item.empty() || pos != item.size() || v < 0 || v > INT32_MAX)
      Fail(what, ": '", item,
           "' is not a token id (expected comma-separated non-negative integers)");
    ids.push_back(static_cast<int32_t>(v));
  }
  return ids;
}

std::vector<OptionSpec> DatasetOptionSpecs() {
  return {
      {"lengths", 0, OptKind::kString, "4k",
       "generated prompt lengths in tokens, e.g. 4k,16k,128k"},
      {"depths", 0, OptKind::kInt, "5", "generated needle depths, evenly from 0 to 100%"},
      {"samples", 0, OptKind::kInt, "1", "generated samples per (length, depth)"},
      {"seed", 0, OptKind::kInt, "1", "generation seed (same seed, same bytes)"},
      {"haystack", 0, OptKind::kString, "",
       "essay haystack: text files or folders, comma-separated (default: the Debian jargon-text "
       "file)"},
      {"wordnet", 0, OptKind::kString, "/usr/share/wordnet",
       "RULER: folder of WordNet's index.adj and index.noun (the Debian wordnet-base files)"},
      {"depth-spacing", 0, OptKind::kString, "linear", "needle: depth spacing, linear or sigmoid"},
      {"needle-text", 0, OptKind::kString, "",
       "needle: the sentence to hide (default: the original's)"},
      {"question", 0, OptKind::kString, "",
       "needle: the retrieval question (default: the original's)"},
      {"keywords", 0, OptKind::kString, "",
       "needle: comma-separated words a correct answer contains (default: dolores,sandwich)"}};
}

int TaskCommandStart(int argc, char** argv, const std::string& cmd, const std::string& usage,
                     const std::string& tasks) {
  const std::string first = argc >= 1 ? argv[0] : "";
  if (argc < 1 || first == "--help" || first == "-h") {
    std::cout << usage << "\ntasks: " << tasks << "\n";
    return argc < 1 ? 2 : 0;
  }
  if (first[0] == '-') Fail(cmd, ": the task comes first (", usage, "; tasks: ", tasks, ")");
  return -1;
}

}  // namespace needle
