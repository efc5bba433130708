#include "engine/model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_set>

#include "engine/base/error.h"
#include "engine/model/generate.h"

namespace needle {

void SamplingParams::Validate() const {
  if (!(temperature >= 0 && std::isfinite(temperature)))
    Fail("--temperature must be a finite number >= 0 (got ", temperature, ")");
  if (top_k < 0) Fail("--top-k must not be negative (got ", top_k, ")");
  if (!(top_p > 0 && top_p <= 1)) Fail("--top-p must be in (0, 1] (got ", top_p, ")");
  if (!(min_p >= 0 && min_p < 1)) Fail("--min-p must be in [0, 1) (got ", min_p, ")");
  if (!(repetition_penalty > 0 && std::isfinite(repetition_penalty)))
    Fail("--repetition-penalty must be a finite positive number (got ", repetition_penalty, ")");
}

int32_t Sampler::Sample(std::vector<float>& logits, const std::vector<int32_t>& context) {
  const int64_t V = static_cast<int64_t>(logits.size());
  if (p_.repetition_penalty != 1.0f) {
    // CTRL-style: shrink positive logits, grow negative ones, once per distinct token.
    std::unordered_set<int32_t> seen(context.begin(), context.end());
    for (int32_t t : seen) {
      if (t < 0 || t >= V) continue;
      float& l = logits[t];
      l = l > 0 ? l / p_.repetition_penalty : l * p_.repetition_penalty;
    }
  }
  if (p_.greedy()) return Argmax(logits.data(), V);
  // Candidates by descending raw logit (ties: lower id first, for determinism); dividing by the
  // temperature afterwards keeps that order.
  std::vector<int32_t> idx(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  int64_t keep = V;
  if (p_.top_k > 0 && p_.top_k < V) {
    std::partial_sort(idx.begin(), idx.begin() + p_.top_k, idx.end(), by_logit);
    keep = p_.top_k;
  } else {
    std::sort(idx.begin(), idx.end(), by_logit);
  }
  std::vector<float> vals(static_cast<size_t>(keep));
  for (int64_t i = 0; i < keep; ++i) vals[i] = logits[idx[i]];
  return SampleSorted(vals.data(), idx.data(), keep);
}

int32_t Sampler::SampleSorted(const float* vals, const int32_t* ids, int64_t keep) {
  if (keep <= 0) Fail("sampling: no candidates");
  if (p_.greedy()) return ids[0];
  const double mx = static_cast<double>(vals[0] / p_.temperature);
  std::vector<double> prob(static_cast<size_t>(keep));
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i)
    sum += (prob[i] = std::exp(static_cast<double>(vals[i] / p_.temperature) - mx));
  for (auto& p : prob) p /= sum;
  if (p_.top_p < 1.0f) {
    // Smallest prefix whose mass reaches top_p (at least one token).
    double cum = 0;
    int64_t n = 0;
    while (n < keep && (n == 0 || cum < p_.top_p)) cum += prob[n++];
    keep = n;
  }
  if (p_.min_p > 0.0f) {
    const double floor = p_.min_p * prob[0];
    int64_t n = 1;
    while (n < keep && prob[n] >= floor) ++n;
    keep = n;
  }
  std::discrete_distribution<int64_t> dist(prob.begin(), prob.begin() + keep);
  return ids[dist(rng_)];
}

}  // namespace needle
