// Several tasks in one `needle eval` (eval/task_list.h): each task's directory answers as a
// one-task run, a rerun resumes, sharded runs merge, and what is not one evaluation is refused.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "tests/cli_test_util.h"
#include "tests/eval_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

std::string Read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The fixture model, short prompts, dense and sparse side by side.
std::string Args(const std::string& model) {
  return " -m " + model +
         " --lengths 700 --depths 2 --samples 2 --attention dense,sparse --block-size 4"
         " --init-tokens 4 --local-window 8 --topk 2 --dense-layers 0 --ctx-size 1024 -t 1 -o ";
}

TEST(EvalTasks, SeveralTasksAnswerAsOneTaskRuns) {
  test::TempDir d;
  const std::string model = ByteTokenizerModel(d);
  const std::string a = Args(model);
  Result both = RunNeedle("eval passkey,niah_single_1" + a + d.File("both"));
  ASSERT_EQ(both.status, 0) << both.output;
  for (const char* t : {"passkey", "niah_single_1"}) {
    Result one = RunNeedle(std::string("eval ") + t + a + d.File(t));
    ASSERT_EQ(one.status, 0) << one.output;
    EXPECT_EQ(Answers(d.File("both") + "/" + t), Answers(d.File(t))) << t;
    // 2 configurations x 2 samples (passkey: x 2 depths)
    EXPECT_EQ(Answers(d.File(t)).size(), std::string(t) == "passkey" ? 8u : 4u) << t;
    EXPECT_TRUE(std::filesystem::exists(d.File("both") + "/" + t + "/summary.md")) << t;
  }
  // The top summary has every task's rows, and stdout prints it.
  const std::string md = Read(d.File("both") + "/summary.md");
  for (const char* row : {"| passkey | 700 | dense |", "| passkey | 700 | sparse |",
                          "| niah_single_1 | 700 | dense |", "| niah_single_1 | 700 | sparse |"}) {
    EXPECT_NE(md.find(row), std::string::npos) << row << "\n" << md;
    EXPECT_NE(both.output.find(row), std::string::npos) << row;
  }
  EXPECT_NE(Read(d.File("both") + "/tasks.json").find("niah_single_1"), std::string::npos);
  // A rerun resumes: nothing is answered twice (a second answer would be a second line).
  Result again = RunNeedle("eval passkey,niah_single_1" + a + d.File("both"));
  ASSERT_EQ(again.status, 0) << again.output;
  EXPECT_EQ(Answers(d.File("both") + "/passkey"), Answers(d.File("passkey")));
}

TEST(EvalTasks, RefusesWhatIsNotOneEvaluation) {
  test::TempDir d;
  const std::string model = ByteTokenizerModel(d);
  const std::string a = Args(model);
  ASSERT_EQ(RunNeedle("eval passkey,niah_single_1" + a + d.File("both")).status, 0);
  struct Case {
    std::string args, error;
  } cases[] = {
      {"eval passkey,kv_retrieval" + a + d.File("both"),
       "holds an evaluation of passkey,niah_single_1; this run is of passkey,kv_retrieval"},
      {"eval passkey" + a + d.File("both"), "holds an evaluation of passkey,niah_single_1"},
      {"eval passkey,passkey" + a + d.File("x"), "task 'passkey' is listed twice"},
      {"eval passkey,nope" + a + d.File("x"), "task 'nope' has no runner"},
      {"eval passkey,,niah_single_1" + a + d.File("x"), "empty task name"},
      {"eval passkey,niah_single_1 --data " + d.File("none.jsonl") + a + d.File("x"),
       "--data: a data file holds the samples of one task"},
  };
  for (const auto& c : cases) {
    Result r = RunNeedle(c.args);
    EXPECT_EQ(r.status, 1) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.error), std::string::npos) << c.args << "\n" << r.output;
  }
  // A malformed tasks.json is named.
  for (const auto& [body, error] : std::vector<std::pair<std::string, std::string>>{
           {"{oops", "tasks.json: not valid JSON"},
           {"{\"tasks\": [1]}", "tasks.json: field 'tasks' holds a non-string (1)"},
           {"{\"tasks\": []}", "tasks.json: field 'tasks' is missing"},
           {"{\"tasks\": [\"../x\"]}",
            "tasks.json: field 'tasks' holds '../x', which is not a task"},
           {"{\"tasks\": [\"a\", \"a\"]}", "tasks.json: field 'tasks' lists 'a' twice"}}) {
    std::filesystem::create_directories(d.File("bad"));
    test::WriteFile(d.File("bad") + "/tasks.json", body);
    Result r = RunNeedle("eval passkey,niah_single_1" + a + d.File("bad"));
    EXPECT_EQ(r.status, 1) << body;
    EXPECT_NE(r.output.find(error), std::string::npos) << body << "\n" << r.output;
  }
  // A one-task run directory takes no several-task run.
  ASSERT_EQ(RunNeedle("eval passkey" + a + d.File("one")).status, 0);
  Result r = RunNeedle("eval passkey,niah_single_1" + a + d.File("one"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("holds a one-task evaluation"), std::string::npos) << r.output;
}

TEST(EvalTasks, ShardsOfSeveralTasksMergeAsOneProcess) {
  test::TempDir d;
  const std::string model = ByteTokenizerModel(d);
  const std::string a = Args(model);
  const std::string tasks = "eval passkey,niah_single_1";
  ASSERT_EQ(RunNeedle(tasks + a + d.File("one")).status, 0);
  for (const char* k : {"0", "1", "2"}) {
    Result r = RunNeedle(tasks + a + d.File(std::string("s") + k) + " --shard " + k + "/3");
    ASSERT_EQ(r.status, 0) << r.output;
  }
  Result m = RunNeedle("eval merge " + d.File("s1") + " " + d.File("s0") + " " + d.File("s2") +
                       " -o " + d.File("merged"));
  ASSERT_EQ(m.status, 0) << m.output;
  for (const char* t : {"passkey", "niah_single_1"}) {
    EXPECT_EQ(Answers(d.File("merged") + "/" + t), Answers(d.File("one") + "/" + t)) << t;
    EXPECT_EQ(Answers(d.File("merged") + "/" + t).size(), std::string(t) == "passkey" ? 8u : 4u)
        << t;
  }
  // (The summaries' tok/s differ between runs; their rows are there.)
  EXPECT_NE(Read(d.File("merged") + "/summary.md").find("| niah_single_1 | 700 | sparse |"),
            std::string::npos);
  EXPECT_EQ(Read(d.File("merged") + "/tasks.json"), Read(d.File("one") + "/tasks.json"));
  // A missing shard of one task is named by the per-task merge; a mix of several-task and
  // one-task directories is refused.
  Result part =
      RunNeedle("eval merge " + d.File("s0") + " " + d.File("s1") + " -o " + d.File("m2"));
  EXPECT_EQ(part.status, 1);
  EXPECT_NE(part.output.find("missing"), std::string::npos) << part.output;
  ASSERT_EQ(RunNeedle("eval passkey" + a + d.File("p") + " --shard 0/3").status, 0);
  Result mix = RunNeedle("eval merge " + d.File("s0") + " " + d.File("p") + " -o " + d.File("m3"));
  EXPECT_EQ(mix.status, 1);
  EXPECT_NE(mix.output.find("holds several tasks (tasks.json)"), std::string::npos) << mix.output;
}

}  // namespace
}  // namespace needle
