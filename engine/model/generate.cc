#include "engine/model/generate.h"

#include <algorithm>
#include <chrono>

#include "engine/base/error.h"

namespace needle {

int32_t Argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

std::vector<int32_t> Generate(Model& model, KVCache& cache, const std::vector<int32_t>& prompt,
                              int64_t max_new_tokens, const SamplingParams& sampling,
                              const std::function<bool(int32_t)>& on_token, GenerateStats* stats) {
  using Clock = std::chrono::steady_clock;
  if (prompt.empty()) Fail("generate: the prompt is empty");
  Sampler sampler(sampling);
  GenerateStats st;
  st.prompt_tokens = static_cast<int64_t>(prompt.size());
  const auto& eos = model.config().eos_token_ids;
  std::vector<int32_t> context = prompt, out;
  std::vector<float> logits;
  // Greedy without a repetition penalty needs no logits on the host: the backend picks the
  // token where the logits are (on the GPU only the id comes back).
  // Top-k sampling likewise: only the k candidates come back, and the sampler draws from them.
  const bool no_penalty = sampling.repetition_penalty == 1.0f;
  const bool greedy = sampling.greedy() && no_penalty;
  const int64_t V = model.config().vocab_size;
  const bool topk = !sampling.greedy() && no_penalty && sampling.top_k > 0 && sampling.top_k < V;
  std::vector<float> cand_vals(topk ? static_cast<size_t>(sampling.top_k) : 0);
  std::vector<int32_t> cand_ids(cand_vals.size());
  int32_t chosen = 0;
  auto forward = [&](const int32_t* ids, int64_t n) {
    if (greedy) {
      chosen = model.ForwardGreedy(ids, n, cache);
    } else if (topk) {
      model.ForwardTopK(ids, n, cache, sampling.top_k, cand_vals.data(), cand_ids.data());
      chosen = sampler.SampleSorted(cand_vals.data(), cand_ids.data(), sampling.top_k);
    } else {
      model.Forward(ids, n, cache, false, &logits);
    }
  };
  auto t0 = Clock::now();
  forward(prompt.data(), static_cast<int64_t>(prompt.size()));
  auto t1 = Clock::now();
  st.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  for (int64_t i = 0; i < max_new_tokens; ++i) {
    const int32_t next = greedy || topk ? chosen : sampler.Sample(logits, context);
    out.push_back(next);
    context.push_back(next);
    const bool more = on_token ? on_token(next) : true;
    if (std::find(eos.begin(), eos.end(), next) != eos.end()) {
      st.stopped_at_eos = true;
      break;
    }
    if (!more || i + 1 == max_new_tokens) break;
    forward(&next, 1);
  }
  st.new_tokens = static_cast<int64_t>(out.size());
  st.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  if (stats != nullptr) *stats = st;
  return out;
}

std::vector<int32_t> GenerateGreedy(Model& model, KVCache& cache,
                                    const std::vector<int32_t>& prompt, int64_t max_new_tokens,
                                    const std::function<void(int32_t)>& on_token,
                                    GenerateStats* stats) {
  return Generate(
      model, cache, prompt, max_new_tokens, SamplingParams{},
      [&](int32_t id) {
        if (on_token) on_token(id);
        return true;
      },
      stats);
}

}  // namespace needle
