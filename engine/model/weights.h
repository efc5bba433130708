// The model's parameters as typed, shaped views. Loaded weights point into the memory-mapped
// safetensors files (nothing is copied); dummy weights live in one owned arena. A backend may
// re-home the views (the CUDA backend copies them to the GPU) through Backend::PrepareWeights.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/base/dtype.h"
#include "engine/model/config.h"
#include "engine/model/safetensors.h"

namespace needle {

// A row-major matrix [rows, cols] (HF nn.Linear layout: [out_features, in_features]) or, with
// rows == 1, a vector [cols]. data == nullptr means absent (an optional bias).
struct Weight {
  std::string name;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* data = nullptr;

  bool present() const { return data != nullptr; }
  size_t nbytes() const { return static_cast<size_t>(rows * cols) * DTypeSize(dtype); }
};

struct LayerWeights {
  Weight attn_norm;             // [hidden]
  Weight wq, wk, wv, wo;        // [q_dim, hidden], [kv_dim, hidden] x2, [hidden, q_dim]
  Weight bq, bk, bv, bo;        // optional biases [q_dim], [kv_dim] x2, [hidden]
  Weight q_norm, k_norm;        // Qwen3: [head_dim]
  Weight mlp_norm;              // [hidden]
  Weight w_gate, w_up;          // [intermediate, hidden]
  Weight w_down;                // [hidden, intermediate]
  Weight b_gate, b_up, b_down;  // optional (Llama mlp_bias)
};

struct ModelWeights {
  Weight embed;       // [vocab, hidden]
  Weight final_norm;  // [hidden]
  Weight lm_head;     // [vocab, hidden]; the embedding itself when tied
  std::vector<LayerWeights> layers;
  DType dtype = DType::kBF16;  // the dominant (matrix) type, for defaults like the KV type

  // Storage that the views point into.
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::vector<uint8_t> arena;  // dummy weights
  size_t TotalBytes() const;
  int64_t Parameters() const;  // elements of the distinct weights (a tied head counted once)
};

// Loads model.safetensors or the shards listed in model.safetensors.index.json from `dir`,
// checking every tensor's presence, dtype and shape against `cfg`.
ModelWeights LoadWeights(const std::string& dir, const ModelConfig& cfg);

// Random weights of the shapes `cfg` implies (like vLLM's dummy load format), for benchmarks at
// real model sizes without the files. Deterministic for a seed; filled in parallel. progress
// (optional) is called with (bytes filled, bytes in all) after each weight.
class ThreadingContext;
ModelWeights MakeDummyWeights(const ModelConfig& cfg, DType dtype, uint64_t seed,
                              ThreadingContext& threads,
                              const std::function<void(size_t, size_t)>& progress = nullptr);

// Calls f(Weight&) for every weight slot, present or not, in a fixed order.
template <typename F>
void ForEachWeight(ModelWeights& w, F&& f) {
  f(w.embed);
  f(w.final_norm);
  f(w.lm_head);
  for (auto& l : w.layers) {
    for (Weight* x :
         {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.bq, &l.bk, &l.bv, &l.bo, &l.q_norm,
          &l.k_norm, &l.mlp_norm, &l.w_gate, &l.w_up, &l.w_down, &l.b_gate, &l.b_up, &l.b_down})
      f(*x);
  }
}

// The expected (name, rows, cols, required) of every slot, in ForEachWeight order; rows == 1
// marks a 1-D tensor. Shared by the loader and the dummy builder so they cannot disagree.
struct WeightSpec {
  std::string name;
  int64_t rows, cols;
  bool required;
  bool is_vector;
};
std::vector<WeightSpec> ExpectedWeights(const ModelConfig& cfg);

}  // namespace needle
