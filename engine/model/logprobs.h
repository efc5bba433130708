// Log-probabilities of tokens under a row of logits: what OpenAI's `logprobs` report (and
// lm-evaluation-harness's log-likelihood tasks sum). They are of the model's own distribution,
// log_softmax of the raw logits, before any sampling setting (temperature, top-k, penalties)
// reshapes it, as vLLM's default reports them.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace needle {

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.f;
  // The k most likely tokens and their log-probabilities, descending (ties: lower id first).
  std::vector<std::pair<int32_t, float>> top;
};

// logits: [V] f32, one row. token: the token scored (0 <= token < V). k: how many of the most
// likely tokens to list (0: none). The normaliser log(sum exp) is summed in double.
TokenLogprob ScoreToken(const float* logits, int64_t V, int32_t token, int64_t k);

}  // namespace needle
