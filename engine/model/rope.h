// Rotary position embedding frequencies for every scaling type, computed the way transformers'
// modeling_rope_utils does (same formulas, fp32 results), so positions line up with the reference.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/model/config.h"

namespace needle {

struct RopeFreqs {
  std::vector<float> inv_freq;     // [head_dim / 2]
  float attention_scaling = 1.0f;  // multiplies cos and sin (yarn's mscale), else 1
};

// `seq_len` is the length of the sequence after the current forward step (last position + 1);
// only dynamic NTK scaling depends on it (transformers recomputes inv_freq from it each step).
RopeFreqs ComputeRopeFreqs(const ModelConfig& cfg, int64_t seq_len);

}  // namespace needle
