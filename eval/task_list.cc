#include "eval/task_list.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/base/error.h"
#include "eval/data_files.h"
#include "eval/shard.h"

namespace needle::eval {
namespace {

using json = nlohmann::json;

std::string Joined(const std::vector<std::string>& tasks) {
  std::string s;
  for (const auto& t : tasks) s += (s.empty() ? "" : ",") + t;
  return s;
}

}  // namespace

std::vector<std::string> ReadTaskList(const std::string& run_dir, bool* found) {
  const std::string path = run_dir + "/tasks.json";
  *found = std::filesystem::exists(path);
  if (!*found) return {};
  const json j = ReadJsonFile(path);
  if (!j.is_object() || !j.contains("tasks") || !j["tasks"].is_array() || j["tasks"].empty())
    Fail(path, ": field 'tasks' is missing or not a list of tasks");
  std::vector<std::string> tasks;
  for (const auto& t : j["tasks"]) {
    if (!t.is_string()) Fail(path, ": field 'tasks' holds a non-string (", t.dump(), ")");
    const std::string name = t.get<std::string>();
    // (A task names a directory under the run's: letters, digits and '_' only, each once.)
    if (name.empty() || name.size() > 64 || !std::all_of(name.begin(), name.end(), [](char c) {
          return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
        }))
      Fail(path, ": field 'tasks' holds '", name, "', which is not a task name");
    if (std::find(tasks.begin(), tasks.end(), name) != tasks.end())
      Fail(path, ": field 'tasks' lists '", name, "' twice");
    tasks.push_back(name);
  }
  return tasks;
}

void PrepareTaskRunDir(const std::string& run_dir, const std::vector<std::string>& tasks) {
  bool found = false;
  const std::vector<std::string> old = ReadTaskList(run_dir, &found);
  if (found && old != tasks)
    Fail(run_dir, "/tasks.json: this run directory holds an evaluation of ", Joined(old),
         "; this run is of ", Joined(tasks), ": evaluate into another --output directory");
  if (tasks.size() == 1) return;
  if (std::filesystem::exists(run_dir + "/predictions.jsonl"))
    Fail(run_dir,
         "/predictions.jsonl: this run directory holds a one-task evaluation; this run is of ",
         Joined(tasks), ": evaluate into another --output directory");
  if (found) return;
  std::filesystem::create_directories(run_dir);
  std::ofstream out(run_dir + "/tasks.json");
  out << json{{"tasks", tasks}}.dump(1) << "\n";
  if (!out) Fail(run_dir, "/tasks.json: cannot write");
}

void WriteTaskListSummaries(const std::string& run_dir, const std::vector<EvalResult>& results) {
  WriteRunSummaries("", results, run_dir);  // (no task: no heatmap at the top)
}

bool AreTaskListRuns(const std::vector<std::string>& dirs) {
  std::string with, without;
  for (const auto& d : dirs) (std::filesystem::exists(d + "/tasks.json") ? with : without) = d;
  if (!with.empty() && !without.empty())
    Fail("needle eval merge: ", with, " holds several tasks (tasks.json) and ", without,
         " does not: merge the run directories of one evaluation");
  return !dirs.empty() && without.empty();
}

std::vector<EvalResult> MergeTaskRuns(const std::vector<std::string>& dirs,
                                      const std::string& out_dir) {
  if (dirs.empty()) Fail("needle eval merge: no run directories given");
  bool found = false;
  const std::vector<std::string> tasks = ReadTaskList(dirs[0], &found);
  for (size_t i = 1; i < dirs.size(); ++i) {
    const std::vector<std::string> other = ReadTaskList(dirs[i], &found);
    if (other != tasks)
      Fail("needle eval merge: ", dirs[i], " holds ", Joined(other), ", ", dirs[0], " ",
           Joined(tasks), ": merge the run directories of one evaluation");
  }
  PrepareTaskRunDir(out_dir, tasks);
  std::vector<EvalResult> all;
  for (const auto& t : tasks) {
    std::vector<std::string> task_dirs;
    for (const auto& d : dirs) task_dirs.push_back(d + "/" + t);
    const std::vector<EvalResult> merged = MergeRuns(task_dirs, out_dir + "/" + t);
    all.insert(all.end(), merged.begin(), merged.end());
  }
  WriteTaskListSummaries(out_dir, all);
  return all;
}

}  // namespace needle::eval
