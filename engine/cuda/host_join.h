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
  // Where not null, the handshake timed (pinned; HandshakeClock): the layer's clock, whose post
  // (PostToHost::stamp), seen and done are this step's once the flag says so, and the sums the
  // wait adds to.
  const uint64_t* clock = nullptr;
  uint64_t* sums_ns = nullptr;
};

// A layer's handshake between the GPU and its host worker, timed (pinned; 4 words): the GPU's
// clock (%globaltimer, ns) when Post wrote the selection's flag, then the host's (CLOCK_REALTIME,
// ns) when the worker saw it and when it was about to write its own flag.
struct HandshakeClock {
  static constexpr int kPost = 0, kSeen = 1, kDone = 2, kWords = 4;
};
// What JoinHost adds to its sums_ns, ns, per layer: [kIdle] the GPU waiting in JoinHost; [kSpan]
// from Post's flag to the wait's end (the GPU's clock); [kHost] from the worker seeing the
// selection to its flag (the host's); [kHandshake] the two crossings: the selection's flag to the
// worker seeing it, and the worker's flag to the GPU seeing it. The two clocks' offset cancels in
// their sum, which is kSpan less kHost.
struct HandshakeSums {
  static constexpr int kIdle = 0, kSpan = 1, kHost = 2, kHandshake = 3, kWords = 4;
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
  uint64_t* stamp = nullptr;  // where not null (pinned): the GPU's clock, before the flag
};
void Post(const PostToHost& p, cudaStream_t stream);

}  // namespace needle::cuda
