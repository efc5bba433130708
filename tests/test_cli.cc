// The needle binary end to end: exit codes and messages for good and bad input.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "datasets/niah.h"
#include "tests/cli_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

TEST(Cli, GeneratesFromFixture) {
  Result r =
      RunNeedle("generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5,6,7,8 -n 4 -t 2");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("decode"), std::string::npos) << r.output;
  // Same ids with the reference kernels.
  Result s =
      RunNeedle("generate -m " + kFx +
                "/qwen2_bias_gqa7_bf16 --prompt-ids 5,6,7,8 -n 4 --reference-kernels 2>/dev/null");
  // The generated ids are the one line made of digits and commas.
  const auto ids = [](const std::string& out) {
    std::smatch m;
    return std::regex_search(out, m, std::regex("(^|\\n)([0-9]+(,[0-9]+)*)\\n"))
               ? m[2].str()
               : std::string("none");
  };
  EXPECT_NE(ids(r.output), "none") << r.output;
  EXPECT_EQ(ids(r.output), ids(s.output));
}

TEST(Cli, DummyWeightsRun) {
  Result r = RunNeedle("generate --dummy-weights -m " + kFx +
                       "/llama_gqa4_hd64_f32/config.json --prompt-ids 1,2 -n 2");
  EXPECT_EQ(r.status, 0) << r.output;
}

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

TEST(Cli, BadInputExitsNonZeroWithMessage) {
  struct Case {
    std::string args, expect;
  };
  const Case cases[] = {
      {"generate -m /no/such/dir --prompt-ids 1", "/no/such/dir"},
      {"generate --max-new-tokns 3", "did you mean --max-new-tokens"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5,99999 -n 2", "token id 99999"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5,x", "'x' is not a token id"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5 -n abc", "expects an integer"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --kv-type int3", "--kv-type"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5,6,7 -n 4 --ctx-size 5",
       "context of 5 tokens"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16", "give exactly one of --prompt"},
      {"frobnicate", "unknown command"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --attention sparse --topk 0",
       "--topk"},
      {"generate -m " + kFx +
           "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --attention sparse --local-window 16",
       "--local-window (16)"},
      {"generate -m " + kFx +
           "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --attention sparse --preselect-blocks 3",
       "--preselect-blocks (3) is smaller than --topk (32)"},
      {"generate -m " + kFx +
           "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --attention sparse --gpu-share 101",
       "--gpu-share must be a percentage in [0, 100] (got 101)"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --attention sparse --rescore 8",
       "--rescore (8) must be 0 (off) or at least --topk (32)"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --attention sparse --repr maxx",
       "'maxx'"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --attention blocky",
       "--attention"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --attn-recall",
       "--attn-recall only applies"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --topk 8",
       "--topk only applies to --attention sparse"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --pos-remap block",
       "--pos-remap only applies to --attention sparse"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --prefill sparse",
       "--prefill only applies to --attention sparse"},
      {"generate -m " + kFx +
           "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --attention sparse --pos-remap x",
       "--pos-remap: 'x' is not none or block"},
      {"generate -m " + kFx +
           "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --attention sparse --prefill sparse --repr "
           "dynamic",
       "use repr quest, max or mean"},
      {"generate -m " + kFx +
           "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --attention sparse --prefill-chunk 0",
       "--prefill-chunk must be positive"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 -p hi --system x",
       "--system only applies with --chat"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --stop x",
       "--stop needs a text prompt"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 -p hi", "tokenizer.json"},
      {"generate -m " + kFx + "/qwen2_bias_gqa7_bf16 --prompt-ids 5 --kv-memory 1K",
       "--kv-memory allows 1.0 KiB"},
      {"data niah_single_1 -m " + std::string(NEEDLE_MODELS_DIR) +
           "/needle-tiny --lengths 1k --wordnet /nonexistent -o /tmp/needle_no_wordnet",
       "/nonexistent/index.adj: cannot open"},
  };
  for (const auto& c : cases) {
    Result r = RunNeedle(c.args);
    EXPECT_NE(r.status, 0) << c.args;
    EXPECT_LT(r.status, 128) << "crashed: " << c.args;
    EXPECT_NE(r.output.find(c.expect), std::string::npos) << c.args << "\n" << r.output;
  }
}

TEST(Cli, CorruptWeightsFileIsReportedNotCrashed) {
  test::TempDir d;
  const std::string src = kFx + "/llama_gqa4_hd64_bf16";
  std::filesystem::copy_file(src + "/config.json", d.File("config.json"));
  std::string bytes;
  {
    FILE* f = fopen((src + "/model.safetensors").c_str(), "rb");
    std::array<char, 65536> b;
    size_t n;
    while ((n = fread(b.data(), 1, b.size(), f)) > 0) bytes.append(b.data(), n);
    fclose(f);
  }
  test::WriteFile(d.File("model.safetensors"), bytes.substr(0, bytes.size() - 1000));
  Result r = RunNeedle("generate -m " + d.path() + " --prompt-ids 1,2");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("model.safetensors"), std::string::npos) << r.output;
}

TEST(Cli, SparseGenerateWithRecallAndPlan) {
  test::TempDir d;
  const std::string prompt =
      "3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32";
  Result r =
      RunNeedle("generate -m " + kFx + "/llama_gqa4_hd64_f32 --prompt-ids " + prompt +
                " -n 12 --attention sparse --block-size 4 --init-tokens 4 --local-window 8 --topk 2"
                " --dense-layers 1 --kv-type int8 --attn-recall --dump-plan " +
                d.File("plan.jsonl"));
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("attention recall per layer: 1.0000 0."), std::string::npos) << r.output;
  std::ifstream plan(d.File("plan.jsonl"));
  std::string line;
  int lines = 0, sparse = 0;
  while (std::getline(plan, line)) {
    ++lines;
    sparse += line.find("\"dense\":false") != std::string::npos;
  }
  EXPECT_EQ(lines, 11 * 2);  // 11 decode steps (the first token comes from the prompt) x 2 layers
  EXPECT_EQ(sparse, 11);     // layer 1 of each step
}

// A fixture model with a byte-level tokenizer of exactly its 256 ids: text in, text out.
TEST(Cli, TextPromptsStreamTextAndStopAtStopStrings) {
  test::TempDir d;
  const std::string src = kFx + "/llama_gqa4_hd64_f32";
  for (const char* f : {"config.json", "model.safetensors", "generation_config.json"})
    std::filesystem::copy_file(src + "/" + f, d.File(f));
  std::filesystem::copy_file(kFx + "/../tokenizer/bytes_tokenizer.json", d.File("tokenizer.json"));
  Result r =
      RunNeedle("generate -m " + d.path() + " -p \"The pass key is 7\" -n 12 --ignore-eos", false);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_FALSE(r.output.empty());
  // Sampling is reproducible for a seed.
  const std::string cmd = "generate -m " + d.path() +
                          " -p abc -n 12 --temperature 0.8 --top-p 0.9 --seed 5 --ignore-eos";
  EXPECT_EQ(RunNeedle(cmd, false).output, RunNeedle(cmd, false).output);
  // The greedy continuation, cut at a stop string taken from inside it.
  Result g = RunNeedle("generate -m " + d.path() + " -p abc -n 12 --ignore-eos", false);
  const std::string full = g.output.substr(0, g.output.size() - 1);
  if (full.size() >= 6) {
    const std::string stop = full.substr(3, 2);
    Result s = RunNeedle(
        "generate -m " + d.path() + " -p abc -n 12 --ignore-eos --stop '" + stop + "'", false);
    EXPECT_EQ(s.output, full.substr(0, full.find(stop)) + "\n");
  }
  // A prompt longer than the context: an error, or head-and-tail truncation when asked.
  Result e = RunNeedle("generate -m " + d.path() + " -p " + std::string(300, 'x') + " -n 4");
  EXPECT_EQ(e.status, 1);
  EXPECT_NE(e.output.find("--truncate middle"), std::string::npos) << e.output;
  Result t = RunNeedle("generate -m " + d.path() + " -p " + std::string(300, 'x') +
                       " -n 4 --truncate middle");
  EXPECT_EQ(t.status, 0) << t.output;
  EXPECT_NE(t.output.find("truncated in the middle from 300 to 252 tokens"), std::string::npos)
      << t.output;
}

// A model folder in d for needle ask (a fixture's weights, the byte tokenizer) and its doc.txt of
// `lines` lines; returns the document.
std::string AskFolder(test::TempDir& d, int lines) {
  const std::string src = kFx + "/llama_gqa4_hd64_f32";
  for (const char* f : {"config.json", "model.safetensors", "generation_config.json"})
    std::filesystem::copy_file(src + "/" + f, d.File(f));
  std::filesystem::copy_file(kFx + "/../tokenizer/bytes_tokenizer.json", d.File("tokenizer.json"));
  std::string doc;
  for (int i = 0; i < lines; ++i) doc += "Line " + std::to_string(i) + " of the doc. ";
  test::WriteFile(d.File("doc.txt"), doc);
  return doc;
}

// What needle generate (options m) answers for the document then each question, as needle ask
// prints it.
std::string AsGenerate(test::TempDir& d, const std::string& doc, const std::vector<std::string>& qs,
                       const std::string& m) {
  std::string want;
  for (const std::string& q : qs) {
    test::WriteFile(d.File("p.txt"), doc + "\n\n" + q);
    Result g = RunNeedle("generate" + m + " -f " + d.File("p.txt"), false);
    EXPECT_EQ(g.status, 0) << g.output;
    want += "Q: " + q + "\nA: " + g.output + "\n";
  }
  return want;
}

// Sparse attention: each question's planner over the document's shared blocks answers as
// needle generate does on the whole prompt, with a dense prefill (the document's blocks shared
// whole) and with a sparse one (shared in whole chunks and micro-batches, its last recomputed),
// and with preselection (the questions' own observation windows).
TEST(Cli, AskWithSparseAttentionAnswersAsGenerate) {
  test::TempDir d;
  const std::string doc = AskFolder(d, 40);
  const std::vector<std::string> qs = {"Which line?", "How many lines are there in it"};
  const std::string base = " -m " + d.path() +
                           " --device cpu -n 12 --ignore-eos -c 1200 --attention sparse "
                           "--block-size 16 "
                           "--init-tokens 16 --local-window 64 --topk 4 --dense-layers 0";
  for (const std::string& extra :
       {std::string(""), std::string(" --prefill sparse --prefill-chunk 32 --ubatch 64"),
        std::string(" --preselect-blocks 8 --obs-window 24 --repr max")}) {
    const std::string m = base + extra;
    const std::string want = AsGenerate(d, doc, qs, m);
    const std::string ask =
        "ask" + m + " -f " + d.File("doc.txt") + " -q '" + qs[0] + "' -q '" + qs[1] + "'";
    Result a = RunNeedle(ask, false);
    ASSERT_EQ(a.status, 0) << RunNeedle(ask).output;
    EXPECT_EQ(a.output, want) << extra;
    Result e = RunNeedle(ask);
    // The document is 792 tokens: 784 in whole blocks of 16, 768 in whole micro-batches of 64
    // (below its last token), and with an observation window of 24 the first question's prompt
    // (803 tokens) leaves its last 24 queries: 768.
    const char* reused = extra.empty() ? "question 1: 784 of 803" : "question 1: 768 of 803";
    EXPECT_NE(e.output.find(reused), std::string::npos) << extra << "\n" << e.output;
    // The document's planner's representatives of the shared Context blocks (48 of 16 tokens
    // below 784, 47 below 768, the first Initial) in both layers, for Max and Quest.
    const char* reps = extra.empty() ? "reused (with the representatives of 96 blocks x layers)"
                                     : "reused (with the representatives of 94 blocks x layers)";
    EXPECT_NE(e.output.find(reps), std::string::npos) << extra << "\n" << e.output;
  }
  // A KV file keeps the document's representatives with its KV (dense prefill): loaded, the
  // questions take them from it and answer as generate; another kind of representatives is
  // computed from the keys instead; a damaged section is refused.
  const std::string kv = " --kv-file " + d.File("doc.kv");
  Result w = RunNeedle("ask" + base + " -f " + d.File("doc.txt") + kv);
  ASSERT_EQ(w.status, 0) << w.output;
  const std::string ask =
      "ask" + base + " -f " + d.File("doc.txt") + " -q '" + qs[0] + "' -q '" + qs[1] + "'" + kv;
  EXPECT_EQ(RunNeedle(ask, false).output, AsGenerate(d, doc, qs, base));
  Result l = RunNeedle(ask);
  EXPECT_NE(l.output.find("document's KV loaded from"), std::string::npos) << l.output;
  EXPECT_NE(l.output.find("reused (with the representatives of 96 blocks x layers)"),
            std::string::npos)
      << l.output;
  Result other = RunNeedle(ask + " --repr mean");
  EXPECT_EQ(other.status, 0) << other.output;
  EXPECT_NE(other.output.find("holds no representatives of this run's kind"), std::string::npos)
      << other.output;
  {
    std::fstream f(d.File("doc.kv"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-1, std::ios::end);
    const char last = static_cast<char>(f.get());
    f.seekp(-1, std::ios::end);
    f.put(static_cast<char>(last ^ 1));
  }
  Result bad = RunNeedle(ask);
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.output.find("representatives section's checksum does not match"), std::string::npos)
      << bad.output;
}

// needle ask: the document's tokens are prefilled once and shared by every question (whole
// blocks); each answer is the one needle generate gives for the document and the question as
// one prompt. Questions may come from a config file's array too; what cannot run is refused.
TEST(Cli, AskReusesTheDocumentAndAnswersAsGenerate) {
  test::TempDir d;
  const std::string doc = AskFolder(d, 9);
  const std::vector<std::string> qs = {"Which line?", "How"};
  const std::string m = " -m " + d.path() + " --device cpu -n 8 --ignore-eos";
  const std::string want = AsGenerate(d, doc, qs, m);
  const std::string ask =
      "ask" + m + " -f " + d.File("doc.txt") + " -q '" + qs[0] + "' -q " + qs[1];
  Result a = RunNeedle(ask, false);
  ASSERT_EQ(a.status, 0) << RunNeedle(ask).output;
  EXPECT_EQ(a.output, want);
  Result e = RunNeedle(ask);
  EXPECT_NE(e.output.find("document prefilled once: " + std::to_string(doc.size() + 2)),
            std::string::npos)
      << e.output;  // (the document and the two newlines: the byte tokenizer adds no BOS)
  EXPECT_NE(e.output.find("question 2: 128 of "), std::string::npos) << e.output;
  // The questions from a config file's array.
  test::WriteFile(d.File("c.json"), R"({"question": ["Which line?", "How"]})");
  EXPECT_EQ(
      RunNeedle("ask" + m + " -f " + d.File("doc.txt") + " --config " + d.File("c.json"), false)
          .output,
      want);
  // A KV file: written by a run with no question, then loaded (not prefilled) with the same
  // answers; refused for another KV type.
  Result w = RunNeedle("ask" + m + " -f " + d.File("doc.txt") + " --kv-file " + d.File("doc.kv"));
  ASSERT_EQ(w.status, 0) << w.output;
  EXPECT_NE(w.output.find("document's KV written to"), std::string::npos) << w.output;
  Result k = RunNeedle(ask + " --kv-file " + d.File("doc.kv"), false);
  EXPECT_EQ(k.output, want);
  Result kl = RunNeedle(ask + " --kv-file " + d.File("doc.kv"));
  EXPECT_NE(kl.output.find("document's KV loaded from"), std::string::npos) << kl.output;
  EXPECT_EQ(kl.output.find("document prefilled once"), std::string::npos) << kl.output;
  Result kt = RunNeedle(ask + " --kv-file " + d.File("doc.kv") + " --kv-type bf16");
  EXPECT_EQ(kt.status, 1);
  EXPECT_NE(kt.output.find("a f32 KV cache; this run's is bf16"), std::string::npos) << kt.output;
  // Refusals.
  Result nq = RunNeedle("ask" + m + " -f " + d.File("doc.txt"));
  EXPECT_EQ(nq.status, 1);
  EXPECT_NE(nq.output.find("at least one --question"), std::string::npos) << nq.output;
  Result sp = RunNeedle(ask + " --attention sparse --prefill sparse --kv-file " + d.File("x.kv"));
  EXPECT_EQ(sp.status, 1);
  EXPECT_NE(sp.output.find("--kv-file with --prefill sparse is not supported"), std::string::npos)
      << sp.output;
  Result big = RunNeedle(ask + " --ctx-size 100");
  EXPECT_EQ(big.status, 1);
  EXPECT_NE(big.output.find("exceeds the context of 100 tokens"), std::string::npos) << big.output;
  Result nf = RunNeedle("ask" + m + " -f " + d.File("missing.txt") + " -q x");
  EXPECT_EQ(nf.status, 1);
  EXPECT_NE(nf.output.find("missing.txt"), std::string::npos) << nf.output;
}

TEST(Cli, LayeredConfiguration) {
  test::TempDir d;
  test::WriteFile(
      d.File("c.json"),
      R"({"max_new_tokens": 3, "attention": "sparse", "topk": 7, "attn-recall": true})");
  // defaults < config file < command line, each value with its source.
  Result r = RunNeedle("generate --config " + d.File("c.json") + " --topk 9 --print-config");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("max-new-tokens = 3  (config " + d.File("c.json") + ")"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("topk = 9  (command line)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("attn-recall = true  (config"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("temperature = 0  (default)"), std::string::npos) << r.output;
  // The command line wins whatever the order of --config.
  Result o = RunNeedle("generate --topk 11 --config " + d.File("c.json") + " --print-config");
  EXPECT_NE(o.output.find("topk = 11  (command line)"), std::string::npos) << o.output;
  // Unknown keys and wrong types name the file, the key and the nearest valid name.
  test::WriteFile(d.File("bad.json"), R"({"max_new_tokns": 3})");
  Result b = RunNeedle("generate --config " + d.File("bad.json") + " --print-config");
  EXPECT_EQ(b.status, 1);
  EXPECT_NE(b.output.find("bad.json: unknown key 'max_new_tokns' (did you mean 'max-new-tokens'?)"),
            std::string::npos)
      << b.output;
  test::WriteFile(d.File("type.json"), R"({"ignore-eos": 3})");
  Result t = RunNeedle("generate --config " + d.File("type.json") + " --print-config");
  EXPECT_EQ(t.status, 1);
  EXPECT_NE(t.output.find("'ignore-eos' must be true or false"), std::string::npos) << t.output;
  test::WriteFile(d.File("broken.json"), "{\"topk\": ");
  EXPECT_NE(RunNeedle("generate --config " + d.File("broken.json")).output.find("malformed JSON"),
            std::string::npos);
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

// Sparse prefill with and without position remapping, side by side through --set.
TEST(Cli, EvalSweepsPositionRemapWithSparsePrefill) {
  test::TempDir d;
  const std::string model = ByteTokenizerModel(d);
  Result r = RunNeedle("eval passkey -m " + model + " -o " + d.File("run") +
                       " --lengths 400 --depths 1 --attention sparse --prefill sparse"
                       " --prefill-chunk 16 --set pos-remap=none,block --block-size 4"
                       " --init-tokens 4 --local-window 8 --topk 2 --dense-layers 0"
                       " --ctx-size 1024 --needle-hits");
  ASSERT_EQ(r.status, 0) << r.output;
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

// Values generate once accepted or misreported (issue 22): infinite sampling settings, a
// directory as the prompt file; a block size below 4 is fine when no representative needs 4 keys.
TEST(Cli, GenerateRefusesBadValues) {
  const std::string m = "generate -m " + kFx + "/qwen2_bias_gqa7_f32 --prompt-ids 5,6,7,8 -n 2 ";
  Result t = RunNeedle(m + "--temperature inf");
  EXPECT_NE(t.status, 0);
  EXPECT_NE(t.output.find("--temperature must be a finite number"), std::string::npos) << t.output;
  Result r = RunNeedle(m + "--repetition-penalty inf");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--repetition-penalty must be a finite"), std::string::npos) << r.output;
  test::TempDir d;
  Result f = RunNeedle("generate -f " + d.path() + " -n 2");  // the bundled model
  EXPECT_NE(f.status, 0);
  EXPECT_NE(f.output.find("is a directory, not a file"), std::string::npos) << f.output;
  Result b = RunNeedle(m +
                       "--attention sparse --device cpu --block-size 2 --local-window 4 "
                       "--init-tokens 2 --topk 1 --dense-layers 0");
  EXPECT_EQ(b.status, 0) << b.output;
  // --gpu-memory is the hybrid engine's: refused without sparse attention, and when not a size.
  Result g = RunNeedle(m + "--gpu-memory 8G");
  EXPECT_NE(g.status, 0);
  EXPECT_NE(g.output.find("--gpu-memory only applies to --attention sparse"), std::string::npos)
      << g.output;
  Result gs = RunNeedle(m + "--attention sparse --gpu-memory lots");
  EXPECT_NE(gs.status, 0);
  EXPECT_NE(gs.output.find("--gpu-memory: 'lots' is not a size"), std::string::npos) << gs.output;
}

// Commands that need no GPU load no CUDA library: the runtime is linked statically (it opens
// the driver at the first CUDA call) and cuBLAS is opened when a CUDA backend is made (issue 22:
// `needle --help` held 220 MB of cuBLAS). The dynamic loader lists what it loads (LD_DEBUG).
TEST(Cli, HelpAndCpuRunsLoadNoCudaLibrary) {
  for (const std::string& args : {std::string("--help"), "generate --device cpu -m " + kFx +
                                                             "/qwen2_bias_gqa7_f32 "
                                                             "--prompt-ids 5,6 -n 1"}) {
    const Result r = RunNeedle(args, true, "LD_DEBUG=libs");
    const std::string& out = r.output;
    EXPECT_EQ(r.status, 0) << out.substr(out.size() - 500);
    EXPECT_NE(out.find("libtbb"), std::string::npos) << "LD_DEBUG printed nothing";
    for (const char* lib : {"libcublas", "libcudart.so", "libcuda.so"})
      EXPECT_EQ(out.find(lib), std::string::npos) << args << " loaded " << lib;
  }
}

TEST(Cli, InfoAndHelp) {
  Result r = RunNeedle("info -m " + kFx + "/qwen3_qknorm_gqa4_bf16");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("Qwen3ForCausalLM"), std::string::npos);
  Result h = RunNeedle("generate --help");
  EXPECT_EQ(h.status, 0);
  EXPECT_NE(h.output.find("--max-new-tokens"), std::string::npos);
  // Every command's help exits 0 and says what it takes; the top-level help lists them all.
  Result top = RunNeedle("--help");
  EXPECT_EQ(top.status, 0);
  for (const char* c : {"generate", "info", "tokenize", "eval TASK", "eval score", "data TASK"})
    EXPECT_NE(top.output.find(c), std::string::npos) << c << "\n" << top.output;
  for (const char* c : {"eval --help", "data --help", "eval passkey --help", "data passkey --help",
                        "tokenize --help", "info --help", "eval score --help"}) {
    Result r2 = RunNeedle(c);
    EXPECT_EQ(r2.status, 0) << c << "\n" << r2.output;
    EXPECT_NE(r2.output.find("usage"), std::string::npos) << c << "\n" << r2.output;
  }
  Result none = RunNeedle("eval");
  EXPECT_EQ(none.status, 2) << none.output;
  EXPECT_NE(none.output.find("tasks: passkey"), std::string::npos) << none.output;
  // -m defaults to the bundled model for tokenize too.
  Result tk = RunNeedle("tokenize --text hello --count");
  EXPECT_EQ(tk.status, 0) << tk.output;
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
