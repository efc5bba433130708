// The run directory's summaries (summary.md, summary.json, heatmaps) and the stable hashes that
// identify samples, for the runner (eval/runner.cc) and the merge of shards (eval/shard.cc).
#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <tuple>

#include "datasets/infinitebench.h"
#include "eval/data_files.h"
#include "eval/heatmap.h"
#include "eval/runner.h"

namespace needle::eval {

using json = nlohmann::json;

namespace {

// FNV-1a, 64 bits: stable across builds and machines (std::hash is not promised to be).
uint64_t Fnv1a(const std::string& s, uint64_t h = 14695981039346656037ull) {
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}
std::string Hex(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace

std::string StableHash(const std::string& s) { return Hex(Fnv1a(s)); }

std::string ResultKey(const std::string& config, const std::string& task, int64_t length,
                      int64_t id) {
  return config + "\x1f" + task + "\x1f" + std::to_string(length) + "\x1f" + std::to_string(id);
}

std::string SampleHash(const std::string& task, const datasets::Sample& s) {
  std::ostringstream os;
  os << task << '\0' << s.target_tokens << '\0' << s.depth << '\0' << s.context << '\0' << s.input
     << '\0' << s.prompt;
  for (const auto& a : s.answer) os << '\0' << a;
  return StableHash(os.str());
}

std::string SummaryMarkdown(const std::vector<EvalResult>& results) {
  struct Acc {
    double score = 0, prefill = 0, decode = 0, recall = 0;
    int64_t n = 0, nrecall = 0;
  };
  std::map<std::tuple<std::string, int64_t, std::string>, Acc> rows;
  std::vector<std::string> config_order;
  for (const auto& r : results) {
    if (std::find(config_order.begin(), config_order.end(), r.config) == config_order.end())
      config_order.push_back(r.config);
    Acc& a = rows[{r.task, r.length, r.config}];
    a.score += r.score, a.prefill += r.prefill_tps, a.decode += r.decode_tps, a.n++;
    if (r.recall >= 0) a.recall += r.recall, a.nrecall++;
  }
  std::ostringstream os;
  os << "| task | length | configuration | samples | accuracy | prefill tok/s | decode tok/s | "
        "recall |\n"
     << "|---|---|---|---|---|---|---|---|\n";
  char buf[256];
  for (const auto& [key, a] : rows) {
    const auto& [task, length, config] = key;
    std::string rec =
        a.nrecall ? std::to_string(a.recall / static_cast<double>(a.nrecall)).substr(0, 6) : "-";
    std::snprintf(buf, sizeof buf, "| %s | %lld | %s | %lld | %.2f | %.1f | %.2f | %s |\n",
                  task.c_str(), static_cast<long long>(length), config.c_str(),
                  static_cast<long long>(a.n), 100.0 * a.score / static_cast<double>(a.n),
                  a.prefill / static_cast<double>(a.n), a.decode / static_cast<double>(a.n),
                  rec.c_str());
    os << buf;
  }
  return os.str();
}

void WriteRunSummaries(const std::string& task, const std::vector<EvalResult>& results,
                       const std::string& run_dir) {
  // Summary files, replaced atomically.
  json summary = json::array();
  for (const auto& r : results) summary.push_back(ResultToJson(r));
  const std::string md = SummaryMarkdown(results);
  std::set<double> depths;
  for (const auto& r : results) depths.insert(r.depth);
  if (task == "needle" || (datasets::IsInfiniteBenchTask(task) && depths.size() > 1)) {
    // Tasks whose generator sweeps the needle depth: one heatmap (depth x length) per
    // configuration, heatmap_<config>.png / .svg.
    std::set<std::string> cfgs;
    for (const auto& r : results) cfgs.insert(r.config);
    for (const auto& c : cfgs) {
      std::string file = c;
      for (auto& ch : file)
        if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
      const std::string title = task == "needle" ? "Needle In A Haystack" : task;
      WriteHeatmap(BuildGrid(results, c), title + ": " + c, run_dir + "/heatmap_" + file);
    }
  }
  for (auto [name, body] :
       {std::pair<std::string, std::string>{"summary.md", md},
        std::pair<std::string, std::string>{"summary.json",
                                            json{{"results", summary}, {"table", md}}.dump(1)}}) {
    const std::string path = run_dir + "/" + name;
    std::ofstream f(path + ".tmp");
    f << body;
    f.close();
    std::filesystem::rename(path + ".tmp", path);
  }
}

}  // namespace needle::eval
