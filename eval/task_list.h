// Several tasks in one evaluation: `needle eval TASK,TASK... -o RUN_DIR` loads the model once and
// runs the tasks one after another. Each task's run directory is RUN_DIR/TASK, exactly what a
// one-task run would write there (predictions, summaries, heatmaps, shard.json; resumable).
// RUN_DIR/tasks.json lists the tasks, and RUN_DIR/summary.md and summary.json hold every task's
// rows. `needle eval merge` takes such directories too: each task's shards are merged into
// OUT/TASK, with the same tasks.json and summaries at the top.
#pragma once

#include <string>
#include <vector>

#include "eval/runner.h"

namespace needle::eval {

// RUN_DIR/tasks.json's tasks; found is false when the file is absent. Malformed content is an
// error naming the file and field.
std::vector<std::string> ReadTaskList(const std::string& run_dir, bool* found);

// Before a run into run_dir: a several-task run (tasks.size() > 1) writes RUN_DIR/tasks.json, or
// checks an earlier run's; a one-task run checks that run_dir holds no several-task run. Refuses,
// naming the directory and both task lists, a directory that holds a run of other tasks.
void PrepareTaskRunDir(const std::string& run_dir, const std::vector<std::string>& tasks);

// RUN_DIR/summary.md and summary.json over every task's results (the tasks' own heatmaps stay in
// their directories).
void WriteTaskListSummaries(const std::string& run_dir, const std::vector<EvalResult>& results);

// Whether dirs are several-task run directories (each with tasks.json). All or none: a mix is an
// error naming one of each.
bool AreTaskListRuns(const std::vector<std::string>& dirs);

// needle eval merge of several-task run directories: every directory lists the same tasks (else
// an error naming two directories and their lists); each task's directories are merged into
// OUT/TASK by MergeRuns (with its checks), then OUT/tasks.json and the summaries are written.
// Returns the merged results of every task.
std::vector<EvalResult> MergeTaskRuns(const std::vector<std::string>& dirs,
                                      const std::string& out_dir);

}  // namespace needle::eval
