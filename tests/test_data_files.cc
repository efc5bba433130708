// The JSONL readers of needle eval (eval/data_files.h) on hostile files: every bad line is an
// error naming the file, the line and the field (issue 21's --data and prediction readers).
#include <gtest/gtest.h>

#include <string>

#include "eval/data_files.h"
#include "eval/runner.h"
#include "tests/test_util.h"

namespace needle {
namespace {

std::string Write(const test::TempDir& d, const std::string& name, const std::string& text) {
  const std::string p = d.path() + "/" + name;
  test::WriteFile(p, text);
  return p;
}

TEST(DataFiles, SamplesOfEveryFormat) {
  test::TempDir d;
  const std::string p = Write(
      d, "ok.jsonl",
      "{\"id\": 3, \"context\": \"c\", \"input\": \"i\", \"answer\": [\"a\"], \"depth\": 0.5, "
      "\"length\": 4096}\n\n"
      "{\"index\": 7, \"input\": \"x\", \"answer_prefix\": \" A:\", \"outputs\": [\"o\"]}\r\n"
      "{\"context\": \"c\", \"input\": \"i\", \"answer\": 42}");
  const auto s = eval::ReadSamples(p);
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[0].id, 3);
  EXPECT_EQ(s[0].depth, 0.5);
  EXPECT_EQ(s[0].target_tokens, 4096);
  EXPECT_EQ(s[1].id, 7);
  EXPECT_EQ(s[1].prompt, "x A:");
  EXPECT_EQ(s[2].answer, std::vector<std::string>{"42"});
  EXPECT_EQ(s[2].depth, -1.0);
}

TEST(DataFiles, HostileSamplesAreNamedErrors) {
  test::TempDir d;
  const std::string good = "\"context\": \"c\", \"input\": \"i\", \"answer\": \"a\"";
  struct Case {
    std::string line;
    std::vector<std::string> parts;
  } cases[] = {
      {"{" + good + ", \"length\": 1e30}", {":1:", "field 'length' must be an integer"}},
      {"{" + good + ", \"length\": -5}", {"field 'length' = -5 is outside"}},
      {"{" + good + ", \"length\": 18446744073709551615}", {"field 'length'", "is outside"}},
      {"{" + good + ", \"depth\": \"deep\"}", {"field 'depth' must be a number in [0, 1]"}},
      {"{" + good + ", \"depth\": 7}", {"field 'depth' must be a number in [0, 1]"}},
      {"{" + good + ", \"id\": \"x\"}", {"field 'id' must be an integer"}},
      {"{\"index\": [1], \"input\": \"x\", \"answer_prefix\": \"p\", \"outputs\": [\"o\"]}",
       {"field 'index' must be an integer"}},
      {"{\"context\": 5, \"input\": \"i\", \"answer\": \"a\"}", {"field 'context' is missing"}},
      {"{\"context\": \"c\", \"input\": \"i\", \"answer\": {\"x\": 1}}",
       {"field 'answer' must be a string or a list"}},
      {"{\"context\": \"c\", \"input\": \"i\"}", {"no reference field"}},
      {"[1, 2]", {":1:", "not a JSON object"}},
      {"{\"context\": \"c\", \"input\": \"i\", \"answer\": \"a\", \"x\": 1e999}",
       {"malformed JSON"}},
      {std::string(200, '[') + std::string(200, ']'), {"nested deeper than 64 levels"}},
  };
  int i = 0;
  for (const Case& c : cases) {
    const std::string p = Write(d, "bad" + std::to_string(i++) + ".jsonl", c.line + "\n");
    std::vector<std::string> parts = c.parts;
    parts.push_back(p);
    test::ExpectErrorContaining([&] { eval::ReadSamples(p); }, parts);
  }
}

TEST(DataFiles, LongLinesAreRefusedBeforeTheyAreRead) {
  test::TempDir d;
  const std::string p =
      Write(d, "long.jsonl", "{\"a\": 1}\n{\"s\": \"" + std::string(300000, 'x') + "\"}\n");
  int n = 0;
  test::ExpectErrorContaining(
      [&] {
        eval::ForEachJsonLine(
            p, [&](const nlohmann::json&, const std::string&) { ++n; }, 100000);
      },
      {p + ":2", "line longer than 100000 bytes"});
  EXPECT_EQ(n, 1);
  // Within the limit, a line longer than the reader's buffer is read whole.
  int m = 0;
  eval::ForEachJsonLine(
      p, [&](const nlohmann::json&, const std::string&) { ++m; }, 400000);
  EXPECT_EQ(m, 2);
}

TEST(DataFiles, Predictions) {
  test::TempDir d;
  const std::string p = Write(d, "p.jsonl",
                              "{\"prediction\": \"x\", \"answer\": [\"x\"]}\n"
                              "{\"pred\": \"y\", \"label\": \"z\"}\n");
  const auto r = eval::ReadPredictions(p);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[1].prediction, "y");
  const std::string bad = Write(d, "bad.jsonl", "{\"prediction\": 5, \"answer\": \"a\"}\n");
  test::ExpectErrorContaining([&] { eval::ReadPredictions(bad); },
                              {bad + ":1", "no string field 'prediction'"});
}

// The resume reader: values of the wrong type (a float where the runner writes an integer, one
// out of range) are the error that names the line, not undefined behaviour.
TEST(DataFiles, ResultsWithWrongTypesAreNamedErrors) {
  test::TempDir d;
  const std::string ok =
      "{\"config\":\"dense\",\"task\":\"passkey\",\"id\":1,\"length\":100,\"depth\":0.5,"
      "\"prompt_tokens\":90,\"prediction\":\"x\",\"answer\":[\"x\"],\"score\":1}";
  const std::string p = Write(d, "r.jsonl", ok + "\n");
  EXPECT_EQ(eval::ReadResults(p).size(), 1u);
  for (const std::string& bad :
       {std::string("\"id\":1e30"), std::string("\"id\":18446744073709551615"),
        std::string("\"length\":\"x\""), std::string("\"score\":null")}) {
    std::string line = ok;
    const std::string key = bad.substr(0, bad.find(':'));
    const size_t at = line.find(key);
    line.replace(at, line.find(',', at) - at, bad);
    const std::string q = Write(d, "bad.jsonl", ok + "\n" + line + "\n");
    test::ExpectErrorContaining([&] { eval::ReadResults(q); }, {q + ":2", "malformed result line"});
  }
}

}  // namespace
}  // namespace needle
