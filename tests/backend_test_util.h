// Helpers for tests that run a Backend on data they make (test_cuda.cc, test_cuda_decode.cc):
// buffers to and from backend memory, random weights on the host and in the backend's memory.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/base/dtype.h"
#include "engine/model/weights.h"
#include "tests/test_util.h"

namespace needle::test {

// A backend buffer holding `host`.
inline BackendBuffer Upload(Backend& b, const std::vector<float>& host) {
  BackendBuffer buf(b, host.size());
  b.FromHost(host.data(), host.size(), buf.get());
  return buf;
}
// n floats of backend memory at p, on the host.
inline std::vector<float> Download(Backend& b, const float* p, size_t n) {
  std::vector<float> h(n);
  b.ToHost(p, n, h.data());
  return h;
}
inline std::vector<float> Download(Backend& b, const BackendBuffer& buf) {
  return Download(b, buf.get(), buf.size());
}

// A random [rows, cols] weight of type t in host memory (w points into bytes).
struct OwnedWeight {
  std::vector<uint8_t> bytes;
  Weight w;
};
inline OwnedWeight MakeWeight(DType t, int64_t rows, int64_t cols, uint64_t seed) {
  OwnedWeight o;
  const std::vector<float> v = RandomVector(static_cast<size_t>(rows * cols), seed);
  o.bytes.resize(v.size() * DTypeSize(t));
  for (size_t i = 0; i < v.size(); ++i) StoreFromF32(t, o.bytes.data(), i, v[i]);
  o.w = Weight{"w", t, rows, cols, o.bytes.data()};
  return o;
}
// Uploads a weight through the backend's PrepareWeights (a model of one embedding table).
inline Weight DeviceWeight(Backend& b, const Weight& host) {
  ModelWeights mw;
  mw.embed = host;
  b.PrepareWeights(mw);
  return mw.embed;
}

}  // namespace needle::test
