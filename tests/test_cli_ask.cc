// needle ask end to end: one prefill of the document, each question answered from its KV as
// needle generate answers the whole prompt (dense and sparse attention, KV files).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "tests/cli_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

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

}  // namespace
}  // namespace needle
