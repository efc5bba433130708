// The GPU and the host waiting for each other through flags in pinned memory (host placement
// planned on the GPU, with the host's work off the model's path: hybrid_host_worker.cc). The host
// queues a step's launches ahead of the GPU; a layer's merge of the CPU's partial is queued behind
// JoinHost, which holds the stream until a thread of the host has written the partial and then the
// layer's flag.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace needle::cuda {

// How long JoinHost waits before it gives up (and says so in timed_out): the host's work is a
// fold of a few hundred blocks, microseconds; this is only there so that a host that died or
// got stuck leaves the GPU free rather than spinning forever, and says where it was.
constexpr uint64_t kHostJoinTimeoutNs = uint64_t{20} * 1000 * 1000 * 1000;

struct HostJoin {
  // Pinned host memory (read through its host pointer): the wait ends when *flag - want, as a
  // signed 32-bit number, is >= 0 (the host writes the step's number, which wraps).
  const uint32_t* flag = nullptr;
  uint32_t want = 0;
  uint32_t* timed_out = nullptr;  // pinned: set to want where the wait gave up
  // Then, where cpu_sums is not null, the CPU's block sums into the retention's inputs (as
  // the GPU's attention writes its own): cpu_sums (pinned) [sum_h counts[h]][G][2], head by head
  // in list order; cpu (device) [kv_heads][n_sel] each head's CPU blocks as places in its
  // selection, then counts [kv_heads]; sums (device) [kv_heads][n_sel][tiles][G][2], of which the
  // CPU's blocks' tile 0 is written (their other tiles' sums are the attention's, 0: it masked
  // them).
  const float* cpu_sums = nullptr;
  const int32_t* cpu = nullptr;
  float* sums = nullptr;
  int64_t kv_heads = 0, n_sel = 0, tiles = 1, G = 1;
  // Where not null, the handshake timed: post (device) Post's stamp of the layer, clock (pinned;
  // HandshakeClock) the worker's, both this step's once the flag says so, and the sums (device;
  // HandshakeSums) the wait adds to. Only two loads from host memory, at once, after the wait:
  // the rest in device memory (a read of host memory takes a PCIe round, on the step's path).
  const uint64_t* post = nullptr;
  const uint64_t* clock = nullptr;
  uint64_t* sums_ns = nullptr;
};

// A layer's handshake between the GPU and its host worker, timed: the GPU's clock (%globaltimer,
// ns) when Post wrote the selection's flag (PostToHost::stamp, device memory), and the host's
// (CLOCK_REALTIME, ns; pinned, these 2 words a layer) when the worker saw that flag and when it
// was about to write its own.
struct HandshakeClock {
  static constexpr int kSeen = 0, kDone = 1, kWords = 2;
};
// What JoinHost adds to its sums_ns, ns, per layer: [kIdle] the GPU waiting in JoinHost; [kSpan]
// from Post's flag to the wait's end (the GPU's clock); [kHost] from the worker seeing the
// selection to its flag (the host's). kSpan less kHost is the two crossings: the selection's flag
// to the worker seeing it, and the worker's flag to the GPU seeing it; the two clocks' offset
// cancels in their sum. Each crossing alone, with the offset in it (signed, as
// two's complement): [kToHost] the host's clock when the worker saw the selection less the GPU's
// at its flag, [kToGpu] the GPU's at the wait's end less the host's at the worker's flag, summed
// over [kCount] waits, and each one's least ([kMinToHost], [kMinToGpu]): a crossing's mean less
// its least is what it took beyond its fastest, and the two leasts add up to the fastest round.
struct HandshakeSums {
  static constexpr int kIdle = 0, kSpan = 1, kHost = 2, kToHost = 3, kToGpu = 4, kCount = 5,
                       kMinToHost = 6, kMinToGpu = 7, kWords = 8;
};

void JoinHost(const HostJoin& j, cudaStream_t stream);
// Loads JoinHost's and Post's kernels now, not at their first launch (a load may wait for the
// whole GPU; see PreloadGatherBlocks).
void PreloadHostJoin();

// The other way: device ranges written straight into pinned host memory by one kernel, then a
// flag, so that a host thread spinning on the flag starts as soon as they are there (instead of
// copies through the copy engine, each a few microseconds on the stream, and an event).
struct PostToHost {
  struct Range {
    const uint32_t* src = nullptr;  // device
    uint32_t* dst = nullptr;        // pinned host memory (its host pointer)
    int64_t words = 0;              // 4-byte words
  };
  static constexpr int kRanges = 3;
  Range r[kRanges];
  uint32_t* flag = nullptr;  // pinned: set to value once every range is visible to the host
  uint32_t value = 0;
  uint64_t* stamp = nullptr;  // where not null (device memory): the GPU's clock at the flag
};
void Post(const PostToHost& p, cudaStream_t stream);

}  // namespace needle::cuda
