// The needle binary end to end: exit codes and messages for good and bad input.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>

#include "tests/cli_test_util.h"
#include "tests/test_util.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/cuda_backend.h"
#endif

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

// The hybrid engine's decode split at the end of a run: its steps, and which side attended the
// Context blocks (none of it for a run on the CPU). On the GPU machine, NEEDLE_TEST_BINARY names
// the carried binary.
TEST(Cli, HybridGeneratePrintsItsDecodeSplit) {
  const std::string args =
      "generate -m " + kFx +
      "/llama_gqa4_hd64_f32 --prompt-ids "
      "3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,"
      "35,36,37,38,39,40 -n 12 --attention sparse --block-size 4 --init-tokens 4 --local-window 8 "
      "--topk 4 --dense-layers 1 ";
  Result cpu = RunNeedle(args + "--device cpu");
  ASSERT_EQ(cpu.status, 0) << cpu.output;
  EXPECT_EQ(cpu.output.find("hybrid decode"), std::string::npos) << cpu.output;
#ifdef NEEDLE_HAVE_CUDA
  std::string why;
  if (!CudaAvailable(&why)) GTEST_SKIP() << "no GPU: " << why;
  Result r = RunNeedle(args + "--device cuda");
  ASSERT_EQ(r.status, 0) << r.output;
  // 11 decode steps (the first token comes from the prompt); --gpu-share's default 60% of each
  // head's 4 blocks is 2, so the GPU attends some of them.
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.output, m,
                                std::regex("hybrid decode, 11 steps, per step: .*Context blocks: "
                                           "([0-9.]+)% on the GPU")))
      << r.output;
  EXPECT_GE(std::stod(m[1]), 50.0) << r.output;
  EXPECT_LE(std::stod(m[1]), 100.0) << r.output;
#else
  GTEST_SKIP() << "no GPU: this build has no CUDA (nvcc was not found at configure time)";
#endif
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

}  // namespace
}  // namespace needle
