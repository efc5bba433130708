#include "eval/runner.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "datasets/infinitebench.h"
#include "datasets/niah.h"
#include "datasets/ruler.h"
#include "engine/base/error.h"
#include "engine/model/generate.h"
#include "engine/runtime/sequence_attention.h"
#include "eval/data_files.h"
#include "eval/runner_batch.h"
#include "eval/samples.h"
#include "eval/scoring.h"
#include "sparse_attn/sparse_attention.h"

namespace needle::eval {

using json = nlohmann::json;

namespace {

// Tokens [*b, *e) of `ids` whose text holds the first occurrence of `answer` (-1, -1: absent),
// found by decoding the prompt token by token.
void AnswerTokens(const Tokenizer& tok, const std::vector<int32_t>& ids, const std::string& answer,
                  int64_t* b, int64_t* e) {
  *b = *e = -1;
  if (answer.empty()) return;
  StreamDecoder dec(tok, false);
  std::string text;
  std::vector<size_t> end_at(ids.size());  // text length after token i
  for (size_t i = 0; i < ids.size(); ++i) {
    text += dec.Push(ids[i]);
    end_at[i] = text.size();
  }
  const size_t at = text.find(answer);
  if (at == std::string::npos) return;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (*b < 0 && end_at[i] > at) *b = static_cast<int64_t>(i);
    if (end_at[i] >= at + answer.size()) {
      *e = static_cast<int64_t>(i) + 1;
      return;
    }
  }
}

// A sample's plans (the planner's JSON lines) into --dump-plan's file, each with the sample's key.
void WritePlans(const std::string& path, const EvalResult& r, const std::string& plans) {
  std::ostringstream lines;
  std::istringstream in(plans);
  for (std::string line; std::getline(in, line);) {
    nlohmann::json j;
    j["config"] = r.config, j["task"] = r.task, j["length"] = r.length, j["id"] = r.id;
    j["plan"] = nlohmann::json::parse(line);
    lines << j.dump() << "\n";
  }
  if (path == "-") {
    std::fputs(lines.str().c_str(), stderr);
    return;
  }
  std::ofstream out(path, std::ios::app);
  out << lines.str();
  out.flush();
  if (!out) Fail("--dump-plan: cannot write ", path);
}

// One line of RUN_DIR/needle_hits.jsonl, and its summary on stderr.
void WriteNeedleHits(const std::string& run_dir, const EvalResult& r, int64_t b, int64_t e,
                     const SparseAttention& sp) {
  nlohmann::json j;
  j["config"] = r.config, j["task"] = r.task, j["id"] = r.id, j["length"] = r.length;
  j["depth"] = r.depth, j["answer_tokens"] = {b, e}, j["score"] = r.score;
  const std::vector<double> hits = sp.WatchPerLayer();
  j["hits_per_layer"] = hits;
  std::ofstream out(run_dir + "/needle_hits.jsonl", std::ios::app);
  out << j.dump() << "\n";
  if (!out) Fail("cannot write ", run_dir, "/needle_hits.jsonl");
  std::string line;
  for (double h : hits) line += h < 0 ? " -" : " " + std::to_string(h).substr(0, 4);
  std::fprintf(stderr, "needle hits [%s] sample %lld (answer tokens %lld..%lld), per layer:%s\n",
               r.config.c_str(), static_cast<long long>(r.id), static_cast<long long>(b),
               static_cast<long long>(e), line.c_str());
}

}  // namespace

std::string ModelIdentity(const std::string& dir) {
  std::ifstream in(dir + "/config.json", std::ios::binary);
  if (!in) Fail(dir, "/config.json: cannot read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return std::filesystem::absolute(dir).lexically_normal().string() +
         " config.json:" + StableHash(ss.str());
}

std::string RunSettings(const EvalConfig& cfg, const RunnerOptions& opt) {
  std::ostringstream os;
  os << "model=" << opt.model_id << " kv=" << KVTypeName(opt.kv_type)
     << " ctx=" << opt.context_limit << " prompt=" << ChatFamilyName(opt.chat)
     << " sampling=greedy attention=";
  if (cfg.sparse)
    os << "sparse " << cfg.sparse_cfg.Describe();
  else
    os << "dense";
  return os.str();
}

int64_t MaxNewTokens(const std::string& task) {
  if (datasets::IsRulerTask(task)) return datasets::kRulerMaxNewTokens;
  return task == "needle" ? 300
                          : datasets::InfiniteBenchMaxNewTokens(task);  // the originals' limits
}

double MeanRecall(const SparseAttention& sp) {
  double sum = 0;
  int64_t n = 0;
  for (double x : sp.RecallPerLayer())
    if (x >= 0) sum += x, ++n;
  return n ? sum / static_cast<double>(n) : -1;
}

EvalResult MakeResult(const std::string& task, const EvalConfig& cfg, const datasets::Sample& s,
                      const RunnerOptions& opt, int64_t prompt_tokens, const std::string& text,
                      const GenerateStats& st) {
  EvalResult r;
  r.config = cfg.name, r.task = task, r.id = s.id, r.length = s.target_tokens, r.depth = s.depth;
  r.settings = RunSettings(cfg, opt);
  r.sample = SampleHash(task, s);
  r.prompt_tokens = prompt_tokens;
  r.prediction = text;
  r.answer = s.answer;
  r.score = ScoreTask(task, text, s.answer);
  r.prefill_tps = st.prompt_tokens / std::max(st.prefill_seconds, 1e-9);
  r.decode_tps = st.new_tokens > 1 ? (st.new_tokens - 1) / std::max(st.decode_seconds, 1e-9) : 0.0;
  return r;
}

std::vector<int32_t> PromptIds(const std::string& task, const datasets::Sample& s,
                               const Tokenizer& tok, const RunnerOptions& opt) {
  bool add_bos = true;
  const std::string text = PromptText(task, s, opt, &add_bos);
  return tok.Encode(text, add_bos);
}

std::vector<EvalResult> RunEval(Model& model, const Tokenizer& tok, ThreadingContext& tc,
                                const std::string& task,
                                const std::vector<datasets::Sample>& samples,
                                const std::vector<EvalConfig>& configs, const RunnerOptions& opt) {
  std::filesystem::create_directories(opt.run_dir);
  const std::string pred_path = opt.run_dir + "/predictions.jsonl";
  if (samples.empty())
    Fail("needle eval ", task, ": no samples to evaluate (an empty --lengths, or a --data file ",
         "without lines)");
  const int64_t max_new = MaxNewTokens(task);
  if (opt.context_limit <= max_new + 1)
    Fail("--ctx-size ", opt.context_limit, " leaves no room for a prompt: ", task,
         " answers in up to ", max_new, " tokens");
  std::vector<EvalResult> results = ReadResults(pred_path);
  // Checked before anything runs: unique sample ids, and finished results that answered
  // exactly what this run would ask.
  std::map<std::pair<int64_t, int64_t>, const datasets::Sample*> by_id;
  for (const auto& s : samples)
    if (!by_id.emplace(std::make_pair(s.target_tokens, s.id), &s).second)
      Fail(task, " samples: id ", s.id, " appears twice at length ", s.target_tokens,
           " (ids must be unique per length, or their results cannot be told apart)");
  std::map<std::string, const EvalResult*> finished_by_key;
  for (const auto& r : results) finished_by_key[ResultKey(r.config, r.task, r.length, r.id)] = &r;
  std::set<std::string> done;
  for (const auto& cfg : configs) {
    const std::string want = RunSettings(cfg, opt);
    for (const auto& s : samples) {
      const std::string key = ResultKey(cfg.name, task, s.target_tokens, s.id);
      auto it = finished_by_key.find(key);
      if (it == finished_by_key.end()) continue;
      const EvalResult& r = *it->second;
      if (r.settings.empty())
        Fail(pred_path, ": the result of configuration '", cfg.name, "', ", task, " sample ", s.id,
             " at length ", s.target_tokens,
             " does not record its settings (an older needle wrote it), so it cannot be "
             "reused; evaluate into a new --output directory");
      if (r.settings != want)
        Fail(pred_path, ": configuration '", cfg.name,
             "' was run with other settings\n  then: ", r.settings, "\n  now:  ", want,
             "\nits results would be reused for settings they did not answer: evaluate into a "
             "new --output directory");
      if (r.sample != SampleHash(task, s))
        Fail(pred_path, ": ", task, " sample ", s.id, " at length ", s.target_tokens,
             " of configuration '", cfg.name,
             "' was another sample (other text, answer or depth: another dataset or seed); "
             "evaluate into a new --output directory");
      done.insert(key);
    }
  }
  std::ofstream out(pred_path, std::ios::app);
  if (!out) Fail(pred_path, ": cannot append");
  const int64_t total = static_cast<int64_t>(samples.size() * configs.size());
  int64_t finished = static_cast<int64_t>(done.size()), ran = 0;
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t cut_prompts = 0;
  // The time left is estimated by tokens, not by samples: a sweep runs its short lengths first,
  // so a per-sample rate would promise too little and climb as the run goes.
  auto weight = [](const datasets::Sample& s) {
    return static_cast<double>(std::max<int64_t>(s.target_tokens, 1));
  };
  double pending_w = 0, done_w = 0;
  for (const auto& cfg : configs)
    for (const auto& s : samples)
      if (!done.count(ResultKey(cfg.name, task, s.target_tokens, s.id))) pending_w += weight(s);
  // A sample's prompt tokens, cut in the middle to fit the context (InfiniteBench's rule).
  const auto prompt_ids = [&](const datasets::Sample& s) {
    std::vector<int32_t> ids = PromptIds(task, s, tok, opt);
    const int64_t room = opt.context_limit - max_new;
    if (room > 1 &&
        static_cast<int64_t>(ids.size()) > room) {  // keep head and tail (InfiniteBench)
      if (cut_prompts++ == 0)
        std::fprintf(stderr,
                     "needle: warning: %s sample %lld has %zu prompt tokens; prompts longer "
                     "than %lld (--ctx-size %lld minus %lld answer tokens) are cut in the "
                     "middle\n",
                     task.c_str(), static_cast<long long>(s.id), ids.size(),
                     static_cast<long long>(room), static_cast<long long>(opt.context_limit),
                     static_cast<long long>(max_new));
      std::vector<int32_t> cut(ids.begin(), ids.begin() + room / 2);
      cut.insert(cut.end(), ids.end() - (room - room / 2), ids.end());
      ids = std::move(cut);
    }
    return ids;
  };
  // A finished sample: its line appended (and flushed: a killed run loses nothing finished).
  const auto record = [&](EvalResult r, const datasets::Sample& s) {
    out << ResultToJson(r).dump() << "\n";
    out.flush();
    results.push_back(std::move(r));
    ++finished, ++ran;
    done_w += weight(s);
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double left = el / done_w * std::max(0.0, pending_w - done_w);
    std::fprintf(stderr,
                 tty ? "\reval %s [%s] %lld/%lld samples, length %lld, %.0f s left   "
                     : "eval %s [%s] %lld/%lld samples, length %lld, %.0f s left\n",
                 task.c_str(), results.back().config.c_str(), static_cast<long long>(finished),
                 static_cast<long long>(total), static_cast<long long>(s.target_tokens), left);
  };
  for (const auto& cfg : configs) {
    // Samples decoded together (runner_batch.h): dense, sparse on the CPU, or sparse on a GPU
    // (the Engine's slots; not with --attn-recall, whose counts a slot's planner would carry
    // from sample to sample). Not with --needle-hits or --dump-plan, which read each sample's
    // planner as it goes.
    // Every run on a GPU takes the backend's batch kernels whatever --batch is (the Engine does),
    // so that --batch never changes an answer there either.
    const bool gpu = model.backend().kv_memory() != nullptr;
    model.backend().PreferBatchKernels(!cfg.sparse || gpu);
    const bool batched =
        opt.batch > 1 &&
        (!cfg.sparse || (!opt.needle_hits && opt.dump_plan.empty() && (!gpu || !opt.recall)));
    if (batched) {
      std::vector<const datasets::Sample*> todo;
      for (const auto& s : samples)
        if (!done.count(ResultKey(cfg.name, task, s.target_tokens, s.id))) todo.push_back(&s);
      RunBatched(model, tok, tc, task, cfg, todo, opt, max_new, prompt_ids, record);
      continue;
    }
    for (const auto& s : samples) {
      if (done.count(ResultKey(cfg.name, task, s.target_tokens, s.id))) continue;
      std::vector<int32_t> ids = prompt_ids(s);
      const int64_t ctx = static_cast<int64_t>(ids.size()) + max_new;
      SequenceOptions so;
      so.ctx = ctx;
      so.kv_type = opt.kv_type;
      so.kv_memory = opt.kv_memory;
      so.gpu_memory = opt.gpu_memory;
      so.ubatch = opt.ubatch;
      so.placement = opt.placement;
      SequenceAttention seq =
          MakeSequenceAttention(model, cfg.sparse ? &cfg.sparse_cfg : nullptr, tc, so);
      // (The placement the first time, and whenever a longer context changes it.)
      static std::string placement_said;
      if (seq.hybrid && seq.placement != placement_said)
        std::fprintf(stderr, "eval %s [%s]: %s\n", task.c_str(), cfg.name.c_str(),
                     (placement_said = seq.placement).c_str());
      KVCache& cache = *seq.cache;
      SparseAttention* sp = seq.planner;
      if (sp != nullptr) sp->set_recall(opt.recall);
      int64_t watch_b = -1, watch_e = -1;
      if (sp != nullptr && opt.needle_hits && !s.answer.empty())
        AnswerTokens(tok, ids, s.answer[0], &watch_b, &watch_e);
      if (sp != nullptr && opt.needle_hits) sp->set_watch(watch_b, watch_e);
      std::ostringstream plans;
      if (sp != nullptr && !opt.dump_plan.empty()) sp->set_plan_sink(&plans);
      model.set_attention(seq.policy.get());
      // A long prompt takes seconds to minutes: say what is running (on a terminal, how far the
      // prefill got; in a log, one line when it starts).
      const int64_t P = static_cast<int64_t>(ids.size());
      if (P >= 32768 && !tty)
        std::fprintf(stderr, "eval %s [%s] sample %lld: prefill of %lld tokens\n", task.c_str(),
                     cfg.name.c_str(), static_cast<long long>(s.id), static_cast<long long>(P));
      if (P >= 8192 && tty)
        model.set_progress([&](int64_t done, int64_t total) {
          if (total > 1)
            std::fprintf(stderr, "\reval %s [%s] sample %lld: prefill %lld/%lld tokens   ",
                         task.c_str(), cfg.name.c_str(), static_cast<long long>(s.id),
                         static_cast<long long>(done), static_cast<long long>(total));
        });
      GenerateStats st;
      StreamDecoder dec(tok, true);
      std::string text;
      Generate(
          model, cache, ids, max_new, SamplingParams{},
          [&](int32_t id) {
            text += dec.Push(id);
            return true;
          },
          &st);
      text += dec.Flush();
      model.set_attention(nullptr);
      model.set_progress(nullptr);
      EvalResult r = MakeResult(task, cfg, s, opt, static_cast<int64_t>(ids.size()), text, st);
      if (sp && opt.recall) r.recall = MeanRecall(*sp);
      if (sp != nullptr && opt.needle_hits) WriteNeedleHits(opt.run_dir, r, watch_b, watch_e, *sp);
      if (sp != nullptr && !opt.dump_plan.empty()) {
        sp->set_plan_sink(nullptr);
        WritePlans(opt.dump_plan, r, plans.str());
      }
      record(std::move(r), s);
    }
  }
  if (tty && ran > 0) std::fprintf(stderr, "\n");
  if (cut_prompts > 1)
    std::fprintf(stderr, "needle: warning: %lld prompts were cut in the middle to fit --ctx-size\n",
                 static_cast<long long>(cut_prompts));
  WriteRunSummaries(task, results, opt.run_dir);
  return results;
}

}  // namespace needle::eval
