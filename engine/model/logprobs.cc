#include "engine/model/logprobs.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "engine/base/error.h"

namespace needle {

TokenLogprob ScoreToken(const float* logits, int64_t V, int32_t token, int64_t k) {
  if (V < 1 || token < 0 || token >= V) Fail("logprobs: token ", token, " outside [0, ", V, ")");
  float mx = logits[0];
  for (int64_t i = 1; i < V; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
  const double lse = static_cast<double>(mx) + std::log(sum);
  TokenLogprob r;
  r.token = token;
  r.logprob = static_cast<float>(logits[token] - lse);
  k = std::min(k, V);
  if (k > 0) {
    std::vector<int32_t> ids(static_cast<size_t>(V));
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    r.top.reserve(static_cast<size_t>(k));
    for (int64_t i = 0; i < k; ++i)
      r.top.emplace_back(ids[i], static_cast<float>(logits[ids[i]] - lse));
  }
  return r;
}

}  // namespace needle
