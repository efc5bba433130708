// RULER NIAH generators: templates to the character, needle formats, query joining, lengths.
#include <gtest/gtest.h>

#include <regex>

#include "datasets/ruler.h"
#include "tests/test_util.h"

namespace needle::datasets {
namespace {

const auto kBytes = [](const std::string& s) { return static_cast<int64_t>(s.size()); };

WordLists Words() { return WordLists{{"tart", "quiet", "brave"}, {"eyebrow", "river", "lamp"}}; }

std::string Essay() {
  std::string e;
  for (int i = 0; i < 80; ++i) e += "Essay sentence " + std::to_string(i) + " says little.\n ";
  return e;
}

TEST(Ruler, SingularAndPluralTemplates) {
  EXPECT_EQ(
      RulerTaskPrompt("niah_single_1", "CTX", "tart-eyebrow") +
          RulerAnswerPrefix("niah_single_1", "tart-eyebrow"),
      "A special magic number is hidden within the following text. Make sure to memorize it. I "
      "will quiz you "
      "about the number afterwards.\nCTX\nWhat is the special magic number for tart-eyebrow "
      "mentioned in the "
      "provided text? The special magic number for tart-eyebrow mentioned in the provided text is");
  EXPECT_EQ(
      RulerTaskPrompt("niah_multivalue", "CTX", "k") + RulerAnswerPrefix("niah_multivalue", "k"),
      "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
      "I will quiz "
      "you about the numbers afterwards.\nCTX\nWhat are all the special magic numbers for k "
      "mentioned in the "
      "provided text? The special magic numbers for k mentioned in the provided text are");
  EXPECT_NE(RulerTaskPrompt("niah_single_3", "", "k").find("special magic uuid "),
            std::string::npos);
}

TEST(Ruler, EveryTaskFormatsAndFits) {
  const std::regex number("^[1-9][0-9]{6}$");
  const std::regex uuid("^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$");
  const std::regex word("^[a-z]+-[a-z]+$");
  for (const char* name :
       {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery"}) {
    const RulerTask t = RulerTaskSpec(name);
    const auto samples = GenerateRuler(name, 3000, 2, 42, kBytes, Essay(), Words());
    ASSERT_EQ(samples.size(), 2u) << name;
    for (const auto& s : samples) {
      ASSERT_EQ(static_cast<int>(s.answer.size()), t.v * t.q) << name;
      for (const auto& a : s.answer) {
        EXPECT_TRUE(std::regex_match(a, t.value_type == "numbers" ? number : uuid))
            << name << " " << a;
        // Each answer sits in a needle of the plural form, under one of the queried keys.
        EXPECT_NE(s.context.find("One of the special magic " + t.value_type + " for "),
                  std::string::npos)
            << name;
        EXPECT_NE(s.context.find(" is: " + a + "."), std::string::npos) << name;
      }
      if (t.q == 4) {
        EXPECT_TRUE(
            std::regex_search(s.input, std::regex("^[a-z-]+, [a-z-]+, [a-z-]+, and [a-z-]+$")))
            << s.input;
      } else {
        EXPECT_TRUE(std::regex_match(s.input, t.key_type == "uuids" ? uuid : word))
            << name << " " << s.input;
      }
      const int64_t n =
          kBytes(RulerTaskPrompt(name, s.context, s.input) + RulerAnswerPrefix(name, s.input));
      EXPECT_LE(n + kRulerMaxNewTokens, 3000) << name;
      EXPECT_GT(n + kRulerMaxNewTokens, 3000 - 400)
          << name;  // within one haystack unit of the target
    }
    if (t.haystack == "noise") {
      EXPECT_NE(samples[0].context.find(
                    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                    "back again.\n"),
                std::string::npos);
    }
  }
  // Same seed, same bytes.
  EXPECT_EQ(GenerateRuler("niah_multikey_1", 2000, 1, 5, kBytes, Essay(), Words())[0].context,
            GenerateRuler("niah_multikey_1", 2000, 1, 5, kBytes, Essay(), Words())[0].context);
  test::ExpectErrorContaining([] { RulerTaskSpec("niah_single_9"); }, {"niah_single_9"});
}

}  // namespace
}  // namespace needle::datasets
