// Greedy generation: prefill the prompt, then decode one token at a time until EOS or a limit.
// (Sampling strategies arrive with the tokenizer issue; greedy is the reference behaviour.)
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "engine/model/model.h"

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

std::vector<int32_t> GenerateGreedy(Model& model, KVCache& cache,
                                    const std::vector<int32_t>& prompt, int64_t max_new_tokens,
                                    const std::function<void(int32_t)>& on_token,
                                    GenerateStats* stats);

}  // namespace needle
