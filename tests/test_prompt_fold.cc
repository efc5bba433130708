// A prompt's attention by groups of tokens (engine/cpu/prompt_groups.h): each token's result is
// the same, bit for bit, whatever call it comes in. A prompt attended in one call equals the same
// prompt cut into calls of two tokens or more at odd token boundaries (as a batch or a chunked
// prefill cuts it), and any thread count: the groups change, each row's pieces of keys do not.
// Dense causal spans and sparse-prefill-like spans (shared Initial, a remapped block, Local, the
// causal chunk), on the Highway row tile and, where the CPU has them, the AMX tiles. (Accuracy
// against the reference: test_kernels.cc's AttentionTest and test_amx.cc.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "engine/cpu/amx.h"
#include "engine/cpu/ops.h"
#include "kvcache/kv_cache.h"
#include "tests/test_util.h"

namespace needle {
namespace {

// Spans of tokens [t0, t1) of a prompt at pos0 (over Hk KV heads), like a sparse prefill's
// chunk starting at `chunk`: [0, 40), the block [128, 256) rotated by rot_table row 0, Local
// [chunk - 100, chunk) and the chunk's causal part [chunk, p + 1).
AttnSpans SparseSpans(int64_t pos0, int64_t t0, int64_t t1, int64_t Hk, int64_t chunk, int64_t D) {
  AttnSpans s;
  s.offsets = {0};
  std::vector<float> inv_freq(static_cast<size_t>(D / 2));
  for (int64_t i = 0; i < D / 2; ++i) inv_freq[i] = std::pow(10000.f, -2.f * i / D);
  s.rot_table.resize(static_cast<size_t>(D));
  RotationRow(-300, inv_freq.data(), D, s.rot_table.data());
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t h = 0; h < Hk; ++h) {
      s.spans.push_back({0, 40});
      s.spans.push_back({128, 256});
      s.spans.push_back({chunk - 100, chunk});
      s.spans.push_back({chunk, pos0 + t + 1});
      s.rot.insert(s.rot.end(), {-1, 0, -1, -1});
      s.offsets.push_back(static_cast<int64_t>(s.spans.size()));
    }
  return s;
}

void ExpectCallsAttendAlike(DType type, bool sparse, amx::Mode mode) {
  amx::SetMode(mode);
  struct Restore {
    ~Restore() { amx::SetMode(amx::Mode::kFromEnv); }
  } restore;
  const int64_t Hk = 2, G = 4, D = 64, B = 32, T = 300, pos0 = 700, chunk = 690;
  const int64_t n_tok = pos0 + T;
  KVCache cache(KVCacheShape{1, Hk, D, n_tok, B, type});
  const auto k = test::RandomVector(n_tok * Hk * D, 41);
  const auto v = test::RandomVector(n_tok * Hk * D, 42);
  cache.Write(0, 0, n_tok, k.data(), v.data());
  cache.SetSize(n_tok);
  const auto q = test::RandomVector(T * Hk * G * D, 43, 2.f);
  AttnArgs a{T, pos0, Hk * G, Hk, D, 0, 1.0f / std::sqrt(static_cast<float>(D))};
  // Tokens [t0, t1) in one call: out [t1 - t0, heads, D], lse [t1 - t0, heads].
  auto run = [&](int64_t t0, int64_t t1, int threads, float* out, float* lse) {
    AttnArgs c = a;
    c.T = t1 - t0, c.pos0 = pos0 + t0;
    const AttnSpans sp = SparseSpans(pos0, t0, t1, Hk, chunk, D);
    ThreadingContext tc(threads);
    fast::Attention(q.data() + t0 * a.heads * D, cache.Layer(0), c, sparse ? &sp : nullptr, out,
                    lse, tc);
  };
  const size_t n_out = static_cast<size_t>(T * a.heads * D),
               n_lse = static_cast<size_t>(T * a.heads);
  std::vector<float> whole(n_out), whole_lse(n_lse);
  run(0, T, 1, whole.data(), whole_lse.data());
  std::vector<float> cut(n_out), cut_lse(n_lse);
  const int64_t bounds[] = {0, 2, 7, 23, 150, 152, T};  // (one token: the decode fold)
  for (size_t i = 0; i + 1 < std::size(bounds); ++i)
    run(bounds[i], bounds[i + 1], 1, cut.data() + bounds[i] * a.heads * D,
        cut_lse.data() + bounds[i] * a.heads);
  std::vector<float> threaded(n_out), threaded_lse(n_lse);
  run(0, T, 3, threaded.data(), threaded_lse.data());
  for (int64_t t = 0; t < T; ++t) {
    const size_t o = static_cast<size_t>(t * a.heads * D), l = static_cast<size_t>(t * a.heads);
    ASSERT_EQ(std::memcmp(cut.data() + o, whole.data() + o, a.heads * D * sizeof(float)), 0)
        << "token " << t;
    ASSERT_EQ(std::memcmp(cut_lse.data() + l, whole_lse.data() + l, a.heads * sizeof(float)), 0)
        << "token " << t;
    ASSERT_EQ(std::memcmp(threaded.data() + o, whole.data() + o, a.heads * D * sizeof(float)), 0)
        << "token " << t;
  }
}

TEST(PromptFold, TokensAttendAlikeInAnyCall) {
  for (DType type : {DType::kF32, DType::kBF16, DType::kI8})
    for (bool sparse : {false, true}) {
      SCOPED_TRACE(std::string(DTypeName(type)) + (sparse ? " sparse" : " dense"));
      ExpectCallsAttendAlike(type, sparse, amx::Mode::kOff);
    }
}

TEST(PromptFold, TokensAttendAlikeInAnyCallOnTheTiles) {
  if (!amx::Supported()) GTEST_SKIP() << "this CPU (or kernel) has no AMX-BF16 tiles";
  for (bool sparse : {false, true}) {
    SCOPED_TRACE(sparse ? "sparse" : "dense");
    ExpectCallsAttendAlike(DType::kBF16, sparse, amx::Mode::kOn);
  }
}

}  // namespace
}  // namespace needle
