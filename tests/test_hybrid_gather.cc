// The GPU's share of the hybrid engine's Context blocks (SparseConfig::gpu_share): the gather of
// blocks from page-locked host memory, and their softmax sums (BlockStats) against the CPU's
// AttendBlocks. The ring's extra slots are tested beside the ring (test_hybrid.cc); the fixtures
// there run the whole engine with shares 0, 25, 50 and 100.
//
// Tolerances: the gather is a copy (bytes equal). BlockStats and AttendBlocks compute the same
// f32 dot products of the same key values in another order: 2^-24 relative per term over
// head_dim terms of magnitude up to |q||k|, about 1e-6 of a score; a block's log-sum-exp
// m + log(l) is compared within 1e-5 of its magnitude (a key left out or read from the wrong
// block moves it by far more).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/cpu/amx.h"
#include "engine/cpu/ops.h"
#include "kvcache/kv_cache.h"
#include "tests/backend_test_util.h"
#include "tests/gpu_test_util.h"
#include "tests/test_util.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/context_gather.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/kv_rows.h"
#include "engine/cuda/pinned_host.h"
#include "engine/cuda/resident_blocks.h"
#endif

namespace needle {
namespace {

#ifdef NEEDLE_HAVE_CUDA
// Blocks gathered from a page-locked host cache equal the host's bytes, and their softmax sums
// on the GPU equal AttendBlocks' for the same blocks.
TEST(HybridGather, GatherAndBlockStatsEqualHost) {
  NEEDLE_REQUIRE_GPU(gpu);
  if (!cuda::HostPointersUsableOnGpu()) GTEST_SKIP() << "host pointers not usable on this GPU";
  amx::SetMode(amx::Mode::kOff);  // the Highway fold: f32 products of the stored values
  ThreadingContext tc(2);
  cudaStream_t stream = CudaBackendStream(*gpu);
  for (DType kvt : {DType::kF32, DType::kBF16}) {
    for (int64_t G : {1, 4, 7, 20}) {  // (20: the kernel for groups beyond 16 heads)
      const int64_t Hk = 3, D = 64, B = 16, n_tok = 40 * B;
      KVCache cache(KVCacheShape(1, Hk, D, n_tok, B, kvt));
      const std::vector<float> k = test::RandomVector(n_tok * Hk * D, 11, 2.f),
                               v = test::RandomVector(n_tok * Hk * D, 12);
      cache.Write(0, 0, n_tok, k.data(), v.data());
      cache.SetSize(n_tok);
      const size_t bb = cache.BlockBytes(), hb = bb / static_cast<size_t>(Hk);
      const size_t arena = bb * static_cast<size_t>(cache.shape().TotalSlots());
      cuda::ArenaPinning pk, pv;
      pk.Reset(cache.BlockData(0, false, 0), arena);
      pv.Reset(cache.BlockData(0, true, 0), arena);
      ASSERT_TRUE(pk.Pin(cache.BlockData(0, false, 0), arena));
      ASSERT_TRUE(pv.Pin(cache.BlockData(0, true, 0), arena));
      // Head h attends blocks[h]; the gather lays them out [j][h] as the hybrid's extra slots.
      const std::vector<std::vector<int32_t>> blocks = {
          {3, 9, 17, 38}, {0, 1, 2, 30}, {39, 5, 7, 8}};
      const int64_t n = 4;
      std::vector<int32_t> src, to;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t h = 0; h < Hk; ++h) {
          src.push_back(cache.SlotOf(0, blocks[h][j]) * static_cast<int32_t>(Hk) +
                        static_cast<int32_t>(h));
          to.push_back(static_cast<int32_t>(j * Hk + h));
        }
      const size_t bytes = hb * static_cast<size_t>(n * Hk);
      float* d = gpu->Alloc(2 * bytes / 4 + static_cast<size_t>(Hk * G * D + Hk * n * G * 2));
      auto* dk = reinterpret_cast<uint8_t*>(d);
      cuda::PinnedFloats list_pin;  // (the kernel reads the lists from pinned memory)
      const auto gather = [&](const std::vector<int32_t>& from, const std::vector<int32_t>& to) {
        auto* p = reinterpret_cast<int32_t*>(list_pin.Get(2 * from.size()));
        std::copy(from.begin(), from.end(), p);
        std::copy(to.begin(), to.end(), p + from.size());
        cuda::GatherBlocks(cache.BlockData(0, false, 0), cache.BlockData(0, true, 0), p,
                           p + from.size(), static_cast<int64_t>(from.size()), hb, dk, dk + bytes,
                           stream);
        NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream));
      };
      // Item i of the slots holds host head block `holds[i]`.
      const auto check = [&](const std::vector<int32_t>& holds, const char* what) {
        std::vector<uint8_t> got(2 * bytes);
        gpu->ToHost(d, 2 * bytes / 4, reinterpret_cast<float*>(got.data()));
        for (size_t i = 0; i < holds.size(); ++i)
          for (int kv = 0; kv < 2; ++kv) {
            const uint8_t* want =
                cache.BlockData(0, kv == 1, 0) + static_cast<size_t>(holds[i]) * hb;
            ASSERT_EQ(std::memcmp(got.data() + static_cast<size_t>(kv) * bytes + i * hb, want, hb),
                      0)
                << what << " item " << i << (kv == 1 ? " V" : " K");
          }
      };
      NEEDLE_CUDA_CHECK(cudaMemsetAsync(dk, 0, 2 * bytes, stream));
      gather(src, to);
      check(src, "gather");
      // Softmax sums.
      AttnArgs a;
      a.T = 1, a.pos0 = n_tok - 1, a.heads = Hk * G, a.kv_heads = Hk, a.head_dim = D;
      a.scale = 0.125f;
      const std::vector<float> q = test::RandomVector(a.heads * D, 13, 2.f);
      float* dq = d + 2 * bytes / 4;
      float* dst = dq + Hk * G * D;
      gpu->FromHost(q.data(), q.size(), dq);
      cuda::BlockStats(dq, dk, kvt, n, Hk, G, B, D, a.scale, dst, stream);
      std::vector<float> st(static_cast<size_t>(Hk * n * G * 2));
      gpu->ToHost(dst, st.size(), st.data());
      // Items kept, two read from the host into slots that held others: what ResidentBlocks asks
      // of a later step.
      std::vector<int32_t> holds = src;
      const int32_t host_a = cache.SlotOf(0, 21) * static_cast<int32_t>(Hk) + 1,
                    host_b = cache.SlotOf(0, 22) * static_cast<int32_t>(Hk) + 2;
      gather({host_b, host_a},
             {static_cast<int32_t>(0 * Hk + 2), static_cast<int32_t>(1 * Hk + 1)});
      holds[static_cast<size_t>(0 * Hk + 2)] = host_b;
      holds[static_cast<size_t>(1 * Hk + 1)] = host_a;
      check(holds, "kept and read");
      ASSERT_FALSE(HasFailure());
      // A block table's entries written by the same kernel (the hybrid's per-head view): rows of
      // `width` at a stride, with copies and alone; nothing else of the table changes.
      {
        const int64_t stride = 7, width = 3;
        auto* table = reinterpret_cast<int32_t*>(gpu->Alloc(static_cast<size_t>(Hk * stride)));
        NEEDLE_CUDA_CHECK(cudaMemsetAsync(table, 0xff, Hk * stride * 4, stream));
        for (const bool with_copies : {true, false}) {
          auto* p = reinterpret_cast<int32_t*>(list_pin.Get(4 + Hk * width));
          p[0] = host_a, p[1] = static_cast<int32_t>(2 * Hk);  // (host_a into item 2 * Hk)
          for (int64_t i = 0; i < Hk * width; ++i) p[2 + i] = static_cast<int32_t>(100 * i + 7);
          cuda::TableEntries e;
          e.values = p + 2, e.table = table + 1, e.rows = Hk, e.width = width, e.stride = stride;
          cuda::GatherBlocks(cache.BlockData(0, false, 0), cache.BlockData(0, true, 0), p, p + 1,
                             with_copies ? 1 : 0, hb, dk, dk + bytes, stream, e);
          NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream));
          std::vector<int32_t> got(static_cast<size_t>(Hk * stride));
          gpu->ToHost(reinterpret_cast<float*>(table), got.size(),
                      reinterpret_cast<float*>(got.data()));
          for (int64_t h = 0; h < Hk; ++h)
            for (int64_t i = 0; i < stride; ++i)
              EXPECT_EQ(got[static_cast<size_t>(h * stride + i)],
                        i >= 1 && i <= width ? 100 * (h * width + i - 1) + 7 : -1)
                  << "head " << h << " entry " << i << (with_copies ? " with copies" : " alone");
          if (with_copies) {
            holds[static_cast<size_t>(2 * Hk)] = host_a;
            check(holds, "copied beside the entries");
          }
        }
        // Scattered (TableEntries::at: the device plan's block-to-slot map): each value at its
        // own index, the rest untouched.
        NEEDLE_CUDA_CHECK(cudaMemsetAsync(table, 0xff, Hk * stride * 4, stream));
        auto* p = reinterpret_cast<int32_t*>(list_pin.Get(2 + 8));
        const int32_t at[4] = {5, 0, static_cast<int32_t>(Hk * stride - 1), 9};
        for (int i = 0; i < 4; ++i) p[2 + i] = 40 + i, p[6 + i] = at[i];
        cuda::TableEntries e;
        e.values = p + 2, e.at = p + 6, e.table = table, e.rows = 1, e.width = 4;
        cuda::GatherBlocks(cache.BlockData(0, false, 0), cache.BlockData(0, true, 0), p, p + 1, 0,
                           hb, dk, dk + bytes, stream, e);
        NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream));
        std::vector<int32_t> got(static_cast<size_t>(Hk * stride), -1);
        gpu->ToHost(reinterpret_cast<float*>(table), got.size(),
                    reinterpret_cast<float*>(got.data()));
        std::vector<int32_t> want_t(got.size(), -1);
        for (int i = 0; i < 4; ++i) want_t[static_cast<size_t>(at[i])] = 40 + i;
        EXPECT_EQ(got, want_t) << "scattered entries";
        gpu->Free(reinterpret_cast<float*>(table));
        ASSERT_FALSE(HasFailure());
      }
      gpu->Free(d);
      std::vector<float> out(static_cast<size_t>(a.heads * D)), lse(static_cast<size_t>(a.heads)),
          want;
      // The CPU's sums of each block alone (AttendBlocks' m is a running maximum: compared
      // through the block's own log-sum-exp m + log(l)).
      for (int64_t h = 0; h < Hk; ++h) {
        for (int64_t j = 0; j < n; ++j) {
          std::vector<std::vector<int32_t>> single(static_cast<size_t>(Hk));
          single[h] = {blocks[h][j]};
          fast::AttendBlocks(q.data(), cache.Layer(0), a, single, out.data(), lse.data(), &want,
                             tc);
          for (int64_t g = 0; g < G; ++g) {
            const float* gs = st.data() + ((h * n + j) * G + g) * 2;
            const double got_lse = gs[0] + std::log(static_cast<double>(gs[1]));
            const double want_lse = want[2 * g] + std::log(static_cast<double>(want[2 * g + 1]));
            ASSERT_NEAR(got_lse, want_lse, 1e-5 * (1 + std::fabs(want_lse)))
                << KVTypeName(kvt) << " G " << G << " head " << h << " block " << blocks[h][j];
          }
        }
      }
    }
  }
  amx::SetMode(amx::Mode::kFromEnv);
}

// A step's rows of several layers copied at once (QueueRowsToPinned: one gather, one copy) are
// the bytes the one-row copies give, over more rows than one gather takes (kMaxRowCopies).
TEST(HybridGather, RowsAtOnceEqualRowByRow) {
  NEEDLE_REQUIRE_GPU(gpu);
  cudaStream_t stream = CudaBackendStream(*gpu);
  for (DType kvt : {DType::kBF16, DType::kF32}) {
    const int64_t L = 3, Hk = 2, D = 64, B = 16, n_tok = 200;
    KVCache dev(KVCacheShape{L, Hk, D, n_tok, B, kvt}, 0, gpu->kv_memory());
    for (int64_t l = 0; l < L; ++l) {
      BackendBuffer k = test::Upload(*gpu, test::RandomVector(n_tok * Hk * D, 31 + l)),
                    v = test::Upload(*gpu, test::RandomVector(n_tok * Hk * D, 41 + l));
      gpu->KVWrite(dev, l, 0, n_tok, k.get(), v.get());
    }
    dev.SetSize(n_tok);
    std::vector<std::pair<int64_t, int64_t>> rows;
    for (int64_t i = 0; i < 150; ++i) rows.emplace_back(i % L, (i * 37) % n_tok);
    const size_t rb = KVRowBytes(dev.shape());
    cuda::PinnedFloats all_pin, one_pin;
    auto* all = reinterpret_cast<uint8_t*>(all_pin.Get(rows.size() * rb / 4));
    auto* one = reinterpret_cast<uint8_t*>(one_pin.Get(rows.size() * rb / 4));
    float* staging = gpu->Alloc(rows.size() * rb / 4);
    QueueRowsToPinned(dev, rows, reinterpret_cast<uint8_t*>(staging), all, stream);
    for (size_t i = 0; i < rows.size(); ++i)
      QueueRowToPinned(dev, rows[i].first, rows[i].second, one + i * rb, stream);
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (size_t i = 0; i < rows.size(); ++i)
      ASSERT_EQ(std::memcmp(all + i * rb, one + i * rb, rb), 0)
          << KVTypeName(kvt) << " row " << i << " (layer " << rows[i].first << ", position "
          << rows[i].second << ")";
    gpu->Free(staging);
  }
}

// ResidentBlocks (no GPU needed): a step's copies turn the slots into the blocks it attends;
// blocks the GPU holds in any slot are never read from the host again; retained blocks go
// first; a new block takes an empty slot, else the one attended least recently.
TEST(ResidentBlocks, KeepsWhatStaysSelected) {
  ResidentBlocks r(2, 2, 3);
  std::vector<ResidentBlocks::Copy> cp;
  r.Place(1, {{5, 7, 9}, {1, 2, 3}}, {{9}, {}}, 2, &cp);
  ASSERT_EQ(cp.size(), 4u);  // everything from the host; retained 9 first, into empty slots
  EXPECT_EQ(r.ViewBlock(1, 0, 0), 9);
  EXPECT_EQ(r.ViewBlock(1, 0, 1), 5);
  EXPECT_EQ(r.ViewSlot(1, 0, 0), 0);
  EXPECT_EQ(r.ViewSlot(1, 0, 1), 1);
  EXPECT_EQ(r.ViewBlock(1, 1, 0), 1);
  EXPECT_EQ(r.ViewBlock(1, 1, 1), 2);
  EXPECT_EQ(r.At(0, 0, 0), -1);  // another layer
  r.Place(1, {{7, 9, 11}, {2, 3, 4}}, {}, 2, &cp);
  ASSERT_EQ(cp.size(), 2u);  // 9 and 2 stay where they are; 7 and 3 take the empty slot 2
  EXPECT_EQ(r.ViewBlock(1, 0, 0), 9);
  EXPECT_EQ(r.ViewSlot(1, 0, 0), 0);
  EXPECT_EQ(r.ViewBlock(1, 0, 1), 7);
  EXPECT_EQ(r.ViewSlot(1, 0, 1), 2);
  EXPECT_EQ(r.At(1, 0, 1), 5);  // not attended, still held
  EXPECT_EQ(r.ViewBlock(1, 1, 0), 2);
  EXPECT_EQ(r.ViewBlock(1, 1, 1), 3);
  // 5 and 1, attended two steps ago, are still there: no copy. The new 11 and 4 take the slot
  // attended least recently among the others (both were attended at the last step: the first).
  r.Place(1, {{5, 11, 12}, {1, 4, 6}}, {}, 2, &cp);
  ASSERT_EQ(cp.size(), 2u);
  EXPECT_EQ(r.ViewSlot(1, 0, 0), 1);
  EXPECT_EQ(cp[0].block, 11);
  EXPECT_EQ(cp[0].head, 0);
  EXPECT_EQ(cp[0].to, 0);
  EXPECT_EQ(cp[1].block, 4);
  EXPECT_EQ(cp[1].head, 1);
  EXPECT_EQ(cp[1].to, 1);
  // More held blocks than the share: the retained one first, no copy.
  r.Place(1, {{5, 7, 11}, {3, 4, 6}}, {{11}, {}}, 1, &cp);
  EXPECT_TRUE(cp.empty());
  EXPECT_EQ(r.ViewBlock(1, 0, 0), 11);
  EXPECT_EQ(r.ViewBlock(1, 1, 0), 3);
  // Head 0's slot 2 (7) was last attended three steps ago, slot 1 (5) two, slot 0 (11) one:
  // new blocks take them in that order.
  r.Place(1, {{20, 21, 22}, {3, 4, 6}}, {}, 3, &cp);
  ASSERT_EQ(cp.size(), 4u);
  EXPECT_EQ(cp[0].block, 20);
  EXPECT_EQ(cp[0].to, 2);
  EXPECT_EQ(cp[1].block, 21);
  EXPECT_EQ(cp[1].to, 1);
  EXPECT_EQ(cp[2].block, 22);
  EXPECT_EQ(cp[2].to, 0);
  EXPECT_EQ(cp[3].block, 6);  // head 1: 3 and 4 held
  // Up to n_max: as many as every head holds. Head 0 holds 20, 21, 22, head 1 3, 4, 6.
  EXPECT_EQ(r.Place(1, {{20, 21, 40}, {3, 4, 6}}, {}, 1, &cp, 3), 2);  // head 0 holds two
  EXPECT_TRUE(cp.empty());
  EXPECT_EQ(r.Place(1, {{20, 21, 22}, {3, 4, 6}}, {}, 1, &cp, 2), 2);  // n_max
  EXPECT_TRUE(cp.empty());
  EXPECT_EQ(r.Place(1, {{20, 21, 22}, {3, 4, 6}}, {}, 1, &cp, 5), 3);  // the slots, the lists
  EXPECT_TRUE(cp.empty());
  EXPECT_EQ(r.Place(1, {{20, 41, 42}, {3, 4, 6}}, {}, 2, &cp, 3), 2);  // n_g: one copy
  EXPECT_EQ(cp.size(), 1u);
  r.Clear();
  EXPECT_EQ(r.Place(1, {{11, 20, 21}, {4, 30, 31}}, {}, 1, &cp, 3), 1);
  EXPECT_EQ(cp.size(), 2u);
  // take_rest: every block where no head misses more than it. Head 0 holds 11, head 1 4.
  EXPECT_EQ(r.Place(1, {{11, 20, 21}, {4, 30, 31}}, {}, 1, &cp, 3, 1), 1);  // each misses two
  EXPECT_TRUE(cp.empty());
  EXPECT_EQ(r.Place(1, {{11, 20, 22}, {4, 30, 32}}, {}, 1, &cp, 2, 2), 1);  // n_max 2 < 3
  EXPECT_EQ(r.Place(1, {{11, 20, 23}, {4, 30}}, {}, 1, &cp, 3, 2), 1);      // unequal lists
  EXPECT_EQ(r.Place(1, {{11, 20, 21}, {4, 30, 31}}, {}, 1, &cp, 3, 2), 3);
  ASSERT_EQ(cp.size(), 4u);  // 20, 21 and 30, 31
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t j = 0; j < 3; ++j) EXPECT_GE(r.ViewSlot(1, h, j), 0);
  EXPECT_EQ(r.ViewBlock(1, 1, 0), 4);
}

TEST(ResidentBlocks, RandomStepsKeepTheSlotsTrue) {
  const int64_t Hk = 3, slots = 9;
  ResidentBlocks r(1, Hk, slots);
  std::vector<std::vector<int32_t>> mem(Hk, std::vector<int32_t>(slots, -1));  // what copies wrote
  std::vector<std::vector<int>> last(Hk, std::vector<int>(slots, -1));         // step last attended
  std::mt19937 rng(7);
  std::vector<std::vector<int32_t>> prev(Hk);
  std::vector<ResidentBlocks::Copy> cp;
  for (int step = 0; step < 600; ++step) {
    if (step == 300) {
      r.Clear();
      mem.assign(Hk, std::vector<int32_t>(slots, -1));
      last.assign(Hk, std::vector<int>(slots, -1));
    }
    const int64_t len = 6 + static_cast<int64_t>(rng() % 5);
    const int64_t n_min = static_cast<int64_t>(rng() % 7);
    // (Half the steps may take more than n_min where every head holds more of its blocks.)
    const int64_t n_max = step % 2 == 0 ? 0 : n_min + static_cast<int64_t>(rng() % 6);
    // (A third of them take every selected block where each head misses at most `take`.)
    const int64_t take = step % 3 == 0 ? static_cast<int64_t>(rng() % 5) : 0;
    std::vector<std::vector<int32_t>> sel(Hk), ret(Hk);
    for (int64_t h = 0; h < Hk; ++h) {
      std::set<int32_t> s;
      for (int32_t b : prev[h])  // much the same blocks as the step before
        if (rng() % 4 != 0 && static_cast<int64_t>(s.size()) < len) s.insert(b);
      // (From step 150 half the new ones are block 300 or later: the slots' index of blocks
      // grows past its first width.)
      while (static_cast<int64_t>(s.size()) < len)
        s.insert(static_cast<int32_t>(rng() % 40) + (step >= 150 && rng() % 2 == 0 ? 300 : 0));
      sel[h].assign(s.begin(), s.end());
      std::shuffle(sel[h].begin(), sel[h].end(), rng);
      for (int32_t b : sel[h])
        if (rng() % 5 == 0) ret[h].push_back(b);
    }
    const std::vector<std::vector<int32_t>> before = mem;
    int64_t fewest = slots;  // the fewest selected blocks any head holds
    for (int64_t h = 0; h < Hk; ++h) {
      int64_t hits = 0;
      for (int32_t b : sel[h]) hits += std::count(before[h].begin(), before[h].end(), b);
      fewest = std::min(fewest, hits);
    }
    const int64_t n_g = r.Place(0, sel, ret, n_min, &cp, n_max, take);
    const int64_t most = std::min(std::max(n_max, n_min), std::min(slots, len));
    int64_t want = n_min == 0 ? 0 : std::max(n_min, std::min(fewest, most));
    const bool take_all = n_min > 0 && take > 0 && most == len && len - fewest <= take;
    if (take_all) want = len;
    ASSERT_EQ(n_g, want) << "step " << step;
    if (n_g > n_min && !take_all) {
      ASSERT_TRUE(cp.empty()) << "more than the share, but a copy";
    }
    if (take_all) {
      ASSERT_LE(static_cast<int64_t>(cp.size()), Hk * take) << "step " << step;
    }
    std::set<std::pair<int32_t, int32_t>> written;
    std::vector<int64_t> from_host(Hk, 0);
    for (const auto& c : cp) {
      ASSERT_TRUE(c.to >= 0 && c.to < slots);
      ASSERT_TRUE(written.insert({c.head, c.to}).second) << "slot written twice";
      ASSERT_EQ(c.evicted, mem[c.head][c.to]) << "step " << step;
      mem[c.head][c.to] = c.block;
      ++from_host[c.head];
    }
    for (int64_t h = 0; h < Hk; ++h) {
      const std::set<int32_t> held(before[h].begin(), before[h].end());
      std::set<int32_t> on_gpu, view_slots;
      int64_t ret_held = 0, ret_attended = 0;
      for (int32_t b : ret[h]) ret_held += held.count(b);
      for (int64_t j = 0; j < n_g; ++j) {
        const int32_t s = r.ViewSlot(0, h, j), b = r.ViewBlock(0, h, j);
        ASSERT_TRUE(s >= 0 && s < slots);
        ASSERT_EQ(mem[h][s], b) << "step " << step << " head " << h << " view " << j;
        ASSERT_EQ(std::count(sel[h].begin(), sel[h].end(), b), 1) << b;
        ret_attended += held.count(b) && std::count(ret[h].begin(), ret[h].end(), b);
        on_gpu.insert(b);
        view_slots.insert(s);
      }
      ASSERT_EQ(static_cast<int64_t>(on_gpu.size()), n_g);
      ASSERT_EQ(static_cast<int64_t>(view_slots.size()), n_g);
      for (int64_t s = 0; s < slots; ++s) ASSERT_EQ(r.At(0, h, s), mem[h][s]);
      // Only what the GPU held nowhere comes from the host; held retained blocks go first.
      int64_t hits = 0;
      for (int32_t b : sel[h]) hits += held.count(b);
      ASSERT_EQ(from_host[h], n_g - std::min(n_g, hits)) << "step " << step;
      ASSERT_EQ(ret_attended, std::min(n_g, ret_held)) << "step " << step;
      // Retained blocks new to the GPU are read first.
      int64_t ret_new = 0, ret_read = 0;
      for (int32_t b : ret[h]) ret_new += held.count(b) == 0;
      for (const auto& c : cp)
        if (c.head == h) ret_read += std::count(ret[h].begin(), ret[h].end(), c.block);
      ASSERT_EQ(ret_read, std::min(ret_new, from_host[h]));
      // A new block takes an empty slot, else the one attended least recently, among the slots
      // this step does not attend.
      for (const auto& c : cp) {
        if (c.head != h || before[h][c.to] < 0) continue;
        for (int64_t s = 0; s < slots; ++s) {
          if (view_slots.count(static_cast<int32_t>(s)) != 0) continue;
          ASSERT_GE(before[h][s], 0) << "an empty slot was left, step " << step;
          ASSERT_LE(last[h][c.to], last[h][s]) << "step " << step;
        }
      }
      for (int32_t s : view_slots) last[h][s] = step;
    }
    // Half the steps fill the slots with blocks the CPU attended: never a slot this step attends,
    // never a block already held; an empty slot first, else the one used least recently.
    if (step % 2 == 1 && n_g > 0) {
      std::vector<std::vector<int32_t>> cpu(Hk);
      for (int64_t h = 0; h < Hk; ++h)
        for (int32_t b : sel[h]) {
          bool on_gpu = false;
          for (int64_t j = 0; j < n_g; ++j) on_gpu |= r.ViewBlock(0, h, j) == b;
          if (!on_gpu) cpu[h].push_back(b);
        }
      const int64_t most = 1 + static_cast<int64_t>(rng() % 4);
      const std::vector<std::vector<int32_t>> held = mem;
      r.Fill(0, cpu, most, &cp);
      std::vector<int64_t> per(Hk, 0);
      for (const auto& c : cp) {
        ASSERT_EQ(last[c.head][c.to] == step, false) << "filled a slot in use, step " << step;
        ASSERT_EQ(std::count(held[c.head].begin(), held[c.head].end(), c.block), 0)
            << "step " << step << " block " << c.block << " head " << c.head << " to " << c.to
            << " n_g " << n_g << " fill " << cp.size();
        ASSERT_EQ(std::count(cpu[c.head].begin(), cpu[c.head].end(), c.block), 1);
        // (Nor one holding a block of the list: it would be read again.)
        ASSERT_EQ(std::count(cpu[c.head].begin(), cpu[c.head].end(), mem[c.head][c.to]), 0);
        if (held[c.head][c.to] >= 0)
          for (int64_t s = 0; s < slots; ++s) {
            ASSERT_GE(mem[c.head][s], 0) << "an empty slot was left, step " << step;
            if (last[c.head][s] != step &&
                std::count(cpu[c.head].begin(), cpu[c.head].end(), mem[c.head][s]) == 0) {
              ASSERT_LE(last[c.head][c.to], last[c.head][s]);
            }
          }
        mem[c.head][c.to] = c.block;
        last[c.head][c.to] = step;
        ASSERT_LE(++per[c.head], most);
      }
      for (int64_t h = 0; h < Hk; ++h)
        for (int64_t s = 0; s < slots; ++s) ASSERT_EQ(r.At(0, h, s), mem[h][s]);
    }
    prev = sel;
  }
}

// Fill: the CPU's blocks of a step into slots that step does not attend, for later steps.
TEST(ResidentBlocks, FillTakesSlotsTheStepDoesNotAttend) {
  ResidentBlocks r(1, 2, 4);
  std::vector<ResidentBlocks::Copy> cp;
  r.Fill(0, {{1}, {2}}, 4, &cp);
  EXPECT_TRUE(cp.empty());                                       // no step placed yet
  EXPECT_EQ(r.Place(0, {{1, 2, 3}, {4, 5, 6}}, {}, 1, &cp), 1);  // 1 and 4 into slot 0
  // (block, head, to) of each copy.
  using C = std::vector<std::array<int32_t, 3>>;
  const auto copies = [&] {
    C v;
    for (const auto& c : cp) v.push_back({c.block, c.head, c.to});
    return v;
  };
  r.Fill(0, {{2, 3}, {5, 6}}, 1, &cp);  // one a head
  EXPECT_EQ(copies(), (C{{2, 0, 1}, {5, 1, 1}}));
  // The next step finds two of each head's blocks held: both attended where they lie.
  EXPECT_EQ(r.Place(0, {{1, 2, 7}, {4, 5, 8}}, {}, 1, &cp, 4), 2);
  EXPECT_TRUE(cp.empty());
  // Head 0: 7 and 9 take the empty slots; 10 finds none this step does not use.
  r.Fill(0, {{7, 9, 10, 11}, {8}}, 4, &cp);
  EXPECT_EQ(copies(), (C{{7, 0, 2}, {9, 0, 3}, {8, 1, 2}}));
  EXPECT_EQ(r.Place(0, {{7, 9, 1}, {8, 4, 5}}, {}, 1, &cp, 4), 3);
  EXPECT_TRUE(cp.empty());
  r.Fill(0, {{2}, {}}, 4, &cp);  // held already
  EXPECT_TRUE(cp.empty());
}

// A step the GPU planned (Attend): each head attends the selected blocks it holds, nothing is
// copied, and the fill after it takes neither those slots nor, before an empty one, a used one;
// each copy names the block it evicts.
TEST(ResidentBlocks, AttendKeepsItsSlotsFromTheFill) {
  ResidentBlocks r(1, 2, 3);
  std::vector<ResidentBlocks::Copy> cp;
  using C = std::vector<std::array<int32_t, 4>>;  // (block, head, to, evicted) of each copy
  const auto copies = [&] {
    C v;
    for (const auto& c : cp) v.push_back({c.block, c.head, c.to, c.evicted});
    return v;
  };
  EXPECT_EQ(r.Attend(0, {{1}, {2}}), (std::vector<int64_t>{0, 0}));  // nothing held yet
  r.Fill(0, {{1, 2}, {3}}, 4, &cp);
  EXPECT_EQ(copies(), (C{{1, 0, 0, -1}, {2, 0, 1, -1}, {3, 1, 0, -1}}));
  EXPECT_EQ(r.Attend(0, {{1, 5}, {3, 4}}), (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(r.ViewBlock(0, 0, 0), 1);
  EXPECT_EQ(r.ViewBlock(0, 1, 0), 3);
  // Head 0: 5 into the empty slot 2, 6 into slot 1 (block 2, filled a step ago), not slot 0
  // (attended now); head 1: 4 into an empty slot.
  r.Fill(0, {{5, 6}, {4}}, 4, &cp);
  EXPECT_EQ(copies(), (C{{5, 0, 2, -1}, {6, 0, 1, 2}, {4, 1, 1, -1}}));
  EXPECT_EQ(r.Attend(0, {{1, 2, 5, 6}, {4}}), (std::vector<int64_t>{3, 1}));
}
#endif

}  // namespace
}  // namespace needle
