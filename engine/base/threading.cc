#include "engine/base/threading.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <chrono>
#include <stdexcept>
#include <thread>

namespace needle {

namespace {
int ResolveThreads(int threads) {
  if (threads > 0) return threads;
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}
}  // namespace

ThreadingContext::ThreadingContext(int threads)
    : threads_(ResolveThreads(threads)), arena_(threads_) {}

void ThreadingContext::ParallelFor(size_t n, size_t grain,
                                   const std::function<void(size_t, size_t)>& body) {
  if (n == 0) return;
  if (grain == 0) grain = 1;
  if (threads_ == 1 || n <= grain) {
    body(0, n);
    return;
  }
  epoch_.fetch_add(1, std::memory_order_relaxed);  // releases Wake's spinners
  arena_.execute([&] {
    tbb::parallel_for(tbb::blocked_range<size_t>(0, n, grain),
                      [&](const tbb::blocked_range<size_t>& r) { body(r.begin(), r.end()); });
  });
}

namespace {
int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}
}  // namespace

void ThreadingContext::Wake(int max_us) {
  if (threads_ == 1 || max_us <= 0) return;
  wake_until_.store(NowNs() + int64_t{max_us} * 1000, std::memory_order_relaxed);
  const uint64_t epoch = epoch_.load(std::memory_order_relaxed);
  // One spinner per worker (the calling thread takes part in the ParallelFor itself).
  for (int have = spinners_.load(); have < threads_ - 1; have = spinners_.load()) {
    if (!spinners_.compare_exchange_weak(have, have + 1)) continue;
    arena_.enqueue([this, epoch] {
      while (epoch_.load(std::memory_order_relaxed) == epoch &&
             NowNs() < wake_until_.load(std::memory_order_relaxed))
        CpuRelax();
      spinners_.fetch_sub(1);
    });
  }
}

void ThreadingContext::Start(std::function<void()> fn) {
  if (running_) throw std::logic_error("ThreadingContext::Start: the last start was not joined");
  running_ = true;
  if (threads_ == 1) {  // no workers: it runs in Join
    started_fn_ = std::move(fn);
    return;
  }
  epoch_.fetch_add(1, std::memory_order_relaxed);  // releases Wake's spinners to take it
  arena_.enqueue(started_.defer(std::move(fn)));
}

void ThreadingContext::Join() {
  if (!running_) return;
  running_ = false;
  if (threads_ == 1) {
    std::function<void()> fn = std::move(started_fn_);
    started_fn_ = nullptr;
    fn();
    return;
  }
  arena_.execute([this] { started_.wait(); });
}

}  // namespace needle
