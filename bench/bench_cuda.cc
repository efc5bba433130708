// GPU benchmarks of the CUDA backend, one JSON object per line on stdout (bench/bench_cuda.sh
// prints them next to PyTorch's numbers from bench/bench_torch.py, run in the same command):
//   {"bench":"bandwidth"}      device memory bandwidth: a device-to-device copy and a read-only
//                              kernel (GB/s: the higher), and an empty launch's cost in a graph
//   {"bench":"attn_decode"}    one query token over ctx keys (32 q heads, 8 KV heads, D 128,
//                              bf16 KV): time per call, KV bytes read, GB/s and fraction of the
//                              bandwidth. As in a decode step, the calls go to the layers of a
//                              cache of >= 512 MiB in turn (a short cache alone would sit in L2)
//                              and are replayed from a CUDA graph (no host launch gaps);
//                              single_ms is one call timed alone, launch latency included;
//                              read_floor_ms a trivial kernel reading the same bytes per layer;
//                              tma_*_ms the decode floors of bench_floors.h (DecodeFloorsMs)
//   {"bench":"decode_cluster_floor"}  the cluster-merge floor with S = 8..16 splits per KV head
//                              (4K, 16K, 1M) and how many such clusters are resident at once
//   {"bench":"attn_prefill"}   causal prefill of T tokens, same heads: time and TFLOP/s, for the
//                              default tensor-core kernel (wgmma on Hopper) and mma.sync
//   {"bench":"e2e"}            --dummy-weights model (bench/configs): prefill tok/s of a P-token
//                              prompt and decode tok/s after it (the default decode path)
//   {"bench":"e2e_decode"}     the same decode in each of the backend's three modes (graph,
//                              fused, unfused; DecodeModes), against its bandwidth bound, with
//                              the step's GPU time per operator class (bench/profile_backend.h)
// Times are medians of event-timed repetitions after a warm-up (METHOD.md of the device tool).
//   {"bench":"gemv"}           the decode GEMV's tilings on the 7B/8B projections (bench_gemv.cu)
// Usage: bench_cuda [attn|decode|e2e|gemv|all] [config.json ...]  (decode: attn without prefill)
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "bench/bench_floors.h"
#include "bench/bench_gemv.h"
#include "bench/profile_backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/model/model.h"

namespace needle {
namespace {

using bench::GraphMedianMs;
using bench::MedianMs;

// The device's memory bandwidth: a device-to-device copy (read + write) and a read-only kernel.
// Decode attention only reads, so its fraction is taken of the read bandwidth, the higher.
// Returns the higher of the two in GB/s; *copy_gbs: the copy's.
double Bandwidth(cudaStream_t stream, double* copy_gbs) {
  const size_t bytes = size_t{2} << 30;
  void *src = nullptr, *dst = nullptr;
  NEEDLE_CUDA_CHECK(cudaMalloc(&src, bytes));
  NEEDLE_CUDA_CHECK(cudaMalloc(&dst, bytes));
  NEEDLE_CUDA_CHECK(cudaMemset(src, 1, bytes));
  const double ms =
      MedianMs(nullptr, 10, [&] { cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice); });
  cudaFree(src);
  cudaFree(dst);
  const double copy = 2.0 * bytes / (ms * 1e-3) / 1e9;  // read + write
  const double read = bench::ReadBandwidthGBs(stream);
  std::printf(
      "{\"bench\":\"bandwidth\",\"GB/s\":%.1f,\"copy_GB/s\":%.1f,\"read_GB/s\":%.1f,"
      "\"empty_launch_us\":%.2f}\n",
      std::max(copy, read), copy, read, bench::EmptyLaunchUs(stream, 64));
  *copy_gbs = copy;
  return std::max(copy, read);
}

// Fills positions [0, n) of one layer of a device cache with random-ish keys and values.
void Fill(Backend& b, KVCache& cache, int layer, int64_t n, int64_t kv_heads, int64_t D) {
  const int64_t chunk = std::min<int64_t>(16384, n);  // a short cache needs no full chunk
  std::vector<float> host(static_cast<size_t>(chunk * kv_heads * D));
  for (size_t i = 0; i < host.size(); ++i)
    host[i] = static_cast<float>((i * 2654435761u + layer * 97u) % 2001) / 1000.f - 1.f;
  BackendBuffer k(b, host.size()), v(b, host.size());
  b.FromHost(host.data(), host.size(), k.get());
  b.FromHost(host.data(), host.size(), v.get());
  for (int64_t p = 0; p < n; p += chunk)
    b.KVWrite(cache, layer, p, std::min(chunk, n - p), k.get(), v.get());
}

void Attention(Backend& b, double bw, bool prefill) {
  const int64_t H = 32, Hk = 8, D = 128;
  AttnArgs a;
  a.heads = H;
  a.kv_heads = Hk;
  a.head_dim = D;
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t ctx : {4096, 16384, 65536, 131072, 262144, 1048576}) {
    const double bytes = 2.0 * (ctx + 1) * Hk * D * 2;  // K and V of one layer
    const int layers = static_cast<int>(std::max(2.0, std::ceil(512.0 * (1 << 20) / bytes)));
    KVCache cache(KVCacheShape{layers, Hk, D, ctx + 1, 128, DType::kBF16}, 0, b.kv_memory());
    for (int l = 0; l < layers; ++l) Fill(b, cache, l, ctx + 1, Hk, D);
    cache.SetSize(ctx + 1);
    BackendBuffer q(b, H * D), out(b, H * D);
    std::vector<float> qh(H * D);
    for (size_t i = 0; i < qh.size(); ++i)
      qh[i] = static_cast<float>((i * 2246822519u) % 2001) / 1000.f - 1.f;
    b.FromHost(qh.data(), qh.size(), q.get());
    a.T = 1;
    a.pos0 = ctx;
    cudaStream_t stream = CudaBackendStream(b);
    const double ms =
        GraphMedianMs(stream, 20,
                      [&] {
                        for (int l = 0; l < layers; ++l)
                          b.Attention(q.get(), cache.Layer(l), a, nullptr, out.get(), nullptr);
                      }) /
        layers;
    // The same bytes read by a trivial kernel, one launch per layer: the floor of a decode call.
    std::vector<std::vector<std::pair<const void*, size_t>>> reads;
    for (int l = 0; l < layers; ++l)
      reads.push_back({{cache.Layer(l).k, static_cast<size_t>(bytes / 2)},
                       {cache.Layer(l).v, static_cast<size_t>(bytes / 2)}});
    const double floor_ms = bench::ReadMs(stream, reads);
    std::vector<bench::FloorLayer> fl;
    for (int l = 0; l < layers; ++l)
      fl.push_back({cache.Layer(l).k, cache.Layer(l).v, cache.Layer(l).table});
    const bench::DecodeFloors f = bench::DecodeFloorsMs(
        stream, fl, ctx + 1, 128, static_cast<int>(Hk), static_cast<int>(H / Hk));
    const double single = MedianMs(
        stream, 20, [&] { b.Attention(q.get(), cache.Layer(0), a, nullptr, out.get(), nullptr); });
    std::printf(
        "{\"bench\":\"attn_decode\",\"ctx\":%lld,\"layers\":%d,\"ms\":%.4f,\"GB/s\":%.1f,"
        "\"of_bw\":%.3f,\"single_ms\":%.4f,\"read_floor_ms\":%.4f,\"splits\":%d,"
        "\"tma_stream_ms\":%.4f,\"tma_paged_ms\":%.4f,\"tma_paged_shared_table_ms\":%.4f,"
        "\"tma_paged_merge_sc_ms\":%.4f,\"tma_paged_merge_ms\":%.4f,"
        "\"tma_paged_cluster_ms\":%.4f,\"max_clusters\":%d}\n",
        static_cast<long long>(ctx), layers, ms, bytes / (ms * 1e-3) / 1e9,
        bytes / (ms * 1e-3) / 1e9 / bw, single, floor_ms, f.splits, f.stream_ms, f.paged_ms,
        f.paged_shared_ms, f.merge_sc_ms, f.merge_ms, f.cluster_ms, f.max_clusters);
    std::fflush(stdout);
    // Clusters of S splits per KV head (the cluster floor needs every cluster resident at once).
    for (int S = 8; S <= 16 && (ctx <= 16384 || ctx == 1048576); ++S) {
      const bench::DecodeFloors c = bench::DecodeFloorsMs(
          stream, fl, ctx + 1, 128, static_cast<int>(Hk), static_cast<int>(H / Hk), S);
      std::printf(
          "{\"bench\":\"decode_cluster_floor\",\"ctx\":%lld,\"splits\":%d,\"max_clusters\":%d,"
          "\"tma_paged_ms\":%.4f,\"tma_paged_cluster_ms\":%.4f}\n",
          static_cast<long long>(ctx), c.splits, c.max_clusters, c.paged_ms, c.cluster_ms);
      std::fflush(stdout);
    }
  }
  for (int64_t T : {4096, 32768, 131072}) {
    if (!prefill) break;
    KVCache cache(KVCacheShape{1, Hk, D, T, 128, DType::kBF16}, 0, b.kv_memory());
    Fill(b, cache, 0, T, Hk, D);
    cache.SetSize(T);
    BackendBuffer q(b, static_cast<size_t>(T * H * D)), out(b, static_cast<size_t>(T * H * D));
    std::vector<float> qh(static_cast<size_t>(T * H * D));
    for (size_t i = 0; i < qh.size(); ++i)
      qh[i] = static_cast<float>((i * 2246822519u) % 2001) / 1000.f - 1.f;
    b.FromHost(qh.data(), qh.size(), q.get());
    a.T = T;
    a.pos0 = 0;
    // Both tensor-core kernels: the default (wgmma on Hopper) and mma.sync.
    for (const char* kernel : {"default", "mma"}) {
      setenv("NEEDLE_CUDA_ATTN_TC", std::strcmp(kernel, "mma") == 0 ? "mma" : "", 1);
      const double ms = MedianMs(CudaBackendStream(b), T >= 131072 ? 5 : 11, [&] {
        b.Attention(q.get(), cache.Layer(0), a, nullptr, out.get(), nullptr);
      });
      const double flops = 4.0 * H * D * (static_cast<double>(T) * (T + 1) / 2);
      std::printf(
          "{\"bench\":\"attn_prefill\",\"kernel\":\"%s\",\"T\":%lld,\"ms\":%.3f,\"TFLOP/"
          "s\":%.1f}\n",
          kernel, static_cast<long long>(T), ms, flops / (ms * 1e-3) / 1e12);
    }
    unsetenv("NEEDLE_CUDA_ATTN_TC");
  }
}

// Bytes a decode step must read from HBM besides the KV cache: every weight of the layers, the
// final norm and the LM head; of the embedding table one row.
double StepWeightBytes(const ModelWeights& w) {
  double bytes = static_cast<double>(w.final_norm.nbytes()) +
                 static_cast<double>(w.embed.nbytes()) / static_cast<double>(w.embed.rows);
  if (w.lm_head.data != w.embed.data)
    bytes += static_cast<double>(w.lm_head.nbytes());
  else
    bytes += static_cast<double>(w.embed.nbytes());
  for (const LayerWeights& L : w.layers)
    for (const Weight* x :
         {&L.attn_norm, &L.wq, &L.wk, &L.wv, &L.wo, &L.bq, &L.bk, &L.bv, &L.bo, &L.q_norm,
          &L.k_norm, &L.mlp_norm, &L.w_gate, &L.w_up, &L.w_down, &L.b_gate, &L.b_up, &L.b_down})
      if (x->present()) bytes += static_cast<double>(x->nbytes());
  return bytes;
}

// Decode in the ways the CUDA backend can run it: "graph" (fused kernels, the step replayed from
// a CUDA graph, the decode attention launched dependent: the default), "graph-no-pdl" (the same
// with every kernel launched as usual, NEEDLE_CUDA_PDL=0), "graph-rope-fold" (the default with
// RoPE + KV write folded into the q/k/v GEMV, NEEDLE_CUDA_ROPE_FOLD=1), "fused" (the default's
// kernels launched one by one) and "unfused" (each operator on its own, projections through
// cuBLAS: the backend before the decode fast path). tok/s with the last token's logits copied to
// the host after each step (what llama.cpp's llama_decode does) and greedy (only the chosen id
// comes back, as `needle generate` does), the step against its bandwidth bound (weights + K/V at
// the measured copy bandwidth), and, for the launched modes, the step's GPU time per operator
// class.
void DecodeModes(bench::ProfileBackend& prof, Backend& cuda, Model& model, KVCache& cache,
                 const std::string& name, int64_t P, double copy_gbs) {
  const double bytes = StepWeightBytes(model.weights()) +
                       static_cast<double>(cache.shape().BytesPerToken()) * static_cast<double>(P);
  const double bound_ms = bytes / (copy_gbs * 1e9) * 1e3;
  std::vector<float> logits;
  for (const char* mode : {"graph", "graph-no-pdl", "graph-rope-fold", "fused", "unfused"}) {
    const bool graph = std::strncmp(mode, "graph", 5) == 0;
    setenv("NEEDLE_CUDA_PDL", std::strcmp(mode, "graph-no-pdl") == 0 ? "0" : "1", 1);
    SetCudaFused(cuda, std::strcmp(mode, "unfused") != 0);
    setenv("NEEDLE_CUDA_GRAPH", graph ? "1" : "0", 1);
    setenv("NEEDLE_CUDA_ROPE_FOLD", std::strcmp(mode, "graph-rope-fold") == 0 ? "1" : "0", 1);
    model.ResetRecording();  // the cache is the same, the kernels are not
    int32_t tok = 11;
    for (int i = 0; i < 2; ++i) model.Forward(&tok, 1, cache, false, &logits);  // warm-up
    const char* st = std::getenv("NEEDLE_BENCH_STEPS");
    const int steps = st != nullptr ? std::max(1, std::atoi(st)) : 16;
    auto t0 = std::chrono::steady_clock::now();
    for (int s = 0; s < steps; ++s) model.Forward(&tok, 1, cache, false, &logits);
    auto t1 = std::chrono::steady_clock::now();
    for (int s = 0; s < steps; ++s) tok = model.ForwardGreedy(&tok, 1, cache) % 30000 + 10;
    auto t2 = std::chrono::steady_clock::now();
    const double ms = std::chrono::duration<double, std::milli>(t1 - t0).count() / steps;
    const double greedy_ms = std::chrono::duration<double, std::milli>(t2 - t1).count() / steps;
    std::string profile;
    if (!graph) {
      prof.Begin();
      model.Forward(&tok, 1, cache, false, &logits);
      double total = 0;
      const std::map<std::string, double> cls = prof.End(&total);
      char buf[128];
      std::snprintf(buf, sizeof buf, ",\"profile_ms\":%.4f,\"profile\":{", total);
      profile = buf;
      bool first = true;
      for (const auto& [k, v] : cls) {
        std::snprintf(buf, sizeof buf, "%s\"%s\":%.4f", first ? "" : ",", k.c_str(), v);
        profile += buf;
        first = false;
      }
      profile += "}";
    }
    std::printf(
        "{\"bench\":\"e2e_decode\",\"config\":\"%s\",\"prompt\":%lld,\"mode\":\"%s\","
        "\"ms\":%.4f,\"tok/s\":%.2f,\"greedy_ms\":%.4f,\"greedy_tok/s\":%.2f,\"step_GB\":%.3f,"
        "\"bound_ms\":%.4f,\"of_bound\":%.3f,\"greedy_of_bound\":%.3f%s}\n",
        name.c_str(), static_cast<long long>(P), mode, ms, 1e3 / ms, greedy_ms, 1e3 / greedy_ms,
        bytes / 1e9, bound_ms, bound_ms / ms, bound_ms / greedy_ms, profile.c_str());
    std::fflush(stdout);
  }
  SetCudaFused(cuda, true);
  unsetenv("NEEDLE_CUDA_GRAPH");
  unsetenv("NEEDLE_CUDA_ROPE_FOLD");
  unsetenv("NEEDLE_CUDA_PDL");
}

void EndToEnd(Backend& cuda, const std::string& config, double copy_gbs) {
  ThreadingContext tc(0);
  bench::ProfileBackend b(cuda, CudaBackendStream(cuda));
  auto model = MakeDummyModel(config, DType::kBF16, b, tc);
  const std::string name = config.substr(config.rfind('/') + 1);
  {  // warm-up: cuBLAS picks its kernels and the activation pool grows outside the timings
    KVCache cache(model->CacheShape(4096, DType::kBF16), 0, b.kv_memory());
    std::vector<int32_t> ids(4096, 11);
    std::vector<float> logits;
    model->set_ubatch(4096);
    model->Forward(ids.data(), 4096, cache, false, &logits);
  }
  // NEEDLE_BENCH_PROMPTS: the prompt lengths, comma-separated (default 4096,32768,131072).
  std::vector<int64_t> prompts = {4096, 32768, 131072};
  if (const char* v = std::getenv("NEEDLE_BENCH_PROMPTS")) {
    prompts.clear();
    for (const char* c = v; *c != 0;) {
      char* end = nullptr;
      const long long n = std::strtoll(c, &end, 10);
      if (end == c || n <= 0) Fail("NEEDLE_BENCH_PROMPTS: '", v, "' is not a list of lengths");
      prompts.push_back(n);
      c = *end == ',' ? end + 1 : end;
    }
  }
  for (int64_t P : prompts) {
    KVCache cache(model->CacheShape(P + 2048, DType::kBF16), 0, b.kv_memory());
    std::vector<int32_t> ids(static_cast<size_t>(P));
    for (int64_t i = 0; i < P; ++i) ids[i] = static_cast<int32_t>((i * 7919) % 30000 + 10);
    model->set_ubatch(4096);
    std::vector<float> logits;
    const auto t0 = std::chrono::steady_clock::now();
    model->Forward(ids.data(), P, cache, false, &logits);
    const auto t1 = std::chrono::steady_clock::now();
    const double pre = std::chrono::duration<double>(t1 - t0).count();
    int32_t tok = 11;
    const int steps = 16;
    model->Forward(&tok, 1, cache, false, &logits);  // warm-up step
    const auto t2 = std::chrono::steady_clock::now();
    for (int s = 0; s < steps; ++s) model->Forward(&tok, 1, cache, false, &logits);
    const auto t3 = std::chrono::steady_clock::now();
    const double dec = std::chrono::duration<double>(t3 - t2).count();
    std::printf(
        "{\"bench\":\"e2e\",\"config\":\"%s\",\"prompt\":%lld,\"prefill_tok/s\":%.0f,\"decode_tok/"
        "s\":%.2f}\n",
        name.c_str(), static_cast<long long>(P), P / pre, steps / dec);
    std::fflush(stdout);
    DecodeModes(b, cuda, *model, cache, name, P, copy_gbs);
  }
}

}  // namespace
}  // namespace needle

int main(int argc, char** argv) {
  using namespace needle;
  try {
    const std::string what = argc > 1 ? argv[1] : "all";
    auto b = MakeCudaBackend(0);
    double copy_gbs = 0;
    const double bw = Bandwidth(CudaBackendStream(*b), &copy_gbs);
    if (what == "attn" || what == "all" || what == "decode") Attention(*b, bw, what != "decode");
    if (what == "e2e" || what == "all")
      for (int i = 2; i < argc; ++i) EndToEnd(*b, argv[i], copy_gbs);
    if (what == "gemv" || what == "all") bench::GemvSweep(CudaBackendStream(*b), copy_gbs);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda: %s\n", e.what());
    return 1;
  }
  return 0;
}
