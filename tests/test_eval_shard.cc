// Sharded evaluation (eval/shard.h): --shard and the schedulers' variables, the slices, and
// `needle eval merge` against one process's run.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "eval/data_files.h"
#include "eval/shard.h"
#include "tests/cli_test_util.h"
#include "tests/eval_test_util.h"
#include "tests/test_util.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/cuda_backend.h"
#endif

namespace needle {
namespace {

// The scheduler variables a test sets, cleared before and after it.
class ShardEnv : public ::testing::Test {
 protected:
  static constexpr const char* kVars[] = {"SLURM_ARRAY_TASK_ID",    "SLURM_ARRAY_TASK_MIN",
                                          "SLURM_ARRAY_TASK_MAX",   "SLURM_ARRAY_TASK_STEP",
                                          "SLURM_ARRAY_TASK_COUNT", "JOB_COMPLETION_INDEX",
                                          "NEEDLE_SHARD_COUNT"};
  void SetUp() override { Clear(); }
  void TearDown() override { Clear(); }
  static void Clear() {
    for (const char* v : kVars) unsetenv(v);
  }
};

std::string ErrorOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

TEST(EvalShard, ParsesIOverN) {
  const eval::Shard s = eval::ParseShard("2/5");
  EXPECT_EQ(s.index, 2);
  EXPECT_EQ(s.count, 5);
  EXPECT_TRUE(s.sharded());
  EXPECT_FALSE(eval::ParseShard("0/1").sharded());
  for (const char* bad : {"3", "5/5", "-1/4", "1/0", "a/4", "1/4x", "/4", "1/", "1/99999999999"}) {
    const std::string e = ErrorOf([&] { eval::ParseShard(bad); });
    EXPECT_NE(e.find("--shard"), std::string::npos) << bad << ": " << e;
  }
}

TEST_F(ShardEnv, SlurmArrayAndKubernetesIndex) {
  EXPECT_FALSE(eval::ShardFromEnvironment().sharded());  // neither
  // --array=4-10:2 -> tasks 4, 6, 8, 10: task 8 is shard 2 of 4.
  setenv("SLURM_ARRAY_TASK_ID", "8", 1);
  setenv("SLURM_ARRAY_TASK_MIN", "4", 1);
  setenv("SLURM_ARRAY_TASK_MAX", "10", 1);
  setenv("SLURM_ARRAY_TASK_STEP", "2", 1);
  setenv("SLURM_ARRAY_TASK_COUNT", "4", 1);
  eval::Shard s = eval::ShardFromEnvironment();
  EXPECT_EQ(s.index, 2);
  EXPECT_EQ(s.count, 4);
  EXPECT_EQ(s.source, "SLURM_ARRAY_TASK_ID");
  // A list the count does not match (--array=1,5,9) cannot be sliced by the range.
  setenv("SLURM_ARRAY_TASK_COUNT", "3", 1);
  EXPECT_NE(ErrorOf([] { eval::ShardFromEnvironment(); }).find("SLURM_ARRAY_TASK_COUNT"),
            std::string::npos);
  // Only the ID and the count.
  Clear();
  setenv("SLURM_ARRAY_TASK_ID", "1", 1);
  setenv("SLURM_ARRAY_TASK_COUNT", "3", 1);
  s = eval::ShardFromEnvironment();
  EXPECT_EQ(s.index, 1);
  EXPECT_EQ(s.count, 3);
  setenv("SLURM_ARRAY_TASK_ID", "3", 1);
  EXPECT_NE(ErrorOf([] { eval::ShardFromEnvironment(); }).find("not below"), std::string::npos);
  unsetenv("SLURM_ARRAY_TASK_COUNT");
  EXPECT_NE(ErrorOf([] { eval::ShardFromEnvironment(); }).find("--shard I/N"), std::string::npos);
  // Kubernetes: the index, and the count the manifest sets.
  Clear();
  setenv("JOB_COMPLETION_INDEX", "3", 1);
  EXPECT_NE(ErrorOf([] { eval::ShardFromEnvironment(); }).find("NEEDLE_SHARD_COUNT"),
            std::string::npos);
  setenv("NEEDLE_SHARD_COUNT", "8", 1);
  s = eval::ShardFromEnvironment();
  EXPECT_EQ(s.index, 3);
  EXPECT_EQ(s.count, 8);
  setenv("NEEDLE_SHARD_COUNT", "eight", 1);
  EXPECT_NE(ErrorOf([] { eval::ShardFromEnvironment(); }).find("NEEDLE_SHARD_COUNT"),
            std::string::npos);
}

TEST(EvalShard, SlicesPartitionTheSamples) {
  std::vector<datasets::Sample> all(11);
  for (size_t i = 0; i < all.size(); ++i) all[i].id = static_cast<int64_t>(i);
  std::multiset<int64_t> seen;
  for (int64_t k = 0; k < 4; ++k) {
    const auto part = eval::SelectShard(all, eval::ParseShard(std::to_string(k) + "/4"));
    EXPECT_GE(part.size(), 2u);  // 11 over 4: 3, 3, 3, 2
    EXPECT_LE(part.size(), 3u);
    for (const auto& s : part) seen.insert(s.id);
  }
  EXPECT_EQ(seen, std::multiset<int64_t>({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  EXPECT_TRUE(eval::SelectShard(all, eval::ParseShard("20/21")).empty());
}

// Writes a run directory holding `results` (and shard.json when s is sharded).
void WriteRun(const std::string& dir, const std::vector<eval::EvalResult>& results,
              const eval::Shard& s, const std::vector<datasets::Sample>& all) {
  std::filesystem::create_directories(dir);
  std::ofstream out(dir + "/predictions.jsonl");
  for (const auto& r : results) out << eval::ResultToJson(r).dump() << "\n";
  if (s.sharded()) eval::WriteShardFile(dir, "passkey", s, all);
}

eval::EvalResult R(const std::string& config, int64_t id, const std::string& settings = "s1") {
  eval::EvalResult r;
  r.config = config, r.task = "passkey", r.id = id, r.length = 100, r.settings = settings;
  r.sample = "h" + std::to_string(id), r.prediction = "p", r.answer = {"p"}, r.score = 1;
  return r;
}

TEST(EvalShard, MergeJoinsSlicesAndRefusesWhatIsNotOneEvaluation) {
  test::TempDir d;
  std::vector<datasets::Sample> all(3);
  for (int i = 0; i < 3; ++i) all[i].id = i, all[i].target_tokens = 100, all[i].input = "x";
  WriteRun(d.File("a"), {R("dense", 0), R("dense", 2)}, eval::ParseShard("0/2"), all);
  WriteRun(d.File("b"), {R("dense", 1)}, eval::ParseShard("1/2"), all);
  const auto merged = eval::MergeRuns({d.File("b"), d.File("a")}, d.File("m"));
  ASSERT_EQ(merged.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(merged[i].id, i);  // sample order, whatever the dirs'
  EXPECT_EQ(eval::ReadResults(d.File("m") + "/predictions.jsonl").size(), 3u);
  EXPECT_TRUE(std::filesystem::exists(d.File("m") + "/summary.md"));
  auto refused = [&](const std::vector<std::string>& dirs, const std::string& out) {
    return ErrorOf([&] { eval::MergeRuns(dirs, d.File(out)); });
  };
  // Into a directory that already holds results.
  EXPECT_NE(refused({d.File("a"), d.File("b")}, "m").find("already holds results"),
            std::string::npos);
  // A shard twice, a shard missing.
  EXPECT_NE(refused({d.File("a"), d.File("a")}, "m2").find("given twice"), std::string::npos);
  EXPECT_NE(refused({d.File("a")}, "m3").find("missing"), std::string::npos);
  // A slice of another sample list (another seed or lengths).
  std::vector<datasets::Sample> other = all;
  other[2].input = "y";
  WriteRun(d.File("c"), {R("dense", 1)}, eval::ParseShard("1/2"), other);
  EXPECT_NE(refused({d.File("a"), d.File("c")}, "m4").find("not slices of one evaluation"),
            std::string::npos);
  // A configuration run with other settings.
  WriteRun(d.File("e"), {R("dense", 1, "s2")}, eval::ParseShard("1/2"), all);
  EXPECT_NE(refused({d.File("a"), d.File("e")}, "m5").find("other settings"), std::string::npos);
  // Unsharded runs merge when they do not overlap, and are refused when they do.
  WriteRun(d.File("u1"), {R("dense", 0)}, eval::Shard{}, all);
  WriteRun(d.File("u2"), {R("sparse", 0)}, eval::Shard{}, all);
  EXPECT_EQ(eval::MergeRuns({d.File("u1"), d.File("u2")}, d.File("m6")).size(), 2u);
  EXPECT_NE(refused({d.File("u1"), d.File("u1")}, "m7").find("is in both"), std::string::npos);
  // A sharded run directory is not reused for another shard.
  EXPECT_NE(ErrorOf([&] {
              eval::WriteShardFile(d.File("a"), "passkey", eval::ParseShard("1/2"), all);
            }).find("holds shard 0/2"),
            std::string::npos);
}

// End to end: the slices of a Slurm array (variables as Slurm sets them) and of --shard, merged,
// answer exactly what one process answers.
TEST(EvalShard, MergedShardsEqualOneProcess) {
  test::TempDir d;
  const std::string model = ByteTokenizerModel(d);
  const std::string args =
      "eval passkey -m " + model +
      " --lengths 300,400 --depths 3 --samples 1 --attention dense,sparse --block-size 4"
      " --init-tokens 4 --local-window 8 --topk 2 --dense-layers 0 --ctx-size 1024 -t 1 -o ";
  Result one = RunNeedle(args + d.File("one"));
  ASSERT_EQ(one.status, 0) << one.output;
  Result s0 = RunNeedle(args + d.File("s0"), true,
                        "SLURM_ARRAY_TASK_ID=7 SLURM_ARRAY_TASK_MIN=7 SLURM_ARRAY_TASK_MAX=9");
  ASSERT_EQ(s0.status, 0) << s0.output;
  EXPECT_NE(s0.output.find("shard 0/3 (SLURM_ARRAY_TASK_ID): 2 of 6 samples"), std::string::npos)
      << s0.output;
  for (const char* k : {"1", "2"}) {
    Result r = RunNeedle(args + d.File(std::string("s") + k) + " --shard " + k + "/3");
    ASSERT_EQ(r.status, 0) << r.output;
  }
  Result m = RunNeedle("eval merge " + d.File("s2") + " " + d.File("s0") + " " + d.File("s1") +
                       " -o " + d.File("merged"));
  ASSERT_EQ(m.status, 0) << m.output;
  EXPECT_EQ(Answers(d.File("merged")), Answers(d.File("one")));
  EXPECT_EQ(Answers(d.File("merged")).size(), 12u);  // 2 configurations x 6 samples
  for (const char* f : {"summary.md", "summary.json", "heatmap_dense.svg", "heatmap_sparse.svg"})
    EXPECT_TRUE(std::filesystem::exists(d.File("merged") + "/" + f)) << f;
  // A missing shard is named.
  Result part =
      RunNeedle("eval merge " + d.File("s0") + " " + d.File("s1") + " -o " + d.File("merged2"));
  EXPECT_EQ(part.status, 1);
  EXPECT_NE(part.output.find("missing"), std::string::npos) << part.output;
  EXPECT_NE(RunNeedle("eval merge -o x").status, 0);
}

// needle eval --batch: samples decoded together (dense, and sparse on the CPU) give the answers
// they give one at a time; --batch below 1 is refused.
TEST(EvalBatch, BatchedSamplesAnswerAsOneAtATime) {
  test::TempDir d;
  const std::string model = ByteTokenizerModel(d);
  const std::string args = "eval passkey -m " + model +
                           " --lengths 300,400,500 --depths 3 --samples 1 --ctx-size 1024 -t 1 ";
  Result one = RunNeedle(args + "-o " + d.File("one"));
  ASSERT_EQ(one.status, 0) << one.output;
  Result b = RunNeedle(args + "--batch 4 -o " + d.File("b4"));
  ASSERT_EQ(b.status, 0) << b.output;
  EXPECT_NE(b.output.find("up to 4 samples at once"), std::string::npos) << b.output;
  // Samples of one length share their prompts' beginning (the filler before the key): later ones
  // take the running ones' blocks of it (dense attention) and prefill the rest.
  EXPECT_NE(b.output.find("prefix reuse: "), std::string::npos) << b.output;
  EXPECT_EQ(b.output.find("prefix reuse: 0 of"), std::string::npos) << b.output;
  EXPECT_EQ(Answers(d.File("b4")), Answers(d.File("one")));
  EXPECT_EQ(Answers(d.File("b4")).size(), 9u);
  // A pool that holds one sample at a time (--kv-memory) gives the same answers too.
  Result tight = RunNeedle(args + "--batch 4 --kv-memory 1M -o " + d.File("tight"));
  ASSERT_EQ(tight.status, 0) << tight.output;
  EXPECT_EQ(Answers(d.File("tight")), Answers(d.File("one")));
  // Sparse attention on the CPU, each sample with a planner of its own, beside dense: both
  // batched, the same answers as one at a time.
  const std::string sparse =
      "--attention dense,sparse --block-size 4 --init-tokens 4 --local-window 8 --topk 2 "
      "--dense-layers 0 --attn-recall --device cpu ";
  Result both1 = RunNeedle(args + sparse + "-o " + d.File("both1"));
  ASSERT_EQ(both1.status, 0) << both1.output;
  Result both = RunNeedle(args + sparse + "--batch 3 -o " + d.File("both"));
  ASSERT_EQ(both.status, 0) << both.output;
  EXPECT_NE(both.output.find("[sparse]: up to 3 samples at once"), std::string::npos)
      << both.output;
  EXPECT_EQ(Answers(d.File("both")), Answers(d.File("both1")));
  EXPECT_EQ(Answers(d.File("both")).size(), 18u);
  EXPECT_EQ(RunNeedle(args + "--batch 0 -o " + d.File("y")).status, 1);
}

// Sparse attention on a GPU (the hybrid engine), --batch 3: the samples run in the Engine's
// slots and decode together, with the answers they give one at a time. (On the GPU machine,
// NEEDLE_TEST_BINARY names the carried binary.)
TEST(EvalBatch, GpuHybridSamplesAnswerAsOneAtATime) {
#ifdef NEEDLE_HAVE_CUDA
  std::string why;
  if (!CudaAvailable(&why)) GTEST_SKIP() << "no GPU: " << why;
  test::TempDir d;
  const std::string model = ByteTokenizerModel(d);
  const std::string args = "eval passkey -m " + model +
                           " --lengths 300,400,500 --depths 3 --samples 1 --ctx-size 1024 -t 1 "
                           "--device cuda --attention sparse --block-size 4 --init-tokens 4 "
                           "--local-window 8 --topk 2 --dense-layers 0 ";
  Result one = RunNeedle(args + "-o " + d.File("one"));
  ASSERT_EQ(one.status, 0) << one.output;
  Result b = RunNeedle(args + "--batch 3 -o " + d.File("b3"));
  ASSERT_EQ(b.status, 0) << b.output;
  EXPECT_NE(b.output.find("up to 3 samples at once, each in caches of its own"), std::string::npos)
      << b.output;
  EXPECT_EQ(Answers(d.File("b3")), Answers(d.File("one")));
  EXPECT_EQ(Answers(d.File("b3")).size(), 9u);
#else
  GTEST_SKIP() << "no GPU: this build has no CUDA (nvcc was not found at configure time)";
#endif
}

}  // namespace
}  // namespace needle
