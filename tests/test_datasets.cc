// InfiniteBench generators: formats to the character, depth sweep, lengths, determinism.
#include <gtest/gtest.h>

#include <zlib.h>

#include <random>
#include <regex>
#include <vector>

#include "datasets/fit_search.h"
#include "datasets/infinitebench.h"
#include "datasets/niah.h"
#include "tests/test_util.h"

namespace needle::datasets {
namespace {

const std::string kNoise =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n";
const auto kBytes = [](const std::string& s) {
  return static_cast<int64_t>(s.size());
};  // 1 token per byte

// The haystack-size search: the largest n whose count fits, against counting every n, for
// counts that grow linearly (with a prompt's fixed part), in steps, with flat stretches, and
// from a small lo; and how many counts it takes for a 1M-token linear prompt.
TEST(FitSearch, LargestFittingEqualsExhaustiveSearch) {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 300; ++trial) {
    const int kind = trial % 3;
    const int64_t fixed = static_cast<int64_t>(rng() % 200), n_max = 3000;
    std::vector<int64_t> counts(n_max + 1);
    int64_t c = fixed;
    for (int64_t n = 0; n <= n_max; ++n) {
      counts[n] = c;
      if (kind == 0) c += 7;                                                   // linear
      if (kind == 1) c += static_cast<int64_t>(rng() % 12);                    // uneven, flat runs
      if (kind == 2) c += n % 50 < 40 ? 0 : static_cast<int64_t>(rng() % 90);  // long flats
    }
    const int64_t lo = static_cast<int64_t>(rng() % 3);
    const int64_t budget =
        counts[lo] + static_cast<int64_t>(rng() % (counts[n_max - 1] - counts[lo]));
    int64_t want = lo;
    while (want + 1 <= n_max && counts[want + 1] <= budget) ++want;
    int evals = 0;
    const int64_t got = datasets::LargestFitting(lo, budget, [&](int64_t n) {
      ++evals;
      return n <= n_max ? counts[n] : counts[n_max] + (n - n_max) * 100;
    });
    ASSERT_EQ(got, want) << "trial " << trial << " kind " << kind << " budget " << budget;
    EXPECT_LE(evals, 48) << "trial " << trial;  // (at most about twice log2 of the range)
  }
  // A 1M-token prompt: 50 tokens of template, 13 tokens per 10 words (rounded down).
  int evals = 0;
  const int64_t n = datasets::LargestFitting(1, 1048576, [&](int64_t w) {
    ++evals;
    return 50 + w * 13 / 10;
  });
  EXPECT_LE(50 + n * 13 / 10, 1048576);
  EXPECT_GT(50 + (n + 1) * 13 / 10, 1048576);
  EXPECT_LE(evals, 12);
}

TEST(InfiniteBench, PasskeyFormatDepthAndLength) {
  const auto samples = GenerateInfiniteBench("passkey", 3000, 3, 2, 7, kBytes);
  ASSERT_EQ(samples.size(), 6u);
  const std::regex needle("The pass key is ([0-9]{5})\\. Remember it\\. \\1 is the pass key\\.\n");
  for (size_t i = 0; i < samples.size(); ++i) {
    const Sample& s = samples[i];
    EXPECT_EQ(s.input, "What is the pass key?");
    ASSERT_EQ(s.answer.size(), 1u);
    std::smatch m;
    ASSERT_TRUE(std::regex_search(s.context, m, needle)) << s.context.substr(0, 200);
    EXPECT_EQ(m[1].str(), s.answer[0]);
    // Everything else is whole noise lines, the needle a whole line at the swept depth.
    const std::string rest = m.prefix().str() + m.suffix().str();
    EXPECT_EQ(rest.size() % kNoise.size(), 0u);
    EXPECT_EQ(m.prefix().str().size() % kNoise.size(), 0u);
    EXPECT_NEAR(s.depth, (i / 2) * 0.5, 0.01);
    const std::string prompt = InfiniteBenchPrompt("passkey", s.context, s.input);
    EXPECT_LE(kBytes(prompt), 3000);
    EXPECT_GT(kBytes(prompt), 3000 - static_cast<int64_t>(kNoise.size()));  // within one noise line
    const std::string tail = "\n\nWhat is the pass key?\n\nThe pass key is";
    EXPECT_EQ(prompt.substr(prompt.size() - tail.size()), tail);
  }
  EXPECT_EQ(samples[0].context.rfind("The pass key is", 0), 0u);  // depth 0: first line
  const std::string& last = samples[5].context;  // depth 1: the needle is the last line
  EXPECT_EQ(last.substr(last.size() - 18), " is the pass key.\n");
}

TEST(InfiniteBench, DeterministicForASeed) {
  const auto a = GenerateInfiniteBench("number_string", 2000, 2, 3, 11, kBytes);
  const auto b = GenerateInfiniteBench("number_string", 2000, 2, 3, 11, kBytes);
  const auto c = GenerateInfiniteBench("number_string", 2000, 2, 3, 12, kBytes);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].context, b[i].context);
    EXPECT_EQ(a[i].answer, b[i].answer);
  }
  EXPECT_NE(a[0].answer, c[0].answer);
}

TEST(InfiniteBench, NumberStringKeys) {
  std::mt19937_64 rng(3);
  for (int i = 0; i < 200; ++i) {
    const std::string k = NumberStringKey(rng);
    ASSERT_EQ(k.size(), 10u);
    bool adjacent = false;
    for (size_t j = 1; j < k.size(); ++j) adjacent |= k[j] == k[j - 1];
    EXPECT_TRUE(adjacent) << k;  // each insertion duplicates a digit next to itself
  }
  const auto s = GenerateInfiniteBench("number_string", 2000, 1, 1, 1, kBytes)[0];
  EXPECT_NE(s.context.find("The sequence of digits is " + s.answer[0] + ". Remember it. " +
                           s.answer[0] + " is the sequence of digits.\n"),
            std::string::npos);
  EXPECT_EQ(s.input, "What is the sequence of digits?");
}

TEST(InfiniteBench, KvRetrievalLayout) {
  const std::regex uuid("^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$");
  std::mt19937_64 rng(5);
  for (int i = 0; i < 100; ++i) EXPECT_TRUE(std::regex_match(RandomUuid4(rng), uuid));
  const auto samples = GenerateInfiniteBench("kv_retrieval", 6000, 3, 1, 9, kBytes);
  for (size_t i = 0; i < samples.size(); ++i) {
    const Sample& s = samples[i];
    EXPECT_EQ(s.context.rfind("JSON data:\n{\"", 0), 0u);
    EXPECT_EQ(s.context.back(), '}');
    const std::string key = s.input.substr(7, 36);
    EXPECT_EQ(s.input, "\nKey: \"" + key + "\"\nThe value associated with the specified key is: ");
    const std::string pair = "\"" + key + "\": \"" + s.answer[0] + "\"";
    EXPECT_NE(s.context.find(pair), std::string::npos);
    EXPECT_EQ(s.context.find(key), s.context.rfind(key));  // the key occurs once
    EXPECT_NEAR(s.depth, 0.5 * static_cast<double>(i), 0.01);
    EXPECT_LE(kBytes(InfiniteBenchPrompt("kv_retrieval", s.context, s.input)), 6000);
  }
  test::ExpectErrorContaining([] { GenerateInfiniteBench("kv_retrieval", 50, 1, 1, 1, kBytes); },
                              {"cannot fit"});
  test::ExpectErrorContaining([] { GenerateInfiniteBench("longbook", 500, 1, 1, 1, kBytes); },
                              {"longbook"});
}

}  // namespace
}  // namespace needle::datasets

namespace needle::datasets {
namespace {

TEST(Niah, DepthGrids) {
  EXPECT_EQ(LinearDepths(5), (std::vector<double>{0, 25, 50, 75, 100}));
  const auto s = SigmoidDepths(35);
  ASSERT_EQ(s.size(), 35u);
  EXPECT_EQ(s[0], 0.0);
  EXPECT_DOUBLE_EQ(s[1], 99.104);
  EXPECT_DOUBLE_EQ(s[2], 98.801);
  EXPECT_DOUBLE_EQ(s[17], 50.0);
  EXPECT_DOUBLE_EQ(s[33], 0.896);
  EXPECT_EQ(s[34], 100.0);
}

TEST(Niah, NeedleAtSentenceBoundaryWithinBudget) {
  auto tok = Tokenizer::Load(std::string(NEEDLE_FIXTURES_DIR) +
                             "/../tokenizer/bytes_tokenizer.json");  // 1 token per byte
  std::string hay;
  for (int i = 0; i < 40; ++i)
    hay += "Sentence number " + std::to_string(i) + " talks about nothing at all. ";
  NiahOptions o;
  const int64_t overhead = static_cast<int64_t>(NiahPrompt("", o.question).size());
  const auto samples = GenerateNiah(*tok, hay, {1200, 2500}, LinearDepths(5), overhead, o);
  ASSERT_EQ(samples.size(), 10u);
  for (const auto& s : samples) {
    const size_t at = s.context.find(o.needle);
    ASSERT_NE(at, std::string::npos);
    if (at > 0 && s.depth < 1.0) {
      EXPECT_EQ(s.context[at - 1], '.') << "needle not after a sentence end at depth " << s.depth;
    }
    if (s.depth == 1.0) {
      EXPECT_EQ(at + o.needle.size(), s.context.size());
    }
    EXPECT_EQ(static_cast<int64_t>(NiahPrompt(s.context, s.input).size()),
              s.target_tokens - o.buffer);
    EXPECT_EQ(s.answer, o.keywords);
  }
  EXPECT_EQ(samples[0].context.find(o.needle), 0u);  // depth 0
}

TEST(Niah, HaystackFilesFoldersAndGzip) {
  test::TempDir d;
  test::WriteFile(d.File("b.txt"), "second file.\n┌──┐ table line\n");
  test::WriteFile(d.File("a.txt"), "first file.\n");
  gzFile g = gzopen(d.File("c.txt.gz").c_str(), "wb");
  gzputs(g, "third, compressed.\n");
  gzclose(g);
  EXPECT_EQ(LoadHaystack({d.path()}), "first file.\nsecond file.\nthird, compressed.\n");
  test::ExpectErrorContaining([] { LoadHaystack({"/no/such/haystack.txt"}); },
                              {"/no/such/haystack.txt", "not found"});
  test::TempDir empty;
  test::ExpectErrorContaining([&] { LoadHaystack({empty.path()}); }, {"no .txt"});
}

}  // namespace
}  // namespace needle::datasets
