#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "engine/backend/backend.h"
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

namespace needle {
namespace {

// Top-k sampling from the backend's candidates (what Generate does when only k logits come back
// from the GPU) draws exactly the tokens of sampling from the full logits, for the same seed;
// ties included (logits quantised so that many are equal).
TEST(Sampling, CandidatesFromTheBackendGiveTheSameTokens) {
  ThreadingContext tc(1);
  auto cpu = MakeCpuBackend(tc, false);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t V = 1000 + 37 * trial;
    std::vector<float> base = test::RandomVector(static_cast<size_t>(V), 500 + trial, 8.0f);
    if (trial % 2 == 0)
      for (auto& x : base) x = std::round(x * 4) / 4;  // many ties
    SamplingParams p;
    p.temperature = 0.3f + 0.1f * (trial % 7);
    p.top_k = 1 + trial * 3;
    p.top_p = trial % 3 == 0 ? 0.9f : 1.0f;
    p.min_p = trial % 4 == 0 ? 0.05f : 0.0f;
    p.seed = 77 + trial;
    Sampler full(p), cand(p);
    std::vector<float> vals(static_cast<size_t>(p.top_k));
    std::vector<int32_t> ids(vals.size());
    cpu->TopK(base.data(), V, p.top_k, vals.data(), ids.data());
    for (int draw = 0; draw < 50; ++draw) {
      std::vector<float> logits = base;
      EXPECT_EQ(full.Sample(logits, {}), cand.SampleSorted(vals.data(), ids.data(), p.top_k))
          << "trial " << trial << " draw " << draw;
    }
  }
}

}  // namespace
}  // namespace needle
