// The block pool that caches draw from (kvcache/block_pool.h): sequences sharing one pool take
// blocks as they grow and give them back when they end; each reads its own keys through its own
// block table, and attention over them equals attention over a cache with a pool of its own.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/base/threading.h"
#include "kvcache/block_pool.h"
#include "kvcache/kv_cache.h"
#include "tests/test_util.h"

namespace needle {
namespace {

TEST(BlockPool, LowestFreeSlotFirstAndReferenceCounts) {
  BlockPool pool(KVCacheShape{2, 1, 4, 5 * 4, 4, DType::kF32});  // 5 blocks a layer
  EXPECT_EQ(pool.FreeSlots(0), 5);
  EXPECT_EQ(pool.Allocate(0), 0);
  EXPECT_EQ(pool.Allocate(0), 1);
  EXPECT_EQ(pool.Allocate(0), 2);
  EXPECT_EQ(pool.Allocate(1), 0);  // layers are separate
  pool.Free(0, 1);
  EXPECT_EQ(pool.FreeSlots(0), 3);
  EXPECT_EQ(pool.Allocate(0), 1);  // the lowest free one
  pool.Share(0, 2);
  EXPECT_EQ(pool.References(0, 2), 2);
  pool.Free(0, 2);
  EXPECT_EQ(pool.References(0, 2), 1);  // still in use
  EXPECT_EQ(pool.Allocate(0), 3);
  EXPECT_EQ(pool.Allocate(0), 4);
  try {
    pool.Allocate(0);
    FAIL() << "a sixth block of five";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("no free block in layer 0"), std::string::npos) << m;
    EXPECT_NE(m.find("all 5 blocks of 4 tokens"), std::string::npos) << m;
  }
  for (int32_t s : {0, 1, 2, 3, 4}) pool.Free(0, s);
  EXPECT_EQ(pool.FreeSlots(0), 5);
  EXPECT_EQ(pool.Allocate(0), 0);  // (every slot free: numbering starts over)
}

// Two sequences interleaving their blocks in one pool read back their own rows; one that ends
// gives its blocks back for the next.
TEST(BlockPool, SequencesShareAPoolAndGiveBlocksBack) {
  const int64_t L = 2, Hk = 2, D = 8, B = 4;
  BlockPool pool(KVCacheShape{L, Hk, D, 12 * B, B, DType::kBF16});
  auto a = std::make_unique<KVCache>(pool, 6 * B), b = std::make_unique<KVCache>(pool, 6 * B);
  const int64_t n = 5 * B + 1;  // 6 blocks each
  const auto ka = test::RandomVector(L * n * Hk * D, 1), kb = test::RandomVector(L * n * Hk * D, 2);
  for (int64_t t = 0; t < n; ++t)  // one token at a time, alternating: blocks interleave
    for (int64_t l = 0; l < L; ++l) {
      a->Write(l, t, 1, ka.data() + (l * n + t) * Hk * D, ka.data() + (l * n + t) * Hk * D);
      b->Write(l, t, 1, kb.data() + (l * n + t) * Hk * D, kb.data() + (l * n + t) * Hk * D);
    }
  a->SetSize(n), b->SetSize(n);
  EXPECT_EQ(pool.FreeSlots(0), 0);
  EXPECT_EQ(a->SlotOf(0, 0), 0);
  EXPECT_EQ(b->SlotOf(0, 0), 1);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < Hk; ++h)
        for (int64_t d = 0; d < D; ++d) {
          const float wa = BF16ToF32(F32ToBF16(ka[((l * n + t) * Hk + h) * D + d]));
          const float wb = BF16ToF32(F32ToBF16(kb[((l * n + t) * Hk + h) * D + d]));
          ASSERT_EQ(a->Layer(l).KAt(h, t, d), wa) << l << " " << t << " " << h << " " << d;
          ASSERT_EQ(b->Layer(l).VAt(h, t, d), wb) << l << " " << t << " " << h << " " << d;
        }
  // A third sequence has no room until one ends.
  KVCache c(pool, 6 * B);
  EXPECT_THROW(c.AssignBlocks(0, 0, 1), Error);
  a.reset();
  EXPECT_EQ(pool.FreeSlots(0), 6);
  EXPECT_EQ(pool.FreeSlots(1), 6);
  c.AssignBlocks(0, 0, 6 * B);
  EXPECT_EQ(pool.FreeSlots(0), 0);
  c.Clear();
  EXPECT_EQ(pool.FreeSlots(0), 6);
  EXPECT_EQ(b->Layer(1).KAt(1, n - 1, 3),
            BF16ToF32(F32ToBF16(kb[((1 * n + n - 1) * Hk + 1) * D + 3])));
  // A sequence longer than its own capacity, or a pool with ring layers, is refused.
  EXPECT_THROW(b->AssignBlocks(0, 6 * B, 1), Error);
  KVCacheShape ring = pool.shape();
  ring.ring_layer = {0, 1}, ring.ring_blocks = 2;
  BlockPool ring_pool(ring);
  EXPECT_THROW(KVCache(ring_pool, 8), Error);
}

// Writes of disjoint blocks on several threads, their blocks assigned first (kv_cache.h's rule):
// the cache holds what one thread writing in order leaves, and the blocks are those it takes.
// (bench_sparse once wrote without assigning first: the threads raced on the pool's free list.)
TEST(BlockPool, ParallelWritesOfAssignedBlocksEqualSerialOnes) {
  const int64_t Hk = 2, D = 8, B = 4, n = 64 * B + 3;
  const KVCacheShape shape{1, Hk, D, n, B, DType::kBF16};
  const auto k = test::RandomVector(n * Hk * D, 5), v = test::RandomVector(n * Hk * D, 6);
  KVCache serial(shape), parallel(shape);
  serial.Write(0, 0, n, k.data(), v.data());
  parallel.AssignBlocks(0, 0, n);
  ThreadingContext tc(4);
  const int64_t chunk = 2 * B;  // whole blocks a piece
  tc.ParallelFor(static_cast<size_t>((n + chunk - 1) / chunk), 1, [&](size_t b, size_t e) {
    for (size_t c = b; c < e; ++c) {
      const int64_t t0 = static_cast<int64_t>(c) * chunk, m = std::min(chunk, n - t0);
      parallel.Write(0, t0, m, k.data() + t0 * Hk * D, v.data() + t0 * Hk * D);
    }
  });
  serial.SetSize(n), parallel.SetSize(n);
  for (int64_t b = 0; b * B < n; ++b) ASSERT_EQ(parallel.SlotOf(0, b), serial.SlotOf(0, b)) << b;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < Hk; ++h)
      for (int64_t d = 0; d < D; ++d) {
        ASSERT_EQ(parallel.Layer(0).KAt(h, t, d), serial.Layer(0).KAt(h, t, d)) << t;
        ASSERT_EQ(parallel.Layer(0).VAt(h, t, d), serial.Layer(0).VAt(h, t, d)) << t;
      }
}

// Attention through a shared pool's table equals attention over a cache of its own.
// A prefix shared by reference: the blocks counted once more, not copied; each cache gives its
// references back; what cannot be shared is refused with the reason.
TEST(BlockPool, SharedPrefixBlocksAreCountedNotCopied) {
  BlockPool pool(KVCacheShape{2, 1, 4, 8 * 4, 4, DType::kF32}), other(pool.shape());
  auto a = std::make_unique<KVCache>(pool, 32);
  const std::vector<float> k = test::RandomVector(11 * 4, 1), v = test::RandomVector(11 * 4, 2);
  for (int64_t l = 0; l < 2; ++l) {
    a->AssignBlocks(l, 0, 11);
    a->Write(l, 0, 11, k.data(), v.data());
  }
  a->SetSize(11);  // blocks 0-2, the last partial
  KVCache b(pool, 32);
  b.SharePrefix(*a, 8);
  EXPECT_EQ(b.size(), 8);
  EXPECT_EQ(pool.FreeSlots(0), 5);  // nothing taken
  for (int64_t l = 0; l < 2; ++l)
    for (int64_t blk = 0; blk < 2; ++blk) {
      EXPECT_EQ(b.SlotOf(l, blk), a->SlotOf(l, blk));
      EXPECT_EQ(pool.References(l, b.SlotOf(l, blk)), 2);
    }
  EXPECT_EQ(b.SlotOf(0, 2), -1);  // the partial block is a's alone
  b.AssignBlocks(0, 8, 1);
  EXPECT_NE(b.SlotOf(0, 2), a->SlotOf(0, 2));
  for (const auto& [tokens, want] : std::vector<std::pair<int64_t, std::string>>{
           {6, "whole blocks of 4"}, {12, "at most the 11"}}) {
    KVCache c(pool, 32);
    try {
      c.SharePrefix(*a, tokens);
      FAIL() << tokens;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  }
  KVCache elsewhere(other, 32);
  EXPECT_THROW(elsewhere.SharePrefix(*a, 4), Error);  // another pool
  EXPECT_THROW(b.SharePrefix(*a, 4), Error);          // not empty
  a.reset();  // its own blocks back, the shared two stay b's
  EXPECT_EQ(pool.FreeSlots(0), 8 - 3);
  EXPECT_EQ(pool.References(0, b.SlotOf(0, 0)), 1);
  EXPECT_EQ(b.Layer(1).KAt(0, 5, 2), k[5 * 4 + 2]);  // the keys are still there
  b.Clear();
  EXPECT_EQ(pool.FreeSlots(0), 8);
  EXPECT_EQ(pool.FreeSlots(1), 8);
}

// Truncation (a sequence going on from an earlier point of itself) gives up every block past the
// one that holds the last kept token: a pool's back to the pool (a shared one stays its other
// holder's), a ring's out of the ring, so that no two blocks ever map to one ring slot when the
// sequence grows again.
TEST(BlockPool, TruncatedCachesGiveUpTheirLaterBlocks) {
  const int64_t B = 4;
  BlockPool pool(KVCacheShape{2, 1, 4, 8 * B, B, DType::kF32});
  KVCache a(pool, 8 * B), b(pool, 8 * B);
  const std::vector<float> k = test::RandomVector(24 * 4, 1), v = test::RandomVector(24 * 4, 2);
  for (int64_t l = 0; l < 2; ++l) a.Write(l, 0, 21, k.data(), v.data());
  a.SetSize(21);  // blocks 0-5
  b.SharePrefix(a, 2 * B);
  EXPECT_EQ(pool.FreeSlots(0), 2);
  a.Truncate(B + 1);  // keeps blocks 0 and 1 (its token 4)
  EXPECT_EQ(a.size(), B + 1);
  EXPECT_EQ(pool.FreeSlots(0), 6);
  for (int64_t l = 0; l < 2; ++l) {
    EXPECT_GE(a.SlotOf(l, 1), 0);
    for (int64_t blk = 2; blk < 8; ++blk) EXPECT_EQ(a.SlotOf(l, blk), -1) << l << " " << blk;
    EXPECT_EQ(a.Layer(l).KAt(0, B, 3), k[B * 4 + 3]);
  }
  a.Truncate(0);  // block 1 stays b's
  EXPECT_EQ(pool.FreeSlots(0), 6);
  EXPECT_EQ(pool.References(0, b.SlotOf(0, 1)), 1);
  EXPECT_EQ(b.Layer(0).VAt(0, 2 * B - 1, 1), v[(2 * B - 1) * 4 + 1]);
  try {
    b.Truncate(2 * B + 1);
    FAIL() << "truncated past its size";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncating to 9 tokens, the cache holds 8"),
              std::string::npos)
        << e.what();
  }

  // A ring layer (1 pinned block, a ring of 2) beside a whole one.
  KVCacheShape rs{2, 1, 4, 8 * B, B, DType::kF32};
  rs.ring_layer = {1, 0}, rs.pinned_blocks = 1, rs.ring_blocks = 2;
  KVCache r(rs);
  for (int64_t l = 0; l < 2; ++l)
    for (int64_t blk = 0; blk < 6; ++blk)
      r.Write(l, blk * B, B, k.data() + blk * B * 4, v.data() + blk * B * 4);
  r.SetSize(6 * B);  // ring: block 0 pinned, blocks 4 and 5 in slots 2 and 1
  EXPECT_EQ(r.SlotOf(0, 5), 1);
  EXPECT_EQ(r.SlotOf(0, 1), -1);
  r.Truncate(2 * B);
  EXPECT_EQ(r.SlotOf(0, 4), -1);
  EXPECT_EQ(r.SlotOf(0, 5), -1);
  EXPECT_GE(r.SlotOf(1, 1), 0);
  EXPECT_EQ(r.SlotOf(1, 2), -1);
  // Growing again: blocks 1, 2 and 3 (block 3 evicts block 1); each slot is one block's.
  for (int64_t blk = 1; blk < 4; ++blk) r.AssignBlocks(0, blk * B, B);
  std::vector<int> holders(3, 0);
  for (int64_t blk = 0; blk < 8; ++blk)
    if (r.SlotOf(0, blk) >= 0) ++holders[static_cast<size_t>(r.SlotOf(0, blk))];
  EXPECT_EQ(holders, (std::vector<int>{1, 1, 1}));
  EXPECT_EQ(r.SlotOf(0, 3), 1);
  EXPECT_EQ(r.SlotOf(0, 2), 2);
}

// A cache swapped out (the Engine's preemption) gives its blocks back, those it shared staying
// with the other cache, and swapped in reads what it read before from slots of its own, whatever
// was written into its old slots meanwhile; int8's scales come back with their data.
TEST(BlockPool, SwappedOutBlocksComeBackIntoOtherSlots) {
  for (const DType dt : {DType::kF32, DType::kI8}) {
    const int64_t L = 2, Hk = 2, D = 8, B = 4, n = 11;  // 3 blocks, the last partial
    BlockPool pool(KVCacheShape{L, Hk, D, 8 * B, B, dt});
    auto a = std::make_unique<KVCache>(pool, 32);
    const auto k = test::RandomVector(n * Hk * D, 1), v = test::RandomVector(n * Hk * D, 2);
    for (int64_t l = 0; l < L; ++l) a->Write(l, 0, n, k.data(), v.data());
    a->SetSize(n);
    const auto read = [&](const KVCache& c) {
      std::vector<float> r;
      for (int64_t l = 0; l < L; ++l)
        for (int64_t h = 0; h < Hk; ++h)
          for (int64_t t = 0; t < n; ++t)
            for (int64_t d = 0; d < D; ++d)
              r.push_back(c.Layer(l).KAt(h, t, d)), r.push_back(c.Layer(l).VAt(h, t, d));
      return r;
    };
    const std::vector<float> before = read(*a);
    KVCache b(pool, 32);
    b.SharePrefix(*a, 8);
    SwappedBlocks sw;
    a->SwapOut(&sw);
    EXPECT_TRUE(a->swapped());
    EXPECT_EQ(sw.count(), 3 * L);
    EXPECT_EQ(a->size(), n);
    EXPECT_EQ(pool.FreeSlots(0), 8 - 2);  // the shared two stay, now b's alone
    EXPECT_EQ(pool.References(0, b.SlotOf(0, 0)), 1);
    EXPECT_THROW(a->AssignBlocks(0, n, 1), Error);  // not written while out
    // Another cache takes every free slot (a's old one included) and writes over them.
    KVCache c(pool, 32);
    const auto junk = test::RandomVector(24 * Hk * D, 3);
    for (int64_t l = 0; l < L; ++l) c.Write(l, 0, 24, junk.data(), junk.data());
    EXPECT_EQ(pool.FreeSlots(0), 0);
    try {
      a->SwapIn(&sw);
      FAIL() << "no free slot";
    } catch (const Error& e) {
      EXPECT_NE(
          std::string(e.what()).find("swapping in 3 blocks of layer 0 with 0 of the pool's 8"),
          std::string::npos)
          << e.what();
    }
    EXPECT_EQ(sw.count(), 3 * L);  // (nothing taken)
    c.Clear();
    b.AssignBlocks(0, 8, 4);  // b's next block takes slot 0's neighbour first: a comes back moved
    a->SwapIn(&sw);
    EXPECT_FALSE(a->swapped());
    EXPECT_EQ(sw.count(), 0);
    EXPECT_EQ(read(*a), before) << KVTypeName(dt);
    EXPECT_EQ(pool.FreeSlots(0), 8 - 2 - 1 - 3);
    EXPECT_NE(a->SlotOf(0, 0), b.SlotOf(0, 0));  // its own copy of what it shared
    // The buffer stays for the next swap, which copies into it (nothing allocated), and a swap
    // of more blocks than it holds takes a larger one.
    const uint8_t* buffer = sw.data.get();
    const size_t capacity = sw.capacity;
    EXPECT_GT(capacity, 0u);
    EXPECT_EQ(sw.bytes, 0u);
    a->SwapOut(&sw);
    EXPECT_EQ(sw.data.get(), buffer);
    EXPECT_EQ(sw.bytes, capacity);
    a->SwapIn(&sw);
    EXPECT_EQ(read(*a), before) << KVTypeName(dt);
    for (int64_t l = 0; l < L; ++l) a->AssignBlocks(l, n, 2);  // a fourth block
    a->SwapOut(&sw);
    EXPECT_EQ(sw.bytes, capacity / 3 * 4);
    EXPECT_GE(sw.capacity, sw.bytes);
    a->SwapIn(&sw);
    EXPECT_EQ(read(*a), before) << KVTypeName(dt);
    a.reset();
    EXPECT_EQ(pool.FreeSlots(0), 8 - 3);
  }
}

// A KVMemory in host memory whose queued copies take place only at FinishCopies, as a GPU
// stream's complete only once waited for; its page-locked buffers (AllocateHost) are counted.
class DeferredMemory final : public KVMemory {
 public:
  std::string Name() const override { return "deferred test memory"; }
  size_t AvailableBytes() const override { return size_t{1} << 30; }
  void* Allocate(size_t bytes) override { return std::calloc(bytes, 1); }
  void Deallocate(void* p) override { std::free(p); }
  void CopyFromHost(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
  }
  void CopyToHost(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
  }
  void QueueToHost(void* dst, const void* src, size_t bytes) override {
    queued_.push_back({dst, src, bytes});
  }
  void QueueFromHost(void* dst, const void* src, size_t bytes) override {
    queued_.push_back({dst, src, bytes});
  }
  void FinishCopies() override {
    for (const Copy& c : queued_) std::memcpy(c.dst, c.src, c.bytes);
    queued_.clear();
    ++finished;
  }
  void* AllocateHost(size_t bytes, HostFree* free_fn) override {
    ++host_buffers;
    *free_fn = &std::free;
    return std::malloc(bytes);
  }
  int finished = 0, host_buffers = 0;

 private:
  struct Copy {
    void* dst;
    const void* src;
    size_t bytes;
  };
  std::vector<Copy> queued_;
};

// A pool in another memory swaps through that memory's host buffer, its copies queued and
// waited for once each way: the buffer holds the blocks when SwapOut returns, and the cache
// reads as before once SwapIn returns, whatever was written into its old slots meanwhile.
TEST(BlockPool, SwapsOfAnotherMemoryWaitForTheirQueuedCopies) {
  DeferredMemory mem;
  const int64_t L = 2, Hk = 2, D = 8, B = 4, n = 12;  // 3 blocks a layer
  BlockPool pool(KVCacheShape{L, Hk, D, 8 * B, B, DType::kF32}, 0, &mem);
  KVCache a(pool, 32);
  const size_t bb = pool.BlockBytes();
  std::vector<uint8_t> want;  // a's blocks: layer, block, K then V
  for (int64_t l = 0; l < L; ++l) {
    a.AssignBlocks(l, 0, n);
    for (int64_t b = 0; b < n / B; ++b)
      for (bool v : {false, true}) {
        uint8_t* p = pool.BlockData(l, v, a.SlotOf(l, b));
        for (size_t i = 0; i < bb; ++i) p[i] = static_cast<uint8_t>(7 * i + 13 * b + 29 * l + v);
        want.insert(want.end(), p, p + bb);
      }
  }
  a.SetSize(n);
  const auto read = [&] {
    std::vector<uint8_t> got;
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < n / B; ++b)
        for (bool v : {false, true}) {
          const uint8_t* p = pool.BlockData(l, v, a.SlotOf(l, b));
          got.insert(got.end(), p, p + bb);
        }
    return got;
  };
  ASSERT_EQ(read(), want);
  SwappedBlocks sw;
  a.SwapOut(&sw);
  EXPECT_EQ(mem.host_buffers, 1);
  EXPECT_EQ(mem.finished, 1);
  std::vector<uint8_t> out;  // the buffer's layer regions: K of its blocks, then V
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < n / B; ++b)
      for (int v = 0; v < 2; ++v) {
        const uint8_t* p = sw.data.get() + l * 2 * (n / B) * bb + (v * (n / B) + b) * bb;
        out.insert(out.end(), p, p + bb);
      }
  EXPECT_EQ(out, want);
  KVCache c(pool, 32);  // takes every slot, a's old ones included, and scribbles over them
  for (int64_t l = 0; l < L; ++l) {
    c.AssignBlocks(l, 0, 32);
    for (int64_t b = 0; b < 8; ++b)
      for (bool v : {false, true}) std::memset(pool.BlockData(l, v, c.SlotOf(l, b)), 0xee, bb);
  }
  c.Clear();
  a.SwapIn(&sw);
  EXPECT_EQ(mem.finished, 2);
  EXPECT_EQ(read(), want);
  a.SwapOut(&sw);  // (into the kept buffer)
  EXPECT_EQ(mem.host_buffers, 1);
}

TEST(BlockPool, AttentionThroughASharedPoolEqualsAPrivateCache) {
  ThreadingContext tc(2);
  auto cpu = MakeCpuBackend(tc, false);
  const int64_t Hk = 2, H = 8, D = 16, B = 4, n = 37;
  const auto k = test::RandomVector(n * Hk * D, 3), v = test::RandomVector(n * Hk * D, 4);
  const auto other = test::RandomVector(n * Hk * D, 5);
  const auto q = test::RandomVector(H * D, 6);
  KVCache own(KVCacheShape{1, Hk, D, n, B, DType::kF32});
  own.Write(0, 0, n, k.data(), v.data());
  own.SetSize(n);
  BlockPool pool(KVCacheShape{1, Hk, D, 3 * n, B, DType::kF32});
  KVCache noise(pool, n), seq(pool, n);
  for (int64_t t = 0; t < n; ++t) {  // another sequence's blocks between this one's
    noise.Write(0, t, 1, other.data() + t * Hk * D, other.data() + t * Hk * D);
    seq.Write(0, t, 1, k.data() + t * Hk * D, v.data() + t * Hk * D);
  }
  seq.SetSize(n);
  EXPECT_NE(seq.SlotOf(0, 1), own.SlotOf(0, 1));
  AttnArgs a;
  a.T = 1, a.pos0 = n - 1, a.heads = H, a.kv_heads = Hk, a.head_dim = D, a.scale = 0.25f;
  std::vector<float> want(H * D), got(H * D), lw(H), lg(H);
  cpu->Attention(q.data(), own.Layer(0), a, nullptr, want.data(), lw.data());
  cpu->Attention(q.data(), seq.Layer(0), a, nullptr, got.data(), lg.data());
  EXPECT_EQ(got, want);
  EXPECT_EQ(lg, lw);
}

}  // namespace
}  // namespace needle
