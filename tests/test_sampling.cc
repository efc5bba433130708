#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "engine/model/generate.h"
#include "engine/model/sampling.h"
#include "tests/test_util.h"

namespace needle {
namespace {

TEST(Sampling, GreedyAndDegenerateSettingsPickTheArgmax) {
  const std::vector<float> base = {0.1f, 2.0f, -1.0f, 1.9f, 0.0f};
  for (SamplingParams p :
       {SamplingParams{}, SamplingParams{1.0f, 1}, SamplingParams{0.7f, 0, 1e-6f}}) {
    Sampler s(p);
    for (int i = 0; i < 20; ++i) {
      auto l = base;
      EXPECT_EQ(s.Sample(l, {}), 1);
    }
  }
}

TEST(Sampling, SeededAndFollowsTheSoftmax) {
  const std::vector<float> base = {0.0f, std::log(2.0f), std::log(3.0f),
                                   -30.0f};  // p = 1/6, 2/6, 3/6, ~0
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 42;
  Sampler a(p), b(p);
  std::map<int, int> count;
  const int n = 60000;
  for (int i = 0; i < n; ++i) {
    auto la = base, lb = base;
    const int x = a.Sample(la, {});
    EXPECT_EQ(x, b.Sample(lb, {}));  // same seed, same stream
    ++count[x];
  }
  EXPECT_NEAR(count[0] / double(n), 1.0 / 6, 0.01);
  EXPECT_NEAR(count[1] / double(n), 2.0 / 6, 0.01);
  EXPECT_NEAR(count[2] / double(n), 3.0 / 6, 0.01);
  EXPECT_EQ(count[3], 0);
}

TEST(Sampling, TopKTopPMinPRestrictTheCandidates) {
  const std::vector<float> base = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                   std::log(0.05f)};
  auto support = [&](SamplingParams p) {
    Sampler s(p);
    std::map<int, int> seen;
    for (int i = 0; i < 3000; ++i) {
      auto l = base;
      ++seen[s.Sample(l, {})];
    }
    return seen.size();
  };
  EXPECT_EQ(support(SamplingParams{1, 2}), 2u);               // top-k 2
  EXPECT_EQ(support(SamplingParams{1, 0, 0.75f}), 2u);        // 0.5 + 0.3 reaches 0.75
  EXPECT_EQ(support(SamplingParams{1, 0, 1.0f, 0.25f}), 3u);  // >= 0.25 * 0.5
  EXPECT_EQ(support(SamplingParams{1}), 4u);                  // plain sampling
  EXPECT_EQ(support(SamplingParams{}), 1u);                   // greedy
}

TEST(Sampling, RepetitionPenaltyAndValidation) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  Sampler s(p);
  std::vector<float> l = {1.0f, 1.5f, -1.0f};
  EXPECT_EQ(s.Sample(l, {1}), 0);  // 1.5 / 2 = 0.75 < 1.0
  EXPECT_FLOAT_EQ(l[1], 0.75f);
  test::ExpectErrorContaining(
      [] {
        SamplingParams q;
        q.top_p = 0;
        q.Validate();
      },
      {"--top-p"});
  test::ExpectErrorContaining(
      [] {
        SamplingParams q;
        q.temperature = -1;
        q.Validate();
      },
      {"--temperature"});
  test::ExpectErrorContaining(
      [] {
        SamplingParams q;
        q.min_p = 1;
        q.Validate();
      },
      {"--min-p"});
}

}  // namespace
}  // namespace needle
