#include "eval/shard.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "engine/base/error.h"
#include "eval/data_files.h"

namespace needle::eval {

using json = nlohmann::json;

namespace {

// A whole decimal number in [0, 2^31), or an error naming `what` and the text.
int64_t ParseCount(const std::string& text, const std::string& what) {
  if (text.empty() || text.size() > 10 ||
      !std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; }))
    Fail(what, ": '", text, "' is not a whole number");
  const int64_t v = std::stoll(text);
  if (v >= (int64_t{1} << 31)) Fail(what, ": ", v, " is too large");
  return v;
}

// Environment variable `name` as a number; *set is false when it is unset or empty.
int64_t EnvCount(const char* name, bool* set) {
  const char* v = std::getenv(name);
  *set = v != nullptr && *v != 0;
  return *set ? ParseCount(v, name) : 0;
}

}  // namespace

Shard ParseShard(const std::string& v, const std::string& what) {
  const size_t slash = v.find('/');
  if (slash == std::string::npos) Fail(what, ": expected I/N, e.g. 0/4 (got '", v, "')");
  Shard s;
  s.index = ParseCount(v.substr(0, slash), what + " (I of I/N)");
  s.count = ParseCount(v.substr(slash + 1), what + " (N of I/N)");
  if (s.count < 1) Fail(what, ": '", v, "' has no shards (N must be at least 1)");
  if (s.index >= s.count)
    Fail(what, ": '", v, "': the shard index must be below the count (0 to ", s.count - 1, ")");
  s.source = what;
  return s;
}

Shard ShardFromEnvironment() {
  bool has_id = false;
  const int64_t id = EnvCount("SLURM_ARRAY_TASK_ID", &has_id);
  if (has_id) {
    bool has_min = false, has_max = false, has_step = false, has_count = false;
    const int64_t mn = EnvCount("SLURM_ARRAY_TASK_MIN", &has_min);
    const int64_t mx = EnvCount("SLURM_ARRAY_TASK_MAX", &has_max);
    const int64_t step = EnvCount("SLURM_ARRAY_TASK_STEP", &has_step);
    const int64_t count = EnvCount("SLURM_ARRAY_TASK_COUNT", &has_count);
    Shard s;
    s.source = "SLURM_ARRAY_TASK_ID";
    if (has_min && has_max) {
      const int64_t st = has_step ? step : 1;
      if (st < 1) Fail("SLURM_ARRAY_TASK_STEP: ", st, " is not a step");
      if (mx < mn || id < mn || id > mx || (id - mn) % st != 0)
        Fail("SLURM_ARRAY_TASK_ID ", id, " is not a task of the array ", mn, "-", mx, ":", st);
      s.index = (id - mn) / st;
      s.count = (mx - mn) / st + 1;
    } else if (has_count) {
      s.index = id, s.count = count;
    } else {
      Fail(
          "SLURM_ARRAY_TASK_ID is set, but neither SLURM_ARRAY_TASK_MIN/MAX nor "
          "SLURM_ARRAY_TASK_COUNT: the number of shards is unknown (pass --shard I/N)");
    }
    if (has_count && count != s.count)
      Fail("SLURM_ARRAY_TASK_COUNT ", count, " does not match the array ", mn, "-", mx,
           " (a sparse --array list?): pass --shard I/N");
    if (s.count < 1 || s.index >= s.count)
      Fail("SLURM_ARRAY_TASK_ID ", id, " is not below SLURM_ARRAY_TASK_COUNT ", s.count);
    return s;
  }
  bool has_k8s = false, has_n = false;
  const int64_t k = EnvCount("JOB_COMPLETION_INDEX", &has_k8s);
  if (has_k8s) {
    const int64_t n = EnvCount("NEEDLE_SHARD_COUNT", &has_n);
    if (!has_n)
      Fail(
          "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but NEEDLE_SHARD_COUNT is not: "
          "set it to the job's completions, or pass --shard I/N");
    if (n < 1 || k >= n) Fail("JOB_COMPLETION_INDEX ", k, " is not below NEEDLE_SHARD_COUNT ", n);
    Shard s;
    s.index = k, s.count = n, s.source = "JOB_COMPLETION_INDEX";
    return s;
  }
  return Shard{};
}

std::vector<datasets::Sample> SelectShard(const std::vector<datasets::Sample>& all,
                                          const Shard& s) {
  std::vector<datasets::Sample> out;
  for (size_t i = 0; i < all.size(); ++i)
    if (static_cast<int64_t>(i % static_cast<size_t>(s.count)) == s.index) out.push_back(all[i]);
  return out;
}

std::string SampleListHash(const std::string& task, const std::vector<datasets::Sample>& all) {
  std::string cat;
  for (const auto& x : all) cat += SampleHash(task, x) + "\n";
  return StableHash(cat);
}

ShardFile ReadShardFile(const std::string& run_dir, bool* found) {
  const std::string path = run_dir + "/shard.json";
  ShardFile f;
  *found = std::filesystem::exists(path);
  if (!*found) return f;
  const json j = ReadJsonFile(path);
  auto integer = [&](const char* k) -> int64_t {
    if (!j.is_object() || !j.contains(k) || !j[k].is_number_integer())
      Fail(path, ": field '", k, "' is missing or not an integer");
    return j[k].get<int64_t>();
  };
  auto text = [&](const char* k) -> std::string {
    if (!j.is_object() || !j.contains(k) || !j[k].is_string())
      Fail(path, ": field '", k, "' is missing or not a string");
    return j[k].get<std::string>();
  };
  f.index = integer("index"), f.count = integer("count"), f.samples = integer("samples");
  f.task = text("task"), f.samples_hash = text("samples_hash");
  if (f.count < 1 || f.index < 0 || f.index >= f.count)
    Fail(path, ": shard ", f.index, " of ", f.count, " is not a shard");
  return f;
}

void WriteShardFile(const std::string& run_dir, const std::string& task, const Shard& s,
                    const std::vector<datasets::Sample>& all) {
  std::filesystem::create_directories(run_dir);
  const std::string hash = SampleListHash(task, all);
  bool found = false;
  const ShardFile old = ReadShardFile(run_dir, &found);
  if (found && (old.index != s.index || old.count != s.count || old.task != task ||
                old.samples_hash != hash))
    Fail(run_dir, "/shard.json: this run directory holds shard ", old.index, "/", old.count, " of ",
         old.task, " (samples ", old.samples_hash, "); this run is shard ", s.index, "/", s.count,
         " of ", task, " (samples ", hash, "): evaluate into another --output directory");
  const json j = {{"index", s.index},
                  {"count", s.count},
                  {"task", task},
                  {"samples", static_cast<int64_t>(all.size())},
                  {"samples_hash", hash}};
  std::ofstream out(run_dir + "/shard.json");
  out << j.dump(1) << "\n";
  if (!out) Fail(run_dir, "/shard.json: cannot write");
}

std::vector<EvalResult> MergeRuns(const std::vector<std::string>& dirs,
                                  const std::string& out_dir) {
  if (dirs.empty()) Fail("needle eval merge: no run directories given");
  // The shard files: all present or all absent; one task, count and sample list; each index once.
  std::vector<ShardFile> shards;
  std::vector<std::string> shard_dirs, unsharded;  // shard_dirs[i]: where shards[i] came from
  for (const auto& d : dirs) {
    if (!std::filesystem::is_directory(d)) Fail(d, ": not a run directory");
    bool found = false;
    const ShardFile f = ReadShardFile(d, &found);
    if (found) {
      shards.push_back(f);
      shard_dirs.push_back(d);
    } else {
      unsharded.push_back(d);
    }
  }
  if (!shards.empty() && !unsharded.empty())
    Fail("needle eval merge: ", unsharded[0], " has no shard.json but ", shard_dirs[0],
         " is a shard: merge the shards of one evaluation");
  if (!shards.empty()) {
    std::map<int64_t, std::string> seen;
    for (size_t i = 0; i < shards.size(); ++i) {
      const ShardFile& a = shards[0];
      const ShardFile& b = shards[i];
      if (b.task != a.task || b.count != a.count || b.samples_hash != a.samples_hash)
        Fail("needle eval merge: ", shard_dirs[i], " is shard ", b.index, "/", b.count, " of ",
             b.task, " (samples ", b.samples_hash, "), ", shard_dirs[0], " shard ", a.index, "/",
             a.count, " of ", a.task, " (samples ", a.samples_hash,
             "): not slices of one evaluation (other task, shard count, lengths, seed or data)");
      if (!seen.emplace(b.index, shard_dirs[i]).second)
        Fail("needle eval merge: shard ", b.index, "/", b.count, " is given twice (", seen[b.index],
             " and ", shard_dirs[i], ")");
    }
    std::string missing;
    for (int64_t k = 0; k < shards[0].count; ++k)
      if (!seen.count(k)) missing += (missing.empty() ? "" : ", ") + std::to_string(k);
    if (!missing.empty())
      Fail("needle eval merge: shard index(es) ", missing, " of 0-", shards[0].count - 1,
           " missing: the merge would not be the whole evaluation");
  }
  // The results: one settings string per configuration, each (configuration, length, id) once.
  std::vector<EvalResult> all;
  std::map<std::string, std::pair<std::string, std::string>> settings;  // config -> (dir, value)
  std::map<std::string, std::string> owner;                             // result key -> dir
  std::set<std::string> tasks;
  for (const auto& d : dirs) {
    const std::string path = d + "/predictions.jsonl";
    if (!std::filesystem::exists(path)) Fail(path, ": missing (not a needle eval run directory)");
    for (EvalResult& r : ReadResults(path)) {
      tasks.insert(r.task);
      auto [it, fresh] = settings.emplace(r.config, std::make_pair(d, r.settings));
      if (!fresh && it->second.second != r.settings)
        Fail("needle eval merge: configuration '", r.config, "' was run with other settings in ",
             it->second.first, " and ", d, "\n  ", it->second.first, ": ", it->second.second,
             "\n  ", d, ": ", r.settings);
      if (auto [o, first] = owner.emplace(ResultKey(r.config, r.task, r.length, r.id), d); !first)
        Fail("needle eval merge: ", r.task, " sample ", r.id, " at length ", r.length,
             " of configuration '", r.config, "' is in both ", o->second, " and ", d,
             " (overlapping runs, not shards of one evaluation)");
      all.push_back(std::move(r));
    }
  }
  if (all.empty()) Fail("needle eval merge: the run directories hold no results");
  if (tasks.size() > 1)
    Fail("needle eval merge: the run directories hold results of ", tasks.size(), " tasks (",
         *tasks.begin(), ", ", *std::next(tasks.begin()), "): merge one task at a time");
  // One process writes configuration by configuration, each in sample order (lengths first).
  std::vector<std::string> config_order;
  for (const auto& r : all)
    if (std::find(config_order.begin(), config_order.end(), r.config) == config_order.end())
      config_order.push_back(r.config);
  auto rank = [&](const std::string& c) {
    return std::find(config_order.begin(), config_order.end(), c) - config_order.begin();
  };
  std::stable_sort(all.begin(), all.end(), [&](const EvalResult& a, const EvalResult& b) {
    if (a.config != b.config) return rank(a.config) < rank(b.config);
    if (a.length != b.length) return a.length < b.length;
    if (a.depth != b.depth) return a.depth < b.depth;
    return a.id < b.id;
  });
  std::filesystem::create_directories(out_dir);
  const std::string pred = out_dir + "/predictions.jsonl";
  if (std::filesystem::exists(pred) && std::filesystem::file_size(pred) > 0)
    Fail(pred, ": already holds results; merge into a new -o directory");
  {
    std::ofstream out(pred + ".tmp");
    for (const auto& r : all) out << ResultToJson(r).dump() << "\n";
    out.close();
    if (!out) Fail(pred, ".tmp: cannot write");
    std::filesystem::rename(pred + ".tmp", pred);
  }
  WriteRunSummaries(*tasks.begin(), all, out_dir);
  return all;
}

}  // namespace needle::eval
