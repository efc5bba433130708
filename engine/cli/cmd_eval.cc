// needle eval score: re-scores existing predictions with the benchmarks' own rules
// (eval/scoring.h). Reads JSONL with a prediction ("prediction" or "pred") and the reference(s)
// ("answer", "ground_truth", "outputs" or "label"; a string or a list of strings), which covers
// needle's own files, InfiniteBench's result files and RULER's prediction files.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>

#include "datasets/infinitebench.h"
#include "datasets/niah.h"
#include "datasets/ruler.h"
#include "engine/base/error.h"
#include "engine/cli/commands.h"
#include "engine/cli/options.h"
#include "engine/cli/parse_util.h"
#include "engine/cli/run_options.h"
#include "engine/tokenizer/chat_template.h"
#include "eval/data_files.h"
#include "eval/runner.h"
#include "eval/samples.h"
#include "eval/scoring.h"
#include "eval/shard.h"
#include "eval/task_list.h"

namespace needle {

namespace {

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
  int64_t n = 0;
  double total = 0;
  for (const eval::Prediction& p : eval::ReadPredictions(path)) {
    total += eval::ScoreTask(task, p.prediction, p.references);
    ++n;
  }
  if (n == 0) Fail(path, ": no predictions");
  std::printf("%s: %.2f (%lld predictions, %.1f correct)\n", task.c_str(),
              100.0 * total / static_cast<double>(n), static_cast<long long>(n), total);
  return 0;
}

// needle eval merge DIR... -o OUT (eval/shard.h).
int CmdEvalMerge(int argc, char** argv) {
  const char* usage =
      "usage: needle eval merge RUN_DIR... -o OUT_DIR\n"
      "Joins the run directories of the shards of one evaluation (needle eval --shard I/N, or a\n"
      "Slurm array / Kubernetes Indexed Job) into OUT_DIR: predictions.jsonl, summary.json,\n"
      "summary.md and the heatmaps, as one process would have written them.\n";
  std::vector<std::string> dirs;
  std::string out;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << usage;
      return 0;
    }
    if (a == "-o" || a == "--output") {
      if (i + 1 >= argc) Fail("needle eval merge: ", a, " needs a directory");
      out = argv[++i];
    } else if (a.rfind("--output=", 0) == 0) {
      out = a.substr(9);
    } else if (!a.empty() && a[0] == '-') {
      Fail("needle eval merge: unknown option '", a, "'\n", usage);
    } else {
      dirs.push_back(a);
    }
  }
  if (dirs.empty() || out.empty())
    Fail("needle eval merge: RUN_DIR... and -o OUT_DIR are required\n", usage);
  const auto results =
      eval::AreTaskListRuns(dirs) ? eval::MergeTaskRuns(dirs, out) : eval::MergeRuns(dirs, out);
  std::fprintf(stderr, "needle eval merge: %zu results of %zu run directories -> %s\n",
               results.size(), dirs.size(), out.c_str());
  std::cout << eval::SummaryMarkdown(results);
  return 0;
}

// The tasks of a comma-separated list (eval/task_list.h), in its order: each one runnable and
// listed once (an error names the task and the list).
std::vector<std::string> ParseTaskList(const std::string& list) {
  std::vector<std::string> tasks;
  for (const std::string& t : SplitComma(list)) {
    if (t.empty()) Fail("needle eval: empty task name in '", list, "'");
    if (!eval::IsRunnableTask(t))
      Fail("needle eval: task '", t, "' has no runner (available: ", eval::RunnableTasks(), ")");
    if (std::find(tasks.begin(), tasks.end(), t) != tasks.end())
      Fail("needle eval: task '", t, "' is listed twice in '", list, "'");
    tasks.push_back(t);
  }
  if (tasks.empty()) Fail("needle eval: no task given");
  return tasks;
}

// One task of `needle eval`: its samples made (or read), sliced to the shard, and run into
// ro.run_dir. Returns the run directory's results (none for an empty slice).
std::vector<eval::EvalResult> RunTask(const std::string& task, Model& model, const Tokenizer& tok,
                                      ThreadingContext& tc,
                                      const std::vector<eval::EvalConfig>& configs,
                                      const eval::RunnerOptions& ro, const eval::Shard& shard,
                                      const Options& opt) {
  const auto made = std::chrono::steady_clock::now();
  std::vector<datasets::Sample> samples = opt.Str("data").empty()
                                              ? eval::MakeSamples(task, tok, ro, opt)
                                              : eval::ReadSamples(opt.Str("data"));
  std::fprintf(stderr, "needle: %s: %zu samples %s in %.2f s\n", task.c_str(), samples.size(),
               opt.Str("data").empty() ? "made" : "read",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - made).count());
  if (shard.sharded()) {
    eval::WriteShardFile(ro.run_dir, task, shard, samples);
    const size_t all = samples.size();
    samples = eval::SelectShard(samples, shard);
    std::fprintf(stderr, "needle: shard %lld/%lld (%s): %zu of %zu samples\n",
                 static_cast<long long>(shard.index), static_cast<long long>(shard.count),
                 shard.source.c_str(), samples.size(), all);
    if (samples.empty()) {  // more shards than samples: an empty slice, still mergeable
      std::ofstream(ro.run_dir + "/predictions.jsonl", std::ios::app);
      return {};
    }
  }
  return eval::RunEval(model, tok, tc, task, samples, configs, ro);
}

}  // namespace

int CmdEval(int argc, char** argv) {
  if (argc >= 1 && std::string(argv[0]) == "score") return CmdEvalScore(argc - 1, argv + 1);
  if (argc >= 1 && std::string(argv[0]) == "merge") return CmdEvalMerge(argc - 1, argv + 1);
  const int rc =
      TaskCommandStart(argc, argv, "needle eval",
                       "usage: needle eval TASK[,TASK...] -o RUN_DIR [options]   "
                       "(needle eval TASK --help lists them)\n       needle eval score --task TASK "
                       "--preds FILE\n       needle eval merge RUN_DIR... -o OUT_DIR",
                       eval::RunnableTasks());
  if (rc >= 0) return rc;
  const std::string task = argv[0];  // (one task, or a comma-separated list: eval/task_list.h)
  std::vector<OptionSpec> specs = {
      {"output", 'o', OptKind::kString, "",
       "run directory (predictions.jsonl, summary.json, summary.md); with several tasks, one "
       "such directory per task inside it, tasks.json and the summaries of all"},
      {"data", 0, OptKind::kString, "",
       "evaluate the samples of this JSONL file (e.g. InfiniteBench's) instead"},
      {"set", 0, OptKind::kString, "",
       "sweep one sparse setting, e.g. topk=16,32,64 or pos-remap=none,block (with --attention "
       "sparse)"},
      {"shard", 0, OptKind::kString, "",
       "evaluate slice I of N of the samples, I/N (e.g. 0/4); default: from SLURM_ARRAY_TASK_ID, "
       "or JOB_COMPLETION_INDEX with NEEDLE_SHARD_COUNT, else all; join the slices with `needle "
       "eval merge`"},
      {"batch", 0, OptKind::kInt, "1",
       "decode up to N samples at once (continuous batching over one KV block pool, or for "
       "sparse attention on a GPU N slots of the hybrid engine's caches; the same answers as one "
       "at a time)"},
      {"needle-hits", 0, OptKind::kFlag, "",
       "sparse: per layer, how often the answer's block was attended (the prompt's last query "
       "and every decode step), on stderr and in RUN_DIR/needle_hits.jsonl"},
  };
  for (auto& o : DatasetOptionSpecs()) specs.push_back(o);
  for (auto& o : RunOptionSpecs()) specs.push_back(o);
  Options opt(
      "needle eval " + task,
      "Evaluates a model on a benchmark task, one configuration after another, with the\n"
      "benchmark's prompt, answer length and scoring; --attention takes a list (dense,sparse).",
      specs);
  if (!opt.Parse(argc - 1, argv + 1)) {
    if (opt.Flag("help")) std::cout << opt.Help();
    return 0;
  }
  const std::vector<std::string> tasks = ParseTaskList(task);
  if (opt.Str("model").empty() || opt.Str("output").empty())
    Fail("needle eval: --model and --output are required");
  if (tasks.size() > 1 && !opt.Str("data").empty())
    Fail("--data: a data file holds the samples of one task; give one task (got '", task, "')");
  eval::PrepareTaskRunDir(opt.Str("output"), tasks);
  const eval::Shard shard =
      opt.Str("shard").empty() ? eval::ShardFromEnvironment() : eval::ParseShard(opt.Str("shard"));
  // Configurations: each --attention value; the sparse one times each --set value.
  std::vector<eval::EvalConfig> configs;
  std::string set_name, set_values;
  if (!opt.Str("set").empty()) {
    const std::string s = opt.Str("set");
    const size_t eq = s.find('=');
    if (eq == std::string::npos || eq == 0) Fail("--set: expected NAME=V1,V2,... (got '", s, "')");
    set_name = s.substr(0, eq), set_values = s.substr(eq + 1);
  }
  const std::vector<std::string> atts = SplitComma(opt.Str("attention"));
  const bool any_sparse = std::find(atts.begin(), atts.end(), "sparse") != atts.end();
  // Sparse settings are valid as soon as one configuration is sparse.
  const std::string mode = any_sparse ? "sparse" : "dense";
  const SparseConfig base = SparseConfigFromOptions(opt, &mode);
  for (const auto& att : atts) {
    if (att != "dense" && att != "sparse") Fail("--attention: '", att, "' is not dense or sparse");
    if (att == "dense") {
      configs.push_back({"dense", false, base});
    } else if (set_name.empty()) {
      configs.push_back({"sparse", true, base});
    } else {
      for (const auto& v : SplitComma(set_values)) {
        SparseConfig c = base;
        ApplySparseSetting(&c, set_name, v);
        c.Validate();
        configs.push_back({"sparse " + set_name + "=" + v, true, c});
      }
    }
  }
  if (!set_name.empty() && !any_sparse) Fail("--set needs --attention sparse");
  if (opt.Flag("needle-hits") && !any_sparse) Fail("--needle-hits needs --attention sparse");
  const int64_t batch = opt.Int("batch");
  if (batch < 1) Fail("--batch must be at least 1 (got ", batch, ")");

  RunLimits limits = RunLimitsFromOptions(opt);
  ThreadingContext tc(limits.threads);
  auto backend = MakeBackend(opt.Str("device"), opt, tc);
  limits.ubatch = ResolveUbatch(limits.ubatch, *backend);
  auto model = LoadModelFromOptions(opt, *backend, tc);
  model->set_ubatch(limits.ubatch);
  auto tok = Tokenizer::Load(opt.Str("model") + "/tokenizer.json");
  eval::RunnerOptions ro;
  ro.run_dir = opt.Str("output");
  ro.model_id = eval::ModelIdentity(opt.Str("model"));
  if (opt.Flag("dummy-weights")) ro.model_id += " dummy-weights:" + opt.Str("dummy-type");
  ro.kv_memory = limits.kv_memory;
  ro.gpu_memory = limits.gpu_memory;
  ro.placement = limits.placement;
  ro.ubatch = limits.ubatch;
  ro.context_limit =
      opt.Int("ctx-size") > 0 ? opt.Int("ctx-size") : model->config().max_position_embeddings;
  const std::string kvs = opt.Str("kv-type");
  ro.kv_type = kvs == "auto" ? model->weights().dtype : ParseKVType(kvs, "--kv-type");
  ro.recall = opt.Flag("attn-recall");
  ro.needle_hits = opt.Flag("needle-hits");
  ro.dump_plan = opt.Str("dump-plan");
  if (!ro.dump_plan.empty() && ro.dump_plan != "-") {
    std::ofstream probe(ro.dump_plan, std::ios::app);  // (fail now, not after the first sample)
    if (!probe) Fail("--dump-plan: cannot write ", ro.dump_plan);
  }
  ro.batch = batch;
  if (batch > 1 && any_sparse &&
      (ro.needle_hits || !ro.dump_plan.empty() || (backend->kv_memory() != nullptr && ro.recall)))
    std::fprintf(stderr,
                 "needle: --batch %lld: sparse configurations run one sample at a time with %s\n",
                 static_cast<long long>(batch),
                 ro.needle_hits          ? "--needle-hits"
                 : !ro.dump_plan.empty() ? "--dump-plan"
                                         : "--attn-recall on a GPU");
  ro.chat = DetectChatFamilyFromFolder(opt.Str("model"), &ro.bos, &ro.eos);
  std::fprintf(stderr, "needle: prompts %s\n",
               ro.chat == ChatFamily::kNone
                   ? "as raw text (no chat template)"
                   : (std::string("in the ") + ChatFamilyName(ro.chat) + " chat template").c_str());
  for (const auto& c : configs)
    if (const std::string note =
            LongContextNote(model->config(), ro.context_limit, c.sparse ? &c.sparse_cfg : nullptr);
        !note.empty())
      std::fprintf(stderr, "%s [%s]\n", note.c_str(), c.name.c_str());
  std::vector<eval::EvalResult> all;
  for (const auto& t : tasks) {
    eval::RunnerOptions tro = ro;
    if (tasks.size() > 1) tro.run_dir = ro.run_dir + "/" + t;
    const auto results = RunTask(t, *model, *tok, tc, configs, tro, shard, opt);
    all.insert(all.end(), results.begin(), results.end());
  }
  if (tasks.size() > 1) eval::WriteTaskListSummaries(ro.run_dir, all);
  std::cout << eval::SummaryMarkdown(all);
  return 0;
}

}  // namespace needle
