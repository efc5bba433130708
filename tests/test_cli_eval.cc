// needle eval end to end: configurations side by side, resumed runs, stale results refused,
// option checks, scoring files, dummy weights, and needle-tiny retrieving at 1K.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "datasets/niah.h"
#include "tests/cli_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

// eval takes --dummy-weights as generate does: a folder with no weights runs on random ones of
// its config's shapes, and the run's settings say so (a resumed or merged run of real weights
// is then another configuration). It used to load the folder's weights regardless.
TEST(Cli, EvalRunsOnDummyWeights) {
  test::TempDir d;
  const std::string model = ByteTokenizerModel(d);
  const std::string bare = d.File("bare");
  std::filesystem::create_directories(bare);
  for (const char* f : {"config.json", "tokenizer.json"})
    std::filesystem::copy_file(model + "/" + f, bare + "/" + f);
  Result r = RunNeedle("eval passkey -m " + bare + " -o " + d.File("run") +
                       " --lengths 400 --depths 1 --dummy-weights -t 1");
  ASSERT_EQ(r.status, 0) << r.output;
  std::ifstream preds(d.File("run") + "/predictions.jsonl");
  std::string line;
  ASSERT_TRUE(std::getline(preds, line));
  EXPECT_NE(line.find("dummy-weights:bf16"), std::string::npos) << line;
  Result real = RunNeedle("eval passkey -m " + bare + " -o " + d.File("run2") +
                          " --lengths 400 --depths 1 -t 1");
  EXPECT_NE(real.status, 0);
  EXPECT_NE(real.output.find("no model.safetensors"), std::string::npos) << real.output;
}

TEST(Cli, EvalScoreReadsInfiniteBenchAndRulerFiles) {
  test::TempDir d;
  test::WriteFile(d.File("ib.jsonl"),
                  "{\"prediction\": \"The pass key is 123.\", \"ground_truth\": [\"123\"]}\n"
                  "{\"prediction\": \"0123\", \"ground_truth\": \"123\"}\n");
  Result r = RunNeedle("eval score --task passkey --preds " + d.File("ib.jsonl"));
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("passkey: 50.00 (2 predictions"), std::string::npos) << r.output;
  test::WriteFile(d.File("ruler.jsonl"),
                  "{\"pred\": \"a 1 b 2\", \"outputs\": [\"1\", \"2\", \"3\", \"4\"]}\n");
  Result m = RunNeedle("eval score --task niah_multivalue --preds " + d.File("ruler.jsonl"));
  EXPECT_NE(m.output.find("niah_multivalue: 50.00"), std::string::npos) << m.output;
  test::WriteFile(d.File("bad.jsonl"), "{\"prediction\": \"1\"}\n{oops\n");
  Result b = RunNeedle("eval score --task passkey --preds " + d.File("bad.jsonl"));
  EXPECT_EQ(b.status, 1);
  EXPECT_NE(b.output.find("bad.jsonl:1: no reference field"), std::string::npos) << b.output;
}

// Sparse prefill with and without position remapping, side by side through --set; --needle-hits
// and --dump-plan (every decode step's plan of every layer, with its sample's key) on the way.
TEST(Cli, EvalSweepsPositionRemapWithSparsePrefill) {
  test::TempDir d;
  const std::string model = ByteTokenizerModel(d);
  Result r = RunNeedle("eval passkey -m " + model + " -o " + d.File("run") +
                       " --lengths 400 --depths 1 --attention sparse --prefill sparse"
                       " --prefill-chunk 16 --set pos-remap=none,block --block-size 4"
                       " --init-tokens 4 --local-window 8 --topk 2 --dense-layers 0"
                       " --ctx-size 1024 --needle-hits --dump-plan " +
                       d.File("plans.jsonl"));
  ASSERT_EQ(r.status, 0) << r.output;
  // --dump-plan: the plans of both configurations' sample, remapped where the configuration is.
  std::map<std::string, int> plans;
  std::ifstream pf(d.File("plans.jsonl"));
  for (std::string l; std::getline(pf, l);) {
    const auto j = nlohmann::json::parse(l);
    const std::string config = j["config"].get<std::string>();
    EXPECT_EQ(j["task"], "passkey") << l;
    EXPECT_EQ(j["id"], 0) << l;
    EXPECT_EQ(j["length"], 400) << l;
    const auto& p = j["plan"];
    ASSERT_TRUE(p["layer"].is_number() && p["step"].is_number()) << l;
    EXPECT_EQ(p.value("remap", false), config == "sparse pos-remap=block") << l;
    ++plans[config];
  }
  EXPECT_EQ(plans.size(), 2u);
  EXPECT_GT(plans["sparse pos-remap=none"], 0);
  EXPECT_EQ(plans["sparse pos-remap=block"], plans["sparse pos-remap=none"]);
  // --needle-hits: one line per sample and configuration, a share per layer.
  std::ifstream hits(d.File("run") + "/needle_hits.jsonl");
  int lines = 0;
  for (std::string l; std::getline(hits, l); ++lines) {
    const auto j = nlohmann::json::parse(l);
    ASSERT_TRUE(j["hits_per_layer"].is_array()) << l;
    EXPECT_GT(j["answer_tokens"][1].get<int64_t>(), j["answer_tokens"][0].get<int64_t>()) << l;
    for (const auto& h : j["hits_per_layer"]) EXPECT_TRUE(h.get<double>() >= 0 && h <= 1) << l;
  }
  EXPECT_EQ(lines, 2);
  EXPECT_NE(r.output.find("needle hits [sparse pos-remap=block]"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("| passkey | 400 | sparse pos-remap=none | 1 |"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("| passkey | 400 | sparse pos-remap=block | 1 |"), std::string::npos)
      << r.output;
  Result bad = RunNeedle("eval passkey -m " + model + " -o " + d.File("run2") +
                         " --lengths 400 --attention sparse --set pos-remap=far");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("--pos-remap: 'far' is not none or block"), std::string::npos)
      << bad.output;
  Result dense = RunNeedle("eval passkey -m " + model + " -o " + d.File("run3") +
                           " --lengths 400 --dump-plan " + d.File("p.jsonl"));
  EXPECT_NE(dense.status, 0);
  EXPECT_NE(dense.output.find("--dump-plan only applies to --attention sparse"), std::string::npos)
      << dense.output;
  Result nowhere =
      RunNeedle("eval passkey -m " + model + " -o " + d.File("run4") +
                " --lengths 400 --attention sparse --dump-plan " + d.File("no/such/dir/p.jsonl"));
  EXPECT_NE(nowhere.status, 0);
  EXPECT_NE(nowhere.output.find("--dump-plan: cannot write"), std::string::npos) << nowhere.output;
}

// End-to-end evaluation on a fixture model with a byte tokenizer: configurations side by side,
// results appended per sample, and a killed run resumed without redoing finished samples.
TEST(Cli, EvalRunsConfigurationsAndResumes) {
  test::TempDir d;
  const std::string model = ByteTokenizerModel(d);
  const std::string run = d.File("run");
  const std::string args =
      "eval passkey -m " + model + " -o " + run +
      " --lengths 400 --depths 2 --samples 2 --attention dense,sparse --set topk=1,2"
      " --block-size 4 --init-tokens 4 --local-window 8 --dense-layers 0 --ctx-size 1024";
  Result r = RunNeedle(args);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("| passkey | 400 | sparse topk=2 | 4 |"), std::string::npos) << r.output;
  auto lines = [&] {
    std::ifstream in(run + "/predictions.jsonl");
    std::vector<std::string> v;
    for (std::string l; std::getline(in, l);) v.push_back(l);
    return v;
  };
  const auto full = lines();
  ASSERT_EQ(full.size(), 12u);  // 3 configurations x 2 depths x 2 samples
  // Simulate a run killed mid-write: 5 finished lines and half of the sixth.
  {
    std::ofstream out(run + "/predictions.jsonl", std::ios::trunc);
    for (int i = 0; i < 5; ++i) out << full[i] << "\n";
    out << full[5].substr(0, 40);
  }
  Result again = RunNeedle(args);
  ASSERT_EQ(again.status, 0) << again.output;
  const auto resumed = lines();
  ASSERT_EQ(resumed.size(), 12u);  // the torn line was cut off, the 7 unfinished samples rerun
  for (const auto& l : resumed) EXPECT_EQ(l.back(), '}') << l;
  for (int i = 0; i < 5; ++i) EXPECT_EQ(resumed[i], full[i]);  // finished samples were not redone
  EXPECT_TRUE(std::filesystem::exists(run + "/summary.json"));
  EXPECT_TRUE(std::filesystem::exists(run + "/summary.md"));
  EXPECT_NE(r.output.find("prompts as raw text"), std::string::npos) << r.output;
  // A depth sweep gets one heatmap per configuration (the resumed run rewrote them).
  for (const char* f :
       {"heatmap_dense.png", "heatmap_sparse_topk_1.svg", "heatmap_sparse_topk_2.png"})
    EXPECT_TRUE(std::filesystem::exists(run + "/" + f)) << f;

  // The classic needle test over a haystack of the user's text, sigmoid depths.
  std::string hay;
  for (int i = 0; i < 60; ++i) hay += "This is filler sentence " + std::to_string(i) + ". ";
  test::WriteFile(d.File("hay.txt"), hay);
  Result n = RunNeedle("eval needle -m " + model + " -o " + d.File("runn") + " --haystack " +
                       d.File("hay.txt") +
                       " --lengths 900 --depths 3 --depth-spacing sigmoid --ctx-size 2048");
  EXPECT_EQ(n.status, 0) << n.output;
  EXPECT_NE(n.output.find("| needle | 900 | dense | 3 |"), std::string::npos) << n.output;

  // RULER's own file format: `input` is the whole prompt, `outputs` the answers.
  test::WriteFile(
      d.File("ruler.jsonl"),
      R"({"index": 7, "input": "A special magic number is hidden. One of the special magic numbers for x-y is: 1234567.\nWhat is the special magic number for x-y?", "answer_prefix": " The special magic number for x-y is", "outputs": ["1234567"], "length": 200})"
      "\n");
  Result rf = RunNeedle("eval niah_single_1 -m " + model + " -o " + d.File("runr") + " --data " +
                        d.File("ruler.jsonl"));
  EXPECT_EQ(rf.status, 0) << rf.output;
  EXPECT_NE(rf.output.find("| niah_single_1 | 200 | dense | 1 |"), std::string::npos) << rf.output;

  // A Qwen2 model folder: prompts go through the ChatML template (recognised from config.json).
  const std::string qwen = d.File("q");
  std::filesystem::create_directories(qwen);
  for (const char* f : {"config.json", "model.safetensors", "generation_config.json"})
    std::filesystem::copy_file(kFx + "/qwen2_bias_gqa7_f32/" + f, qwen + "/" + f);
  std::filesystem::copy_file(kFx + "/../tokenizer/bytes_tokenizer.json", qwen + "/tokenizer.json");
  Result q = RunNeedle("eval passkey -m " + qwen + " -o " + d.File("runq") +
                       " --lengths 400 --depths 1 --ctx-size 1024");
  EXPECT_EQ(q.status, 0) << q.output;
  EXPECT_NE(q.output.find("prompts in the chatml chat template"), std::string::npos) << q.output;
  std::ifstream in(d.File("runq") + "/predictions.jsonl");
  std::string line;
  std::getline(in, line);
  // Byte tokens: the prompt holds the ChatML wrapper (<|im_start|>user ... <|im_start|>assistant).
  const int64_t tokens = nlohmann::json::parse(line)["prompt_tokens"];
  EXPECT_GT(tokens, 300);
}

// A rerun into the same run directory reuses a finished result only when it answered the same
// thing: other sparse settings under the same configuration name, or another sample under the
// same id, are refused before anything runs, naming the file and both settings; --data lines
// with a repeated id are refused.
TEST(Cli, EvalRefusesStaleResults) {
  test::TempDir d;
  const std::string model = ByteTokenizerModel(d);
  const std::string run = d.File("run");
  const std::string base = "eval passkey -m " + model + " -o " + run +
                           " --lengths 300 --depths 1 --samples 1 --attention sparse"
                           " --block-size 4 --init-tokens 4 --dense-layers 0 --ctx-size 1024";
  Result a = RunNeedle(base + " --topk 8 --local-window 16");
  ASSERT_EQ(a.status, 0) << a.output;
  auto lines = [&] {
    std::ifstream in(run + "/predictions.jsonl");
    std::vector<std::string> v;
    for (std::string l; std::getline(in, l);) v.push_back(l);
    return v;
  };
  ASSERT_EQ(lines().size(), 1u);
  // The same settings: resumed, nothing rerun.
  Result same = RunNeedle(base + " --topk 8 --local-window 16");
  ASSERT_EQ(same.status, 0) << same.output;
  EXPECT_EQ(lines().size(), 1u);
  // Other sparse settings under the same name ("sparse"): refused, the old table not printed.
  Result other = RunNeedle(base + " --topk 1 --local-window 8");
  EXPECT_NE(other.status, 0) << other.output;
  EXPECT_NE(other.output.find("predictions.jsonl: configuration 'sparse' was run with other "
                              "settings"),
            std::string::npos)
      << other.output;
  EXPECT_NE(other.output.find("topk=8"), std::string::npos) << other.output;
  EXPECT_NE(other.output.find("topk=1"), std::string::npos) << other.output;
  EXPECT_EQ(other.output.find("| passkey |"), std::string::npos) << other.output;
  EXPECT_EQ(lines().size(), 1u);
  // Another sample under the same id and length (another seed): refused.
  Result seed = RunNeedle(base + " --topk 8 --local-window 16 --seed 99");
  EXPECT_NE(seed.status, 0) << seed.output;
  EXPECT_NE(seed.output.find("was another sample"), std::string::npos) << seed.output;
  // A result written without its settings (older needle): refused, not trusted.
  {
    const std::string line = lines()[0];
    auto j = nlohmann::json::parse(line);
    j.erase("settings");
    std::ofstream out(run + "/predictions.jsonl", std::ios::trunc);
    out << j.dump() << "\n";
  }
  Result old = RunNeedle(base + " --topk 8 --local-window 16");
  EXPECT_NE(old.status, 0) << old.output;
  EXPECT_NE(old.output.find("does not record its settings"), std::string::npos) << old.output;

  // --data with a repeated id at one length.
  const std::string line =
      R"({"index": 3, "input": "One of the special magic numbers for x-y is: 42.\nWhat is the special magic number for x-y?", "answer_prefix": " The special magic number for x-y is", "outputs": ["42"], "length": 100})";
  test::WriteFile(d.File("dup.jsonl"), line + "\n" + line + "\n");
  Result dup = RunNeedle("eval niah_single_1 -m " + model + " -o " + d.File("rund") + " --data " +
                         d.File("dup.jsonl"));
  EXPECT_NE(dup.status, 0) << dup.output;
  EXPECT_NE(dup.output.find("id 3 appears twice at length 100"), std::string::npos) << dup.output;
}

// needle eval validates the run options as generate does, and refuses what cannot give a
// result instead of exiting 0 with an empty table or silently ignoring a flag.
TEST(Cli, EvalValidatesItsOptions) {
  test::TempDir d;
  const std::string model = ByteTokenizerModel(d);
  const std::string base = "eval passkey -m " + model + " -o " + d.File("run") + " ";
  const std::pair<std::string, std::string> refused[] = {
      {"-t -1 --lengths 400", "--threads must be between"},
      {"--ubatch -1 --lengths 400", "--ubatch must be positive, or 0"},
      {"--lengths \"\"", "--lengths: no length given"},
      {"--lengths 100m --ctx-size 1024", "--lengths: 104857600 tokens is more than needle"},
      {"--lengths 400 --depths 100000000", "--depths: 100000000 is not between 1 and 1000"},
      {"--lengths 400 --kv-memory nan", "--kv-memory: 'nan' is not a size"},
      {"--lengths 400 --kv-memory 1e30", "--kv-memory: '1e30' is larger than any memory"},
      {"--lengths 400 --ctx-size 1024 --kv-memory 1K", "but --kv-memory allows 1.0 KiB"},
      {"--lengths 400 -c 7", "--ctx-size 7 leaves no room for a prompt"},
  };
  for (const auto& [args, message] : refused) {
    Result r = RunNeedle(base + args);
    EXPECT_NE(r.status, 0) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(message), std::string::npos) << args << "\n" << r.output;
  }
  // A context limit that cuts the prompt: run, with a warning.
  Result cut = RunNeedle(base + "--lengths 400 --depths 1 -c 40");
  EXPECT_EQ(cut.status, 0) << cut.output;
  EXPECT_NE(cut.output.find("its prompts will be cut in the middle"), std::string::npos)
      << cut.output;
  EXPECT_NE(cut.output.find("are cut in the middle"), std::string::npos) << cut.output;
  // An empty --data file.
  test::WriteFile(d.File("empty.jsonl"), "");
  Result e = RunNeedle(base + "--data " + d.File("empty.jsonl"));
  EXPECT_NE(e.status, 0) << e.output;
  EXPECT_NE(e.output.find("no samples to evaluate"), std::string::npos) << e.output;
}

// The bundled model retrieves: passkey at 1K tokens, 3 depths, dense and (with a budget far
// below the prompt) sparse attention, all correct. This is the README's main job, scaled down.
TEST(Cli, NeedleTinyFindsThePasskey) {
  test::TempDir d;
  Result r = RunNeedle("eval passkey -m " NEEDLE_MODELS_DIR "/needle-tiny -o " + d.File("run") +
                       " --lengths 1k --depths 3 --attention dense,sparse --init-tokens 16"
                       " --local-window 64 --block-size 32 --topk 4 --dense-layers 1");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("| passkey | 1024 | dense | 3 | 100.00 |"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("| passkey | 1024 | sparse | 3 | 100.00 |"), std::string::npos)
      << r.output;
}

// The classic needle (words, not digits) in the default haystack, with sparse attention reading
// about 40% of the 1K prompt: needle-tiny must copy the San Francisco sentence in both settings.
TEST(Cli, NeedleTinyFindsTheClassicNeedle) {
  if (!std::filesystem::exists(datasets::kDefaultHaystack))
    GTEST_SKIP() << datasets::kDefaultHaystack << " is missing (Debian package jargon-text)";
  test::TempDir d;
  Result r = RunNeedle("eval needle -m " NEEDLE_MODELS_DIR "/needle-tiny -o " + d.File("run") +
                       " --lengths 1k --depths 3 --attention dense,sparse --init-tokens 16"
                       " --local-window 64 --block-size 32 --topk 8 --dense-layers 1");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("| needle | 1024 | dense | 3 | 100.00 |"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("| needle | 1024 | sparse | 3 | 100.00 |"), std::string::npos)
      << r.output;
}

}  // namespace
}  // namespace needle
