#include "engine/model/rope.h"

#include <algorithm>
#include <cmath>

namespace needle {

namespace {

// base^(-2i/dim) for i in [0, dim/2), rounded to fp32 like torch's fp32 pow.
std::vector<double> DefaultInvFreq(double base, int64_t dim) {
  std::vector<double> f(static_cast<size_t>(dim / 2));
  for (int64_t i = 0; i < dim / 2; ++i) {
    float expo = static_cast<float>(2 * i) / static_cast<float>(dim);
    f[i] = static_cast<float>(1.0 / std::pow(base, static_cast<double>(expo)));
  }
  return f;
}

double YarnMscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

}  // namespace

RopeFreqs ComputeRopeFreqs(const ModelConfig& cfg, int64_t seq_len) {
  const RopeConfig& r = cfg.rope;
  const int64_t dim = cfg.head_dim;
  RopeFreqs out;
  std::vector<double> f;
  double attention = 1.0;
  switch (r.type) {
    case RopeType::kDefault:
      f = DefaultInvFreq(r.theta, dim);
      break;
    case RopeType::kLinear:
      f = DefaultInvFreq(r.theta, dim);
      for (auto& x : f) x = static_cast<float>(x) / static_cast<float>(r.factor);
      break;
    case RopeType::kDynamic: {
      // NTK-aware: grow the base once the sequence exceeds max_position_embeddings.
      const double max_pos = static_cast<double>(cfg.max_position_embeddings);
      const double len = std::max(static_cast<double>(seq_len), max_pos);
      const double base =
          r.theta * std::pow(r.factor * len / max_pos - (r.factor - 1.0),
                             static_cast<double>(dim) / static_cast<double>(dim - 2));
      f = DefaultInvFreq(base, dim);
      break;
    }
    case RopeType::kLlama3: {
      f = DefaultInvFreq(r.theta, dim);
      const double old_len = static_cast<double>(r.original_max_position_embeddings);
      const double low_wavelen = old_len / r.low_freq_factor;
      const double high_wavelen = old_len / r.high_freq_factor;
      for (auto& x : f) {
        const float inv = static_cast<float>(x);
        const float wavelen = static_cast<float>(2.0 * M_PI) / inv;
        float y = inv;
        if (wavelen > low_wavelen) {
          y = inv / static_cast<float>(r.factor);
        } else if (!(wavelen < high_wavelen)) {
          const float smooth =
              (static_cast<float>(old_len) / wavelen - static_cast<float>(r.low_freq_factor)) /
              static_cast<float>(r.high_freq_factor - r.low_freq_factor);
          y = (1.0f - smooth) * inv / static_cast<float>(r.factor) + smooth * inv;
        }
        x = y;
      }
      break;
    }
    case RopeType::kYarn: {
      const double base = r.theta;
      const double factor = r.factor;
      if (r.attention_factor > 0) {
        attention = r.attention_factor;
      } else if (r.mscale > 0 && r.mscale_all_dim > 0) {
        attention = YarnMscale(factor, r.mscale) / YarnMscale(factor, r.mscale_all_dim);
      } else {
        attention = YarnMscale(factor, 1.0);
      }
      const double orig = static_cast<double>(r.original_max_position_embeddings);
      auto correction_dim = [&](double rotations) {
        return (static_cast<double>(dim) * std::log(orig / (rotations * 2.0 * M_PI))) /
               (2.0 * std::log(base));
      };
      double low = correction_dim(r.beta_fast);
      double high = correction_dim(r.beta_slow);
      if (r.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
      }
      low = std::max(low, 0.0);
      high = std::min(high, static_cast<double>(dim - 1));
      if (low == high) high += 0.001;  // avoids a division by zero, as transformers does
      f.resize(static_cast<size_t>(dim / 2));
      for (int64_t i = 0; i < dim / 2; ++i) {
        const float expo = static_cast<float>(2 * i) / static_cast<float>(dim);
        const float pos_freq = static_cast<float>(std::pow(base, static_cast<double>(expo)));
        const float extrap = 1.0f / pos_freq;
        const float interp = 1.0f / (static_cast<float>(factor) * pos_freq);
        float ramp = static_cast<float>((static_cast<double>(i) - low) / (high - low));
        ramp = std::clamp(ramp, 0.0f, 1.0f);
        const float extrap_factor = 1.0f - ramp;
        f[i] = interp * (1.0f - extrap_factor) + extrap * extrap_factor;
      }
      break;
    }
  }
  out.inv_freq.assign(f.begin(), f.end());
  out.attention_scaling = static_cast<float>(attention);
  return out;
}

}  // namespace needle
