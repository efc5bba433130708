// Token selection from logits: greedy, or sampling with repetition penalty, temperature, top-k,
// top-p and min-p (applied in that order, as transformers' generate does), from a seeded RNG.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace needle {

struct SamplingParams {
  float temperature = 0.0f;         // 0: greedy
  int64_t top_k = 0;                // 0: off
  float top_p = 1.0f;               // 1: off
  float min_p = 0.0f;               // 0: off
  float repetition_penalty = 1.0f;  // 1: off; >1 discourages tokens already in the context
  uint64_t seed = 0;

  void Validate() const;  // throws naming the setting
  bool greedy() const { return temperature <= 0.0f || top_k == 1; }
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) { p.Validate(); }
  // logits [vocab] (modified in place); context: the tokens so far (for the repetition penalty).
  int32_t Sample(std::vector<float>& logits, const std::vector<int32_t>& context);
  // The same draw from candidates already selected and sorted by descending raw logit (ties:
  // lower id first): the vocabulary's top_k when top_k > 0 (what Model::ForwardTopK returns),
  // without a repetition penalty. Sample() ends here too, so both give the same token.
  int32_t SampleSorted(const float* vals, const int32_t* ids, int64_t n);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
};

}  // namespace needle
