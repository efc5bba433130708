// The benchmarks' scoring rules on hand-made edge cases (eval/scoring.h cites the originals).
#include <gtest/gtest.h>

#include "eval/scoring.h"
#include "tests/test_util.h"

namespace needle::eval {
namespace {

TEST(Scoring, PasskeyFirstRunOfDigits) {
  EXPECT_TRUE(ScorePasskey("The pass key is 71432.", "71432"));
  EXPECT_TRUE(ScorePasskey("71432 71433", "71432"));
  EXPECT_FALSE(ScorePasskey("It is 7 1432", "71432"));  // first run is "7"
  EXPECT_FALSE(ScorePasskey("00123", "123"));           // leading zeros matter
  EXPECT_TRUE(ScorePasskey("00123", "00123"));
  EXPECT_FALSE(ScorePasskey("98,619", "98619"));  // the comma ends the run
  EXPECT_EQ(FirstIntMatch("98,619"), "98");
  EXPECT_FALSE(ScorePasskey("no digits", "1"));
  EXPECT_EQ(FirstIntMatch("no digits"), "");
}

TEST(Scoring, KvRetrievalWholeTokenAfterPunctuation) {
  const std::string uuid = "3f2b8c1e-9d4a-4b6f-a1c2-7e8d9f0a1b2c";
  EXPECT_TRUE(ScoreKvRetrieval("The value is " + uuid + ".", uuid));
  EXPECT_TRUE(ScoreKvRetrieval("{\"key\": \"" + uuid + "\"}", uuid));
  EXPECT_TRUE(ScoreKvRetrieval("value:" + uuid + "!", uuid));
  EXPECT_FALSE(ScoreKvRetrieval("`" + uuid + "`", uuid));           // backticks are not stripped
  EXPECT_FALSE(ScoreKvRetrieval("(" + uuid + ")", uuid));           // nor parentheses
  EXPECT_FALSE(ScoreKvRetrieval(uuid.substr(0, 30), uuid));         // truncated
  EXPECT_FALSE(ScoreKvRetrieval("x" + uuid, uuid));                 // not a whole token
  EXPECT_TRUE(ScoreKvRetrieval("\t" + uuid + "\xC2\xA0ok", uuid));  // Python splits on U+00A0 too
}

TEST(Scoring, RulerStringMatchAllPartialCredit) {
  EXPECT_DOUBLE_EQ(StringMatchAll("The numbers are 123 and 456.", {"123", "456", "789", "000"}),
                   0.5);
  EXPECT_DOUBLE_EQ(StringMatchAll("APPLE", {"apple"}), 1.0);  // case-insensitive
  EXPECT_DOUBLE_EQ(StringMatchAll("nothing", {"apple"}), 0.0);
  EXPECT_DOUBLE_EQ(StringMatchPart("apple pie", {"cherry", "apple"}), 1.0);
  EXPECT_EQ(RulerPostprocess("  \x01value\x02 \n"), "value");
  EXPECT_EQ(RulerPostprocess("a\x03"
                             "b"),
            "a\nb");
  EXPECT_DOUBLE_EQ(ScoreTask("niah_multivalue", " 12\x01 and 34 ", {"12", "34", "56", "78"}), 0.5);
  EXPECT_DOUBLE_EQ(ScoreTask("niah_single_1", "ÄBC", {"äbc"}), 1.0);  // Unicode lowercase
}

TEST(Scoring, NeedleKeywordsAndTaskErrors) {
  EXPECT_TRUE(ScoreNeedleKeywords("Eat a Sandwich in Dolores Park.", {"dolores", "sandwich"}));
  EXPECT_FALSE(ScoreNeedleKeywords("Eat a sandwich.", {"dolores", "sandwich"}));
  test::ExpectErrorContaining(
      [] {
        ScoreTask("passkey", "1", {"1", "2"});
      },
      {"passkey", "exactly one"});
  test::ExpectErrorContaining([] { ScoreTask("longbook_qa", "x", {"x"}); },
                              {"unknown task 'longbook_qa'"});
}

}  // namespace
}  // namespace needle::eval
