// The Python port of the task formats (models/train/templates.py, for needle-tiny's training data)
// must produce exactly the strings of the C++ generators the evaluation uses.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "datasets/infinitebench.h"
#include "datasets/niah.h"
#include "datasets/ruler.h"

namespace needle::datasets {
namespace {

TEST(Templates, PythonPortMatchesCpp) {
  const std::string script =
      std::string(NEEDLE_FIXTURES_DIR) + "/../../../models/train/templates.py";
  FILE* p = popen(("python3 " + script + " --golden 2>/dev/null").c_str(), "r");
  std::string out;
  if (p != nullptr) {
    std::array<char, 4096> buf;
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
    if (pclose(p) != 0) out.clear();
  }
  if (out.empty()) GTEST_SKIP() << "python3 could not run " << script;
  const auto g = nlohmann::json::parse(out);
  auto expect = [&](const std::string& key, const std::string& cpp) {
    ASSERT_TRUE(g.contains(key)) << key;
    EXPECT_EQ(g[key].get<std::string>(), cpp) << key;
  };
  expect("noise_line", kNoiseLine);
  expect("passkey_needle", InfiniteBenchNeedle("passkey", "04213"));
  expect("number_string_needle", InfiniteBenchNeedle("number_string", "3000077442"));
  expect("kv_context", KvContext({{"a-1", "b-2"}, {"c-3", "d-4"}}));
  expect("kv_input", KvInput("a-1"));
  expect("niah_prompt", NiahPrompt("CTX", NiahOptions().question));
  expect("niah_needle", NiahOptions().needle);
  expect("ruler_query_4", RulerQuery({"k1", "k2", "k3", "k4"}));
  for (const char* t : {"passkey", "number_string"})
    expect(std::string("ib_prompt_") + t, InfiniteBenchPrompt(t, "CTX", InfiniteBenchQuestion(t)));
  expect("ib_prompt_kv_retrieval", InfiniteBenchPrompt("kv_retrieval", "CTX", KvInput("a-1")));
  int ruler = 0;
  for (const char* t :
       {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery"}) {
    expect(std::string("ruler_prompt_") + t,
           RulerTaskPrompt(t, "CTX", "tart-eyebrow") + RulerAnswerPrefix(t, "tart-eyebrow"));
    expect(std::string("ruler_needle_") + t, RulerNeedle(t, "tart-eyebrow", "4916237"));
    ++ruler;
  }
  EXPECT_EQ(g.size(), 11u + 2u * ruler);  // every golden string was compared
}

}  // namespace
}  // namespace needle::datasets
