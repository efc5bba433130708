// Evaluation sharded over processes or machines: `needle eval --shard I/N` evaluates slice I of N
// of the samples, and `needle eval merge DIR... -o OUT` joins the slices' run directories into
// what one process would have written.
//
// The slice is by position in the sample list: sample i belongs to shard i mod N. The list is
// ordered by length, so every shard gets its share of each length (the long prompts, which cost
// the most, are spread over the shards rather than left to the last one).
//
// Without --shard, the shard comes from the scheduler's environment:
//   - Slurm array jobs: SLURM_ARRAY_TASK_ID, with SLURM_ARRAY_TASK_MIN / _MAX / _STEP (or, where
//     those are missing, SLURM_ARRAY_TASK_COUNT and a minimum of 0): I = (ID - MIN) / STEP,
//     N = (MAX - MIN) / STEP + 1;
//   - Kubernetes Indexed Jobs: JOB_COMPLETION_INDEX, with the count in NEEDLE_SHARD_COUNT
//     (Kubernetes does not put the job's completions in the environment; the manifest in docs/
//     sets it).
// One process per GPU on one host uses the same flags, with CUDA_VISIBLE_DEVICES per process.
//
// Each shard writes RUN_DIR/shard.json: its index, the count, the task and a hash of the whole
// sample list, so that a merge can tell that its inputs are the slices of one evaluation.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "datasets/infinitebench.h"
#include "eval/runner.h"

namespace needle::eval {

struct Shard {
  int64_t index = 0, count = 1;  // this process evaluates samples i with i % count == index
  std::string source;            // where it came from: "--shard", "SLURM_ARRAY_TASK_ID", ...
  bool sharded() const { return count > 1; }
};

// "I/N" with 0 <= I < N (what --shard takes); an error names `what` and the value.
Shard ParseShard(const std::string& v, const std::string& what = "--shard");
// The shard of a Slurm array task or a Kubernetes Indexed Job (see above), or {0, 1} when the
// process is neither. Inconsistent variables are errors naming them.
Shard ShardFromEnvironment();

// The samples of shard s, in their order.
std::vector<datasets::Sample> SelectShard(const std::vector<datasets::Sample>& all, const Shard& s);

// A hash of the whole sample list (every sample's SampleHash, in order).
std::string SampleListHash(const std::string& task, const std::vector<datasets::Sample>& all);

// RUN_DIR/shard.json of a sharded run. Refuses a run directory that already holds another
// shard's file (another index, count, task or sample list).
void WriteShardFile(const std::string& run_dir, const std::string& task, const Shard& s,
                    const std::vector<datasets::Sample>& all);

struct ShardFile {
  int64_t index = 0, count = 1, samples = 0;
  std::string task, samples_hash;
};
// RUN_DIR/shard.json (an error naming the file and field when it is malformed); found is false
// when the directory has none (an unsharded run).
ShardFile ReadShardFile(const std::string& run_dir, bool* found);

// needle eval merge: the predictions of the run directories, checked and joined, written to
// out_dir (predictions.jsonl, summary.json, summary.md and the heatmaps) as one process would
// have written them. Refuses, naming the directories: a task or sample list that differs, shards
// of different counts, a shard index given twice or missing, a configuration run with other
// settings in another directory, and one sample answered twice. Returns the merged results.
std::vector<EvalResult> MergeRuns(const std::vector<std::string>& dirs, const std::string& out_dir);

}  // namespace needle::eval
