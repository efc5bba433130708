// Generation: prefill the prompt, then decode one token at a time until an EOS id, the token
// limit, or the caller's callback says stop (stop strings are checked by the caller on text).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "engine/model/model.h"
#include "engine/model/sampling.h"

namespace needle {

struct GenerateStats {
  int64_t prompt_tokens = 0;
  int64_t new_tokens = 0;
  double prefill_seconds = 0;
  double decode_seconds =
      0;  // for new_tokens - 1 decode steps (the first token comes from prefill)
  bool stopped_at_eos = false;
};

// Index of the largest logit; the first one on ties, like torch.argmax.
int32_t Argmax(const float* logits, int64_t n);

// on_token returns false to stop after that token.
std::vector<int32_t> Generate(Model& model, KVCache& cache, const std::vector<int32_t>& prompt,
                              int64_t max_new_tokens, const SamplingParams& sampling,
                              const std::function<bool(int32_t)>& on_token, GenerateStats* stats);

std::vector<int32_t> GenerateGreedy(Model& model, KVCache& cache,
                                    const std::vector<int32_t>& prompt, int64_t max_new_tokens,
                                    const std::function<void(int32_t)>& on_token,
                                    GenerateStats* stats);

}  // namespace needle
