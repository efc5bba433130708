// Floors of a paged decode call (bench_floors.h, DecodeFloorsMs): what the copy engine, the
// block-table lookup and the two ways of merging splits cost by themselves, with no products.
//
// Each block (kv head h, split) streams its tiles of 32 keys (K and V rows of one cache block,
// [32][D] 16-bit each, contiguous in the arena) with 1-D bulk copies into a ring of kStages
// shared-memory stages; warp 0 is the producer and consumer, the other warps wait at the end, as
// a block of the real kernel waits for its slowest warp. The grid is the TMA decode kernel's
// (attention_decode_tma.cu): kv_heads x splits blocks of 128 threads, one per multiprocessor.
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>

#include "bench/bench_floors.h"
#include "engine/base/error.h"
#include "engine/cuda/attention_decode_tma.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/decode_merge.cuh"
#include "engine/cuda/device_util.cuh"
#include "engine/cuda/smem_async.cuh"

namespace needle::bench {
namespace {

namespace cg = cooperative_groups;
using cuda::MergeArgs;

constexpr int kThreads = 128, kTileKeys = 32, kStages = 12, kG = 8, kD = 128;
constexpr int kTileBytes = kTileKeys * kD * 2, kStageBytes = 2 * kTileBytes;
constexpr size_t kSmem = static_cast<size_t>(kStages) * kStageBytes;

enum Mode { kStream, kPaged, kMergeSc, kMerge, kCluster };

struct FloorArgs {
  const uint8_t* k;      // arena [slots][kv_heads][B][kD] 16-bit
  const uint8_t* v;      // same
  const int32_t* table;  // [blocks] logical block -> slot
  int B, kv_heads, G, tiles, tiles_per_split;
};

__device__ __forceinline__ void BulkLoad(uint32_t dst, const void* src, uint32_t bytes,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
      : "memory");
}

template <int kMode>
__global__ void __launch_bounds__(kThreads, 1)
    FloorKernel(FloorArgs a, cuda::AttnParams p, MergeArgs mg) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) uint8_t ring[];
  __shared__ __align__(8) uint64_t bars[kStages];
  __shared__ float sm_acc[kG][kD], sm_m[kG], sm_l[kG];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int h = blockIdx.x, split = blockIdx.y;
  const int t0 = split * a.tiles_per_split, n = min(a.tiles, t0 + a.tiles_per_split) - t0;
  auto saddr = [](const void* x) { return static_cast<uint32_t>(__cvta_generic_to_shared(x)); };

  if (warp == 0) {
    // Slots of tiles 32 c + lane of batch c (one table load per lane), the next batch ahead.
    auto slot_of = [&](int c) -> int32_t {
      const int i = 32 * c + lane;
      if (i >= n) return 0;
      const int block = (t0 + i) * kTileKeys / a.B;
      return kMode == kStream ? block : __ldg(a.table + block);
    };
    int32_t cur = slot_of(0), next = n > 32 ? slot_of(1) : 0;
    const uint32_t bar0 = saddr(&bars[0]), ring0 = saddr(ring);
    if (lane == 0) {
      for (int s = 0; s < kStages; ++s) cuda::MbarInit(bar0 + 8 * s, 1);
      cuda::FenceMbarInit();
    }
    __syncwarp();
    auto issue = [&](int i) {
      if (i > 0 && i % 32 == 0) {
        cur = next;
        next = slot_of(i / 32 + 1);
      }
      const int32_t slot = __shfl_sync(0xffffffffu, cur, i % 32);
      if (lane == 0) {
        const int key = (t0 + i) * kTileKeys, s = i % kStages;
        const size_t row = (static_cast<size_t>(slot) * a.kv_heads + h) * a.B + key % a.B;
        const uint32_t bar = bar0 + 8 * s, dst = ring0 + s * kStageBytes;
        cuda::MbarArriveExpectTx(bar, kStageBytes);
        BulkLoad(dst, a.k + row * kD * 2, kTileBytes, bar);
        BulkLoad(dst + kTileBytes, a.v + row * kD * 2, kTileBytes, bar);
      }
    };
    for (int i = 0; i < kStages && i < n; ++i) issue(i);
    for (int i = 0; i < n; ++i) {
      cuda::MbarWait(bar0 + 8 * (i % kStages), (i / kStages) & 1);
      if (i + kStages < n) issue(i + kStages);
    }
  }
  if constexpr (kMode >= kMergeSc) {
    // A partial per block: every query head of h saw the same (the values do not matter here).
    for (int i = threadIdx.x; i < kG * kD; i += kThreads) sm_acc[i / kD][i % kD] = 1.f;
    if (threadIdx.x < kG) {
      sm_m[threadIdx.x] = 0.f;
      sm_l[threadIdx.x] = 1.f;
    }
    __syncthreads();
    if constexpr (kMode == kMergeSc || kMode == kMerge) {
      cuda::WriteBlockResult<kThreads, kG, kD>(p, h, split, 1, &sm_acc[0][0], sm_m, sm_l);
      if constexpr (kMode == kMerge) {
        cuda::MergeIfLast<kThreads / 32, kG, kD>(p, mg, h);
      } else {
        // The fifth session's arrival: sequentially consistent fences around a relaxed atomic.
        __shared__ unsigned arrived;
        __syncthreads();
        if (threadIdx.x == 0) {
          __threadfence();
          arrived = atomicAdd(mg.counter + h, 1u);
          __threadfence();
        }
        __syncthreads();
        if (arrived == static_cast<unsigned>(p.splits - 1))
          cuda::MergeSplits<kThreads / 32, kG, kD>(p, mg, h);
      }
    } else {
      // kCluster: the splits of h are one cluster; after the barrier, rank r merges outputs
      // [r * per, (r + 1) * per) of the G x kD of h from every rank's shared memory.
      cg::cluster_group cluster = cg::this_cluster();
      cluster.sync();
      const int S = gridDim.y, r = static_cast<int>(cluster.block_rank());
      const int per = (a.G * kD + S - 1) / S, idx = r * per + threadIdx.x;
      if (threadIdx.x < per && idx < a.G * kD) {
        const int g = idx / kD, d = idx % kD;
        // All loads first (one round trip), then the fold.
        float ms[16], ls[16], os[16], M = -INFINITY, L = 0.f, O = 0.f;
#pragma unroll
        for (int s = 0; s < 16; ++s) {
          ms[s] = s < S ? *cluster.map_shared_rank(&sm_m[g], s) : -INFINITY;
          ls[s] = s < S ? *cluster.map_shared_rank(&sm_l[g], s) : 0.f;
          os[s] = s < S ? *cluster.map_shared_rank(&sm_acc[g][d], s) : 0.f;
          M = fmaxf(M, ms[s]);
        }
#pragma unroll
        for (int s = 0; s < 16; ++s) {
          const float w = ls[s] > 0.f ? __expf(ms[s] - M) : 0.f;
          L += ls[s] * w;
          O += os[s] * w;
        }
        mg.out[(static_cast<int64_t>(h) * a.G + g) * kD + d] = O / L;
      }
      cluster.sync();  // the other ranks read this block's shared memory until here
    }
  }
#endif
}

// The launch of FloorKernel<kMode> over kv_heads x splits blocks; kCluster: one cluster per KV
// head (more than 8 blocks per cluster needs the non-portable opt-in).
template <int kMode>
struct FloorLaunch {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr{};

  FloorLaunch(int kv_heads, int splits, cudaStream_t stream) {
    NEEDLE_CUDA_CHECK(cudaFuncSetAttribute(
        FloorKernel<kMode>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem)));
    cfg.gridDim = dim3(static_cast<unsigned>(kv_heads), static_cast<unsigned>(splits));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = kSmem;
    cfg.stream = stream;
    if (kMode == kCluster) {
      NEEDLE_CUDA_CHECK(cudaFuncSetAttribute(FloorKernel<kMode>,
                                             cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = 1;
      attr.val.clusterDim.y = static_cast<unsigned>(splits);
      attr.val.clusterDim.z = 1;
      cfg.attrs = &attr;
      cfg.numAttrs = 1;
    }
  }
  FloorLaunch(const FloorLaunch&) = delete;  // cfg.attrs points into the object
  FloorLaunch& operator=(const FloorLaunch&) = delete;

  void Run(const FloorArgs& a, const cuda::AttnParams& p, const MergeArgs& mg) {
    NEEDLE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, FloorKernel<kMode>, a, p, mg));
  }
  // Clusters resident at once (kCluster).
  int MaxActiveClusters() {
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, FloorKernel<kMode>, &cfg) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
  }
};

}  // namespace

DecodeFloors DecodeFloorsMs(cudaStream_t stream, const std::vector<FloorLayer>& layers,
                            int64_t n_keys, int B, int kv_heads, int G, int splits_wanted) {
  int dev = 0, sms = 0;
  NEEDLE_CUDA_CHECK(cudaGetDevice(&dev));
  NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (B % kTileKeys != 0) Fail("DecodeFloorsMs: block size ", B, " is not a multiple of 32");
  DecodeFloors f;
  if (cuda::ComputeCapability() < 90) return f;  // no copy engine: the kernels are empty
  // The TMA decode kernel's cut of the tiles, or splits_wanted splits of whole tiles.
  const int tiles = static_cast<int>((n_keys + kTileKeys - 1) / kTileKeys);
  const int per =
      splits_wanted > 0
          ? (tiles + splits_wanted - 1) / splits_wanted
          : static_cast<int>(cuda::TmaDecodeSplitOf(tiles, sms, kv_heads).tiles_per_split);
  const int splits = (tiles + per - 1) / per;

  const int heads = kv_heads * G;
  float *part = nullptr, *out = nullptr;
  unsigned* counter = nullptr;
  NEEDLE_CUDA_CHECK(cudaMalloc(&part, sizeof(float) * splits * heads * (kD + 2)));
  NEEDLE_CUDA_CHECK(cudaMalloc(&out, sizeof(float) * heads * kD));
  NEEDLE_CUDA_CHECK(cudaMalloc(&counter, sizeof(unsigned) * kv_heads));
  NEEDLE_CUDA_CHECK(cudaMemset(counter, 0, sizeof(unsigned) * kv_heads));
  cuda::AttnParams p{};
  p.G = G;
  p.heads = heads;
  p.splits = splits;
  p.out = part;
  p.m = part + static_cast<int64_t>(splits) * heads * kD;
  p.l = p.m + splits * heads;
  const MergeArgs mg{out, nullptr, counter};

  auto run = [&](auto mode, bool shared_table = false) {
    constexpr int kMode = decltype(mode)::value;
    FloorLaunch<kMode> launch(kv_heads, splits, stream);
    return GraphMedianMs(
               stream, 20,
               [&] {
                 for (FloorLayer l : layers) {
                   if (shared_table) l.table = layers[0].table;
                   launch.Run({static_cast<const uint8_t*>(l.k), static_cast<const uint8_t*>(l.v),
                               l.table, B, kv_heads, G, tiles, per},
                              p, mg);
                 }
               }) /
           static_cast<double>(layers.size());
  };
  f.splits = splits;
  f.paged_ms = run(std::integral_constant<int, kPaged>{});
  if (splits_wanted == 0) {
    f.stream_ms = run(std::integral_constant<int, kStream>{});
    f.paged_shared_ms = run(std::integral_constant<int, kPaged>{}, true);
    f.merge_sc_ms = run(std::integral_constant<int, kMergeSc>{});
    f.merge_ms = run(std::integral_constant<int, kMerge>{});
  }
  // Clusters of `splits` blocks: how many fit at once, then their time.
  if (splits <= 16) {
    f.max_clusters = FloorLaunch<kCluster>(kv_heads, splits, stream).MaxActiveClusters();
    if (f.max_clusters > 0) f.cluster_ms = run(std::integral_constant<int, kCluster>{});
  }
  cudaFree(part);
  cudaFree(out);
  cudaFree(counter);
  return f;
}

}  // namespace needle::bench
