#include "engine/base/threading.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <thread>

#include "engine/base/switches.h"

namespace needle {

namespace {
int ResolveThreads(int threads) {
  if (threads > 0) return threads;
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}
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

// NEEDLE_THREADS_TEAM=0: Wake's spinners leave at the next ParallelFor, which oneTBB runs (the
// comparison switch of the team, read once).
ThreadingContext::ThreadingContext(int threads)
    : threads_(ResolveThreads(threads)), arena_(threads_) {
  static const bool team = EnvOnUnlessZero("NEEDLE_THREADS_TEAM");
  team_on_ = team;
}

ThreadingContext::~ThreadingContext() {
  try {
    Join();
  } catch (...) {  // (a started function's error, not joined by its owner: nothing to tell it to)
  }
  Rest();
  while (spinners_.load(std::memory_order_acquire) > 0) std::this_thread::yield();
}

void ThreadingContext::ParallelFor(size_t n, size_t grain,
                                   const std::function<void(size_t, size_t)>& body) {
  if (n == 0) return;
  if (grain == 0) grain = 1;
  if (threads_ == 1 || n <= grain) {
    body(0, n);
    return;
  }
  // Wake's spinners up (or on their way), of the current epoch and before their deadline (after
  // a Rest or a Start they are leaving): the team takes it, unless another caller's job holds it.
  if (team_on_ && spinners_.load(std::memory_order_acquire) > 0 &&
      wake_epoch_.load(std::memory_order_relaxed) == epoch_.load(std::memory_order_relaxed) &&
      NowNs() < wake_until_.load(std::memory_order_relaxed) &&
      !team_taken_.exchange(true, std::memory_order_acquire)) {
    RunOnTeam(n, grain, body);
    return;
  }
  epoch_.fetch_add(1, std::memory_order_relaxed);  // releases Wake's spinners
  arena_.execute([&] {
    tbb::parallel_for(tbb::blocked_range<size_t>(0, n, grain),
                      [&](const tbb::blocked_range<size_t>& r) { body(r.begin(), r.end()); });
  });
}

void ThreadingContext::Wake(int max_us) {
  if (threads_ == 1 || max_us <= 0) return;
  wake_until_.store(NowNs() + int64_t{max_us} * 1000, std::memory_order_relaxed);
  const uint64_t epoch = epoch_.load(std::memory_order_relaxed);
  wake_epoch_.store(epoch, std::memory_order_relaxed);
  // One spinner per worker (the calling thread takes part in the ParallelFor itself).
  for (int have = spinners_.load(); have < threads_ - 1; have = spinners_.load()) {
    if (!spinners_.compare_exchange_weak(have, have + 1)) continue;
    arena_.enqueue([this, epoch] {
      while (epoch_.load(std::memory_order_relaxed) == epoch &&
             NowNs() < wake_until_.load(std::memory_order_relaxed)) {
        if (team_open_.load(std::memory_order_relaxed)) ServeTeam();
        CpuRelax();
      }
      spinners_.fetch_sub(1);
    });
  }
}

// The job's fields are written while team_open_ is false and no server is inside; a server reads
// them only between its team_inside_ increment and decrement, and only after it saw team_open_
// true after that increment. The caller closes the job (team_open_ false) and then waits for
// team_inside_ to reach 0 (sequentially consistent on both sides: a server that comes in after
// that sees the job closed), so that no server reads the fields once RunOnTeam returns.
void ThreadingContext::ServeTeam() {
  team_inside_.fetch_add(1, std::memory_order_seq_cst);
  if (team_open_.load(std::memory_order_seq_cst)) {
    const size_t n = team_n_, chunk = team_chunk_;
    for (size_t b = team_next_.fetch_add(chunk, std::memory_order_relaxed); b < n;
         b = team_next_.fetch_add(chunk, std::memory_order_relaxed)) {
      const size_t e = std::min(n, b + chunk);
      if (!team_failed_.load(std::memory_order_relaxed)) {
        try {
          (*team_body_)(b, e);
        } catch (...) {
          if (!team_failed_.exchange(true)) team_error_ = std::current_exception();
        }
      }
      team_done_.fetch_add(e - b, std::memory_order_release);
    }
  }
  team_inside_.fetch_sub(1, std::memory_order_seq_cst);
}

void ThreadingContext::RunOnTeam(size_t n, size_t grain,
                                 const std::function<void(size_t, size_t)>& body) {
  // Chunks of at least `grain`, about four a thread (as oneTBB's partitioner would leave them).
  const size_t per =
      (n + 4 * static_cast<size_t>(threads_) - 1) / (4 * static_cast<size_t>(threads_));
  team_body_ = &body, team_n_ = n, team_chunk_ = std::max(grain, per);
  team_next_.store(0, std::memory_order_relaxed);
  team_done_.store(0, std::memory_order_relaxed);
  team_failed_.store(false, std::memory_order_relaxed);
  team_error_ = nullptr;
  team_open_.store(true, std::memory_order_seq_cst);
  ServeTeam();  // (the caller takes chunks too)
  while (team_done_.load(std::memory_order_acquire) < n) CpuRelax();
  team_open_.store(false, std::memory_order_seq_cst);
  while (team_inside_.load(std::memory_order_seq_cst) != 0) CpuRelax();
  std::exception_ptr e = team_error_;
  team_error_ = nullptr;
  team_taken_.store(false, std::memory_order_release);
  if (e) std::rethrow_exception(e);
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
