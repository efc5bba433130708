// The block fold's own timing (fast::FoldTimes, AttendBlocks' optional argument), gathered by the
// threads that fold: each chunk they take and each item they fold is stamped with the steady
// clock (about 20 ns a stamp), and the stamps are combined with relaxed atomics. Off (on()
// false): nothing is read or written.
#pragma once

#include <tbb/task_arena.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>

#include "engine/cpu/ops.h"

namespace needle {

class FoldClock {
 public:
  using Clock = std::chrono::steady_clock;
  explicit FoldClock(bool on) : on_(on) {}
  bool on() const { return on_; }

  // At the start of a chunk (a body call of the fold's ParallelFor): counts it and its thread;
  // returns the tick its first item starts at.
  Clock::rep Chunk() {
    const Clock::rep now = Clock::now().time_since_epoch().count();
    Clock::rep seen = first_.load(std::memory_order_relaxed);
    while (now < seen && !first_.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
    }
    chunks_.fetch_add(1, std::memory_order_relaxed);
    const int slot = tbb::this_task_arena::current_thread_index();
    threads_.fetch_or(uint64_t{1} << (static_cast<unsigned>(slot < 0 ? 0 : slot) % 64),
                      std::memory_order_relaxed);
    return now;
  }
  // At the end of an item that began at tick `begin`: returns the tick the next one begins at.
  Clock::rep Item(Clock::rep begin) {
    const Clock::rep now = Clock::now().time_since_epoch().count();
    busy_.fetch_add(now - begin, std::memory_order_relaxed);
    items_.fetch_add(1, std::memory_order_relaxed);
    Clock::rep seen = last_.load(std::memory_order_relaxed);
    while (now > seen && !last_.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
    }
    return now;
  }
  // Adds start, last, busy and the counts to *t, measured from `call` (the ParallelFor's call).
  void AddTo(fast::FoldTimes* t, Clock::time_point call) const {
    const auto s = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
    const Clock::rep f = first_.load(), l = last_.load();
    if (f == std::numeric_limits<Clock::rep>::max()) return;  // (no items at all)
    t->start += s(Clock::time_point(Clock::duration(f)) - call);
    if (l != std::numeric_limits<Clock::rep>::min())
      t->last += s(Clock::time_point(Clock::duration(l)) - call);
    t->busy += s(Clock::duration(busy_.load()));
    t->items += static_cast<double>(items_.load());
    t->chunks += static_cast<double>(chunks_.load());
    t->threads += static_cast<double>(__builtin_popcountll(threads_.load()));
  }

 private:
  bool on_;
  std::atomic<Clock::rep> first_{std::numeric_limits<Clock::rep>::max()};
  std::atomic<Clock::rep> last_{std::numeric_limits<Clock::rep>::min()};
  std::atomic<Clock::rep> busy_{0};
  std::atomic<int64_t> items_{0}, chunks_{0};
  std::atomic<uint64_t> threads_{0};  // a bit per arena slot (mod 64)
};

}  // namespace needle
